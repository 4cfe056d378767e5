"""One cell of a sweep: one base model through one recipe, its stages in order.

download -> quantize -> smoke -> benchmark -> (reference, fidelity) here; publish runs once
every cell of the sweep is measured (flows/publish.py), so that each card shows all its
siblings. Each stage is a Prefect task keyed by its artifact key; `run_recorded` records
what each stage did (computed or cached, how long, which error) and its metric rows.
"""

import json
import time

from prefect import flow

from storage.artifacts import ArtifactRef, Store
from storage.metrics import MetricStore
from tasks import benchmark, download, fidelity, quantize, remote_code, smoke
from tasks.download import key_params, redact
from tasks.stage import ensure_model_slots, run_stage

STAGES = ("download", "quantize", "smoke", "benchmark", "reference", "fidelity", "publish")


class StageFailed(RuntimeError):
    pass


def run_recorded(store: str, run_id: str, model: str, recipe: str, name: str, task_fn, params: dict,
                 inputs: list[ArtifactRef], **extra) -> ArtifactRef:
    """Run one stage's task and record it in the metric history: its outcome, metrics, plan and samples."""
    artifacts = Store(store)
    history = MetricStore(artifacts.metrics_db)
    # What the Prefect UI lists and filters by: quantize:qx86-hi, download:SmolLM2-135M, tags model:/recipe:
    shared = name in ("download", "reference")  # one artifact for every recipe of the model
    task_fn = task_fn.with_options(task_run_name=f"{name}:{model if shared else recipe}",
                                   tags={f"model:{model}", f"stage:{name}"} | (set() if shared else {f"recipe:{recipe}"}))
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
    record_outputs(artifacts, history, run_id, model, recipe, ref)
    return ref


def record_outputs(artifacts: Store, history: MetricStore, run_id: str, model: str, recipe: str, ref: ArtifactRef):
    """An artifact's rows in the metric history: its metrics, plan, samples and gates, all kept in the
    artifact itself. Rows already there stay as they are."""
    info = artifacts.manifest(ref)["info"]
    history.record_metrics(run_id, model, recipe, ref.stage, ref.key, info.get("metrics", []))
    history.record_layers(model, recipe, ref.key, info.get("plan", []))
    history.record_gates(model, recipe, ref.key, info.get("gates", []))  # a card's quality gates
    samples = artifacts.path(ref) / "samples.jsonl"
    if samples.exists():
        history.record_samples(model, recipe, ref.key, [json.loads(line) for line in samples.read_text().splitlines()])


def record_found(artifacts: Store, run_id: str, model: str, recipe: str, refs: dict) -> None:
    """Record a cell that ran elsewhere (a worker on another machine, with its own metric history)
    from its artifacts, as found (cached) by this run; stages this run already recorded stay."""
    history = MetricStore(artifacts.metrics_db)
    with history.connect() as con:
        seen = {s for (s,) in con.execute("SELECT stage FROM stages WHERE run_id = ? AND model = ? AND recipe = ? "
                                          "AND status = 'done'", [run_id, model, recipe]).fetchall()}
    for name, ref in refs.items():
        if name not in seen:
            history.record_stage(run_id, model, recipe, name, ref.key, "done", True, 0.0)
        record_outputs(artifacts, history, run_id, model, recipe, ref)


def chain(source: dict, settings: dict) -> list[tuple]:
    """The measuring stages in order: (stage, its task, its parameters, the stages it takes as inputs, extras)."""
    steps = [
        ("download", download.download_task, key_params(source), [], {"resolved": source}),
        ("quantize", quantize.quantize_task, settings["recipe"], ["download"], {}),
        ("smoke", smoke.smoke_task, settings["smoke"], ["quantize", "download"], {}),  # the base judges the answer
        ("benchmark", benchmark.benchmark_task, settings["benchmark"], ["quantize"], {}),
    ]
    if settings.get("fidelity"):
        # the base's pass has the same key in every cell of a model: computed once, then found in the store
        steps += [("reference", fidelity.reference_task, settings["fidelity"], ["download"], {}),
                  ("fidelity", fidelity.fidelity_task, settings["fidelity"], ["quantize", "reference"], {})]
    return steps


@flow(name="cell", flow_run_name="cell:{model}/{recipe}")
def cell(store: str, run_id: str, model: str, recipe: str, source: dict, settings: dict, model_slots: int = 1) -> dict:
    """`settings` holds each stage's parameters, as the sweep flow prepared them; `model_slots`
    is how many models this machine may hold at once. Returns the cell's artifacts by stage."""
    ensure_model_slots(model_slots)  # here, not in the sweep: a worker on another machine counts its own
    trust = settings.get("trust_remote_code", False)  # in no key: it changes no result, only what may run
    refs = {}
    with remote_code.allowed(trust):  # every model load of this cell's stages
        for name, task_fn, params, needs, extra in chain(source, settings):
            refs[name] = run_recorded(store, run_id, model, recipe, name, task_fn, params, [refs[n] for n in needs],
                                      **extra)
            if name == "download":  # refused before anything loads the model; recorded on the stage it stops
                refuse_remote_code(store, run_id, model, recipe, refs[name], trust)
    return {"model": model, "recipe": recipe, "refs": refs}


def refuse_remote_code(store: str, run_id: str, model: str, recipe: str, downloaded: ArtifactRef, trust: bool):
    artifacts = Store(store)
    try:
        remote_code.check(model, artifacts.path(downloaded), trust)
    except remote_code.RemoteCodeRefused as e:
        MetricStore(artifacts.metrics_db).record_stage(run_id, model, recipe, "quantize", None, "failed", False, 0.0,
                                                       f"RemoteCodeRefused: {e}")
        raise StageFailed(f"{model}/{recipe}: {e}") from None


def stored_refs(store: Store, source: dict, settings: dict) -> tuple[dict, str | None]:
    """A cell's artifacts as its stages would key them now, found in the store without running
    anything; and the first stage missing, if any (then publishing must wait for a sweep)."""
    refs = {}
    for name, task_fn, params, needs, _ in chain(source, settings):
        key = task_fn.cache_policy.compute_key(None, {"params": params, "inputs": [refs[n] for n in needs]}, {})
        if (ref := store.get(name, key)) is None:
            return refs, name
        refs[name] = ref
    return refs, None


def _error_text(state) -> str:
    try:
        state.result()
    except Exception as e:  # the stage's own exception, re-raised by Prefect
        return f"{type(e).__name__}: {e}"
    return state.message or state.name
