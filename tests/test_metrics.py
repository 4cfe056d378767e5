"""MetricStore: metric history in DuckDB, safe to query while a sweep writes."""

import subprocess
import sys
import time

import duckdb
import pytest

from storage.metrics import MetricStore

ROWS = [
    {"task": "qsweep_demo_mc", "metric": "acc", "value": 0.5, "stderr": 0.1, "n": 8},
    {"task": "qsweep_demo_mc", "metric": "acc_norm", "value": 0.25, "stderr": 0.08, "n": 8},
]
COUNT = "SELECT count(*) FROM metrics"


@pytest.fixture
def history(tmp_path):
    store = MetricStore(tmp_path / "metrics.duckdb")
    store.record_metrics("run-1", "tiny", "q4", "benchmark", "key-a", ROWS)
    return store


def test_recording_the_same_artifact_twice_adds_no_rows(history):
    history.record_metrics("run-2", "tiny", "q4", "benchmark", "key-a", ROWS)
    history.record_metrics("run-2", "tiny", "q4", "benchmark", "key-a", ROWS[:1])
    columns, rows = history.query("SELECT metric, value, stderr, n, run_id FROM metrics ORDER BY metric")
    assert columns == ["metric", "value", "stderr", "n", "run_id"]
    assert rows == [(r["metric"], r["value"], r["stderr"], r["n"], "run-1") for r in ROWS]

    history.record_metrics("run-2", "tiny", "q4", "benchmark", "key-b", ROWS)  # a new artifact: new rows
    history.record_metrics("run-2", "tiny", "q8", "benchmark", "key-a", ROWS)
    assert history.query(COUNT)[1] == [(3 * len(ROWS),)]


def test_query_is_read_only(history):
    with pytest.raises(duckdb.Error, match="(?i)read.only"):
        history.query("DELETE FROM metrics")
    assert history.query(COUNT)[1] == [(len(ROWS),)]
    assert history.query("SELECT value FROM metrics WHERE metric = ?", ["acc"])[1] == [(0.5,)]


def test_query_without_history_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="run a sweep first"):
        MetricStore(tmp_path / "none.duckdb").query(COUNT)
    assert not (tmp_path / "none.duckdb").exists()


HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
con.execute("INSERT INTO metrics (model, recipe, stage, task, metric, value, artifact_key, run_id) "
            "VALUES ('tiny', 'q4', 'smoke', 'smoke', 'x', 1, 'k', 'r')")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
print("released", flush=True)
"""


def test_query_waits_for_a_writer_in_another_process(history):
    hold = 1.0
    writer = subprocess.Popen([sys.executable, "-c", HOLDER, str(history.path), str(hold)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(duckdb.IOException, match="(?i)lock"):
            MetricStore(history.path, lock_timeout=0.1).query(COUNT)  # gives up: the lock is still held

        _, rows = history.query(COUNT)  # retries until the writer lets go
        waited = time.monotonic() - started
        assert writer.stdout.readline().strip() == "released"
    finally:
        writer.kill()
        writer.wait()
    assert rows == [(len(ROWS) + 1,)]  # sees what the other process wrote
    assert hold / 2 < waited < hold + 10


def test_latest_metrics_shows_each_cell_as_last_done(history):
    history.record_stage("run-1", "tiny", "q4", "benchmark", "key-a", "done", False, 1.0)
    time.sleep(0.01)
    newer = [{**r, "value": r["value"] / 2} for r in ROWS]  # the same cell, run again with other settings
    history.record_metrics("run-2", "tiny", "q4", "benchmark", "key-b", newer)
    history.record_stage("run-2", "tiny", "q4", "benchmark", "key-b", "done", False, 1.0)
    _, rows = history.query("SELECT metric, value FROM latest_metrics ORDER BY metric")
    assert rows == [(r["metric"], r["value"]) for r in newer]
    assert history.query(COUNT)[1] == [(2 * len(ROWS),)]  # the history keeps both
