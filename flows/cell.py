"""One cell of a sweep: one base model through one recipe, its stages in order.

download -> quantize -> smoke -> benchmark -> (reference, fidelity) here; publish runs once
every cell of the sweep is measured (flows/publish.py), so that each card shows all its
siblings. Each stage runs as a Prefect task keyed by its artifact key (flows/stage.py);
`Ledger` records what each stage did (computed or cached, how long, which error) and its rows.
"""

import json
import time
from dataclasses import dataclass
from typing import Callable

from prefect import flow
from prefect.runtime import flow_run

from flows import progress
from flows.cells import Cell
from storage.artifacts import ArtifactRef, Store
from storage.metrics import MetricStore
from storage.workspace import local_store, open_store
from tasks import remote_code
from tasks.download import redact
from flows.stage import ensure_model_slots, run_stage
from tasks.registry import STAGES


class StageFailed(RuntimeError):
    pass


@dataclass
class Ledger:
    """A cell's lines in the metric history for one run."""

    store: Store
    run_id: str
    cell: Cell

    @property
    def history(self) -> MetricStore:
        return MetricStore(self.store.metrics_db)

    def stage(self, name: str, ref: ArtifactRef | None, status: str, cached: bool, seconds: float,
              error: str | None = None) -> None:
        """The stage's line in `stages` and its artifact's rows (metrics, plan, gates, samples), in one DuckDB
        connection (~25 ms each). Rows already recorded for the artifact stay as they are."""
        self.history.record_stage_outputs(self.run_id, self.cell.model, self.cell.recipe, name, ref and ref.key, status,
                                          cached, seconds, error, **(self.rows(ref) if ref else {}))

    def rows(self, ref: ArtifactRef) -> dict:
        """An artifact's rows, all kept in the artifact itself: its manifest's info and samples.jsonl."""
        info, samples = self.store.manifest(ref)["info"], self.store.path(ref) / "samples.jsonl"
        device = {"device": info["device"]} if "device" in info else {}  # where it ran, on each of its rows
        return {"metrics": [{**m, **device} for m in info.get("metrics", [])], "layers": info.get("plan", []),
                "gates": info.get("gates", []),
                "samples": [json.loads(line) for line in samples.read_text().splitlines()] if samples.exists() else [],
                "sensitivity": info.get("sensitivity", [])}

    def found(self, refs: dict) -> None:
        """A cell that ran elsewhere (a worker on another machine, with its own metric history), recorded
        from its artifacts as found (cached) by this run; stages this run already recorded stay."""
        history, (model, recipe) = self.history, (self.cell.model, self.cell.recipe)
        with history.session(), history.connect() as con:  # one connection for the cell
            seen = {s for (s,) in con.execute("SELECT stage FROM stages WHERE run_id = ? AND model = ? AND recipe = ? "
                                              "AND status = 'done'", [self.run_id, model, recipe]).fetchall()}
            for name, ref in refs.items():
                if name not in seen:
                    self.stage(name, ref, "done", True, 0.0)
                else:
                    history.record_outputs(self.run_id, model, recipe, ref.stage, ref.key, **self.rows(ref))


def run_recorded(ledger: Ledger, name: str, inputs: list[ArtifactRef], params: dict, extra: dict | None = None,
                 then: Callable[[ArtifactRef], object] | None = None, label: str | None = None) -> ArtifactRef:
    """Run one stage's task and record it: its outcome, metrics, plan and samples. `then(ref)` is what
    the stage does with its artifact beyond the store (publish: deliver the card); the stage fails
    if it does. `label` names the task run after the stage (default: the model of a shared stage,
    else the recipe). Raises StageFailed."""
    cell, stage = ledger.cell, STAGES[name]
    started = time.time()
    progress.emit("started", cell.name, name)
    # Named for the UI (quantize:qx86-hi, download:SmolLM2-135M) and tagged model:/recipe: by the cell flow's
    # context only: Prefect checks a task's tags against its tag concurrency limits, a round trip that costs
    # ~0.5-2 s for each new set of tags (bench/RESULTS.md, rerun_overhead).
    label = label or (cell.model if stage.shared else cell.recipe)
    state = run_stage(stage, ledger.store, params, inputs, extra, run_name=f"{name}:{label}")
    if not state.is_completed():
        error = redact(_error_text(state))
        ledger.stage(name, None, "failed", False, round(time.time() - started, 3), error)
        progress.emit("failed", cell.name, name, seconds=time.time() - started, detail=error)
        raise StageFailed(f"{cell.name}: {name} failed: {error}")
    ref = state.result()
    try:
        if then is not None:
            then(ref)
    except Exception as e:
        error = redact(f"{type(e).__name__}: {e}")
        ledger.stage(name, ref, "failed", False, round(time.time() - started, 3), error)
        progress.emit("failed", cell.name, name, seconds=time.time() - started, detail=error)
        raise StageFailed(f"{cell.name}: {name} failed: {error}") from None
    cached = ref.reused or state.name == "Cached"
    ledger.stage(name, ref, "done", cached, round(time.time() - started, 3))
    progress.emit("finished", cell.name, name, cached=cached, seconds=time.time() - started)
    return ref


def _run_name() -> str:
    c = flow_run.parameters["cell"]
    return f"cell:{c.model}/{c.recipe}" if isinstance(c, Cell) else f"cell:{c['model']}/{c['recipe']}"


@flow(name="cell", flow_run_name=_run_name)
def cell(store: str, run_id: str, cell: Cell, model_slots: int = 1) -> dict:
    """`model_slots` is how many models this machine may hold at once. Returns the cell's artifacts by stage."""
    ensure_model_slots(model_slots)  # here, not in the sweep: a worker on another machine counts its own
    ledger = Ledger(open_store(local_store(store)), run_id, cell)
    refs = {}
    with remote_code.allowed(cell.trust_remote_code):  # every model load of this cell's stages
        for name in cell.stages():
            extra = {"resolved": cell.source} if name == "download" else None
            refs[name] = run_recorded(ledger, name, cell.inputs(name, refs), cell.params[name], extra)
            if name == "download":  # refused before anything loads the model; recorded on the stage it stops
                refuse_remote_code(ledger, refs[name])
    return refs


def refuse_remote_code(ledger: Ledger, downloaded: ArtifactRef):
    try:
        remote_code.check(ledger.cell.model, ledger.store.path(downloaded), ledger.cell.trust_remote_code)
    except remote_code.RemoteCodeRefused as e:
        ledger.stage("quantize", None, "failed", False, 0.0, f"RemoteCodeRefused: {e}")
        progress.emit("failed", ledger.cell.name, "quantize", detail=f"RemoteCodeRefused: {e}")
        raise StageFailed(f"{ledger.cell.name}: {e}") from None


def _error_text(state) -> str:
    try:
        state.result()
    except Exception as e:  # the stage's own exception, re-raised by Prefect
        return f"{type(e).__name__}: {e}"
    return state.message or state.name
