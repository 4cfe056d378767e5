"""flows/cell.py without Prefect: what a cell that ran elsewhere leaves in this machine's history."""

import shutil

from flows.cell import record_found
from storage.artifacts import Store
from storage.metrics import MetricStore

LATEST = "SELECT model, recipe, stage, task, metric, value, artifact_key FROM latest_metrics ORDER BY ALL"


def test_a_cell_measured_on_another_machine_is_recorded_from_its_artifacts(measured, tmp_path):
    store, refs, _ = measured
    here = Store(tmp_path / "here")  # the artifacts came through the mirror; the history did not
    shutil.copytree(store.root / "artifacts", here.root / "artifacts")
    for recipe, by_stage in refs.items():
        record_found(here, "run-2", "tiny", recipe, by_stage)
        record_found(here, "run-2", "tiny", recipe, by_stage)  # twice: nothing doubles
    there, got = MetricStore(store.metrics_db).query(LATEST)[1], MetricStore(here.metrics_db).query(LATEST)[1]
    assert got == there and len(got) > 20
    _, stages = MetricStore(here.metrics_db).query("SELECT stage, cached, count(*) FROM stages GROUP BY ALL")
    assert {(s, c, n) for s, c, n in stages} == {(s, True, 3) for s in ("download", "quantize", "smoke", "benchmark",
                                                                        "reference", "fidelity")}
    samples = "SELECT count(*) FROM samples"
    assert MetricStore(here.metrics_db).query(samples)[1] == MetricStore(store.metrics_db).query(samples)[1]
