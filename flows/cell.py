"""One cell of a sweep: one base model through one recipe, its stages in order.

download -> quantize -> smoke -> benchmark -> (reference, fidelity) -> publish. Each stage is a Prefect
task keyed by its artifact key; this flow records what each stage did (computed
or cached, how long, which error) and its metric rows.
"""

import json
import time

from prefect import flow

from storage.artifacts import ArtifactRef, Store
from storage.metrics import MetricStore
from tasks.benchmark import benchmark_task
from tasks.download import download_task, key_params, redact
from tasks.fidelity import fidelity_task, reference_task
from tasks.publish import publish_task
from tasks.quantize import quantize_task
from tasks.smoke import smoke_task
from tasks.stage import run_stage

STAGES = ("download", "quantize", "smoke", "benchmark", "reference", "fidelity", "publish")


class StageFailed(RuntimeError):
    pass


@flow(name="cell", flow_run_name="{model}/{recipe}")
def cell(store: str, run_id: str, model: str, recipe: str, source: dict, settings: dict) -> dict:
    """`settings` holds each stage's parameters, as the sweep flow prepared them."""
    artifacts = Store(store)
    history = MetricStore(artifacts.metrics_db)

    def stage(name, task_fn, params, inputs, **extra) -> ArtifactRef:
        started = time.time()
        state = run_stage(task_fn, store=store, params=params, inputs=inputs, **extra)
        seconds = round(time.time() - started, 3)
        if not state.is_completed():
            error = redact(_error_text(state))
            history.record_stage(run_id, model, recipe, name, None, "failed", False, seconds, error)
            raise StageFailed(f"{model}/{recipe}: {name} failed: {error}")
        ref = state.result()
        cached = ref.reused or state.name == "Cached"
        history.record_stage(run_id, model, recipe, name, ref.key, "done", cached, seconds)
        info = artifacts.manifest(ref)["info"]
        history.record_metrics(run_id, model, recipe, name, ref.key, info.get("metrics", []))
        history.record_layers(model, recipe, ref.key, info.get("plan", []))
        samples = artifacts.path(ref) / "samples.jsonl"
        if samples.exists():
            history.record_samples(model, recipe, ref.key, [json.loads(line) for line in samples.read_text().splitlines()])
        return ref

    base = stage("download", download_task, key_params(source), [], resolved=source)
    quantized = stage("quantize", quantize_task, settings["recipe"], [base])
    smoke = stage("smoke", smoke_task, settings["smoke"], [quantized])
    bench = stage("benchmark", benchmark_task, settings["benchmark"], [quantized])
    if settings.get("fidelity"):
        # the base's pass has the same key in every cell of a model: computed once, then found in the store
        ref = stage("reference", reference_task, settings["fidelity"], [base])
        stage("fidelity", fidelity_task, settings["fidelity"], [quantized, ref])
    card = stage("publish", publish_task, settings["publish"], [quantized, smoke, bench], dest=settings["export_to"])
    return {"model": model, "recipe": recipe, "card": card.key, "exported_to": settings["export_to"]}


def _error_text(state) -> str:
    try:
        state.result()
    except Exception as e:  # the stage's own exception, re-raised by Prefect
        return f"{type(e).__name__}: {e}"
    return state.message or state.name
