"""flows/cell.py: a cell's stages through the real chain, and what a cell that ran elsewhere leaves here."""

import shutil

import storage.digests
from flows.cell import Ledger
from flows.cells import Cell
from storage.metrics import MetricStore
from storage.workspace import open_store

LATEST = "SELECT model, recipe, stage, task, metric, value, artifact_key FROM latest_metrics ORDER BY ALL"


def test_a_cached_cell_runs_nothing_and_reads_no_artifact_again(measured, monkeypatch):
    from conftest import measure_cell
    from tasks.recipes import BUILTINS

    store, refs, resolved = measured
    read = []
    real = storage.digests.file_sha256
    monkeypatch.setattr(storage.digests, "file_sha256", lambda path: read.append(path) or real(path))
    again = measure_cell(open_store(store.root), "tiny", resolved, BUILTINS["q4"], run_id="rerun")
    assert {s: r.key for s, r in again.items()} == {s: r.key for s, r in refs["q4"].items()}
    assert read == []  # every artifact checked through the state database, none re-hashed
    _, stages = MetricStore(store.metrics_db).query("SELECT stage, cached FROM stages WHERE run_id = 'rerun'")
    assert sorted(stages) == sorted((s, True) for s in refs["q4"])


def test_a_cell_measured_on_another_machine_is_recorded_from_its_artifacts(measured, tmp_path):
    store, refs, resolved = measured
    here = open_store(tmp_path / "here")  # the artifacts came through the mirror; the history did not
    shutil.copytree(store.root / "artifacts", here.root / "artifacts")
    for recipe, by_stage in refs.items():
        ledger = Ledger(here, "run-2", Cell("tiny", recipe, resolved, {}, export_to=""))
        ledger.found(by_stage)
        ledger.found(by_stage)  # twice: nothing doubles
    there, got = MetricStore(store.metrics_db).query(LATEST)[1], MetricStore(here.metrics_db).query(LATEST)[1]
    assert got == there and len(got) > 20
    _, stages = MetricStore(here.metrics_db).query("SELECT stage, cached, count(*) FROM stages GROUP BY ALL")
    assert {(s, c, n) for s, c, n in stages} == {(s, True, 3) for s in ("download", "quantize", "smoke", "benchmark",
                                                                        "reference", "fidelity")}
    samples = "SELECT count(*) FROM samples"
    assert MetricStore(here.metrics_db).query(samples)[1] == MetricStore(store.metrics_db).query(samples)[1]
