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


PLAN = [{"path": "model.layers.0.mlp.up_proj", "layer": 0, "out_features": 64, "in_features": 32, "bits": 4,
         "group_size": 32, "mode": "affine", "source": "default", "note": None}]
GATES = [{"gate": "max_kl_mean", "requirement": "at most 1", "measured": "0.2", "value": 0.2, "passed": True}]
SAMPLES = [{"task": "qsweep_demo_mc", "doc_id": i, "target": 0, "chosen": i % 2, "correct": i % 2 == 0,
            "correct_norm": True, "logliks": [-1.0, -2.0]} for i in range(4)]
TABLES = ("stages", "metrics", "recipe_layers", "gates", "samples")


def counts(history) -> dict:
    return {t: history.query(f"SELECT count(*) FROM {t}")[1][0][0] for t in TABLES}


def test_a_stage_and_its_rows_are_recorded_in_one_connection(tmp_path, monkeypatch):
    history = MetricStore(tmp_path / "metrics.duckdb")
    opened = []
    real = duckdb.connect
    monkeypatch.setattr(duckdb, "connect", lambda *a, **k: opened.append(a) or real(*a, **k))
    record = dict(metrics=ROWS, layers=PLAN, gates=GATES, samples=SAMPLES)
    history.record_stage_outputs("run-1", "tiny", "q4", "benchmark", "key-a", "done", False, 2.5, **record)
    assert len(opened) == 1
    assert counts(history) == {"stages": 1, "metrics": 2, "recipe_layers": 1, "gates": 1, "samples": 4}

    # a cached rerun with other numbers for the same artifact: one more stage line, the rows stay as they were
    changed = dict(metrics=[{**r, "value": 0.9} for r in ROWS], layers=[{**PLAN[0], "bits": 8}],
                   gates=[{**GATES[0], "passed": False}], samples=[{**s, "correct": True} for s in SAMPLES])
    history.record_stage_outputs("run-2", "tiny", "q4", "benchmark", "key-a", "done", True, 0.1, **changed)
    assert counts(history) == {"stages": 2, "metrics": 2, "recipe_layers": 1, "gates": 1, "samples": 4}
    assert history.query("SELECT metric, value, run_id FROM metrics ORDER BY metric")[1] == \
        [(r["metric"], r["value"], "run-1") for r in ROWS]
    assert history.query("SELECT bits FROM recipe_layers")[1] == [(4,)]
    assert history.query("SELECT passed FROM gates")[1] == [(True,)]
    assert history.query("SELECT count(*) FROM samples WHERE correct")[1] == [(2,)]
    assert history.query("SELECT run_id, cached, seconds FROM stages ORDER BY run_id")[1] == \
        [("run-1", False, 2.5), ("run-2", True, 0.1)]

    # a failed stage has no artifact: only its line
    history.record_stage_outputs("run-2", "tiny", "q8", "quantize", None, "failed", False, 0.3, "ValueError: x")
    assert history.query("SELECT stage, key, status, error FROM stages WHERE recipe = 'q8'")[1] == \
        [("quantize", None, "failed", "ValueError: x")]


def test_a_session_writes_all_or_nothing(tmp_path):
    history = MetricStore(tmp_path / "metrics.duckdb")
    history.record_stage("run-1", "tiny", "q4", "download", "key-d", "done", False, 1.0)
    with pytest.raises(KeyError):
        with history.session():
            history.record_stage("run-1", "tiny", "q4", "benchmark", "key-a", "done", False, 1.0)
            history.record_metrics("run-1", "tiny", "q4", "benchmark", "key-a", ROWS)
            history.record_samples("tiny", "q4", "key-a", [{"task": "t"}])  # a row without its fields
    assert counts(history) == {"stages": 1, "metrics": 0, "recipe_layers": 0, "gates": 0, "samples": 0}

    with history.session():  # another MetricStore of the same file, and a nested session, join this one
        MetricStore(history.path).record_metrics("run-1", "tiny", "q4", "benchmark", "key-a", ROWS)
        with MetricStore(history.path).session():
            history.record_stage("run-1", "tiny", "q4", "benchmark", "key-a", "done", False, 1.0)
    assert counts(history)["metrics"] == len(ROWS) and counts(history)["stages"] == 2


def test_a_reading_session_answers_every_query_from_one_connection(history, monkeypatch):
    opened = []
    real = duckdb.connect
    monkeypatch.setattr(duckdb, "connect", lambda *a, **k: opened.append(a) or real(*a, **k))
    with history.session(read_only=True):
        assert MetricStore(history.path).query(COUNT)[1] == [(len(ROWS),)]
        assert history.query("SELECT value FROM metrics WHERE metric = 'acc'")[1] == [(0.5,)]
        with pytest.raises(duckdb.Error):  # still the sandboxed, read-only connection
            history.query("DELETE FROM metrics")
    assert len(opened) == 1
    history.record_stage("run-2", "tiny", "q4", "benchmark", "key-a", "done", True, 0.1)  # writes again after it
    assert history.query("SELECT count(*) FROM stages")[1] == [(1,)]
