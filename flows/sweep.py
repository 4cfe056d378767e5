"""A sweep: validate the sweep file, record the run, run one cell flow per (model, recipe),
`concurrency.cells` at a time, here or on the workers of a deployment's pool; then publish
each measured cell (its card shows the others) and write the report.

A failed cell is recorded with its error and the others go on; the sweep
fails at the end if any cell did. Finished stages are never recomputed: run
the same sweep again after a crash and only unfinished stages run.
"""

import contextvars
import socket
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from prefect import flow, get_run_logger, tags
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.runtime import flow_run
from prefect.settings import get_current_settings

from flows import progress as events
from flows.cell import Ledger, cell
from flows.cells import Cell, SweepFailed, plan_cells, resolve_models, slug, stored_refs
from flows.compare import record_comparisons
from flows.config import load_sweep
from flows.publish import try_publish
from storage.artifacts import Store
from storage.keys import tool_versions
from storage.metrics import MetricStore, cell_summary
from storage.workspace import local_store, open_store
from tasks.compare import BASE_RECIPE
from flows.stage import ensure_model_slots, ensure_zombie_rule


def _run_name() -> str:
    """sweep:<name from the sweep file>, for the Prefect UI; the file's stem if it cannot be read."""
    import yaml

    path = Path(flow_run.parameters["sweep_file"])
    try:
        return f"sweep:{yaml.safe_load(path.read_text())['name']}"
    except Exception:  # the flow itself reports a bad sweep file, with the field and the allowed values
        return f"sweep:{path.stem}"


CELL_ATTEMPTS = 3  # runs of a cell deployment that ends Crashed, before the cell counts as failed


def measure_cells(cells: list[Cell], store: Store, run_id: str, at_once: int, model_slots: int,
                  cell_deployment: str | None):
    """Run the cells' measuring stages, `at_once` at a time; yield (cell, refs or None, error) as each ends.

    Each cell is a subflow of the sweep; with `cell_deployment` it is a run of that deployment
    instead, which any worker on its pool picks up, and its artifacts are then found in the store."""
    def one(c):
        try:
            return measure(c)
        except Exception as e:  # e.g. the deployment is missing: this cell fails, the others go on
            return None, f"{type(e).__name__}: {e}"

    def measure(c):
        params = dict(store=str(store.root), run_id=run_id, cell=c, model_slots=model_slots)
        if cell_deployment is None:
            state = cell(**params, return_state=True)
            return state.result() if state.is_completed() else None, state.message
        from prefect.deployments import run_deployment

        for attempt in range(1, CELL_ATTEMPTS + 1):
            run = run_deployment(cell_deployment, parameters=params, tags=[f"model:{c.model}", f"recipe:{c.recipe}"],
                                 as_subflow=True)
            if not run.state.is_crashed() or attempt == CELL_ATTEMPTS:
                break
            # its machine or process died (a failed stage is Failed, not Crashed): any worker may take it again,
            # and every stage it finished is found in the store or its mirror
            get_run_logger().warning("cell run %s ended Crashed (%s); running the cell again (attempt %d of %d)",
                                     run.name, run.state.message, attempt + 1, CELL_ATTEMPTS)
            events.emit("cell_retry", c.name, detail=run.state.message or "crashed")
        if not run.state.is_completed():
            return None, f"cell run {run.name} ended {run.state.name}: {run.state.message or 'see it in the UI'}"
        refs, missing = stored_refs(store, c)  # pulled from the mirror if it ran elsewhere
        if missing is not None:
            return None, (f"cell run {run.name} completed, but its {missing} artifact is not in {store.root}: "
                          "every worker needs this store, or a mirror (QSWEEP_MIRROR)")
        Ledger(store, run_id, c).found(refs)
        return refs, None

    from tasks.compat import keep_tqdm_lock

    keep_tqdm_lock()  # libraries' progress bars in several threads at once
    pool = ThreadPoolExecutor(max_workers=at_once)
    try:
        running = {}
        for c in cells:
            with tags(f"model:{c.model}", f"recipe:{c.recipe}"):
                context = contextvars.copy_context()  # each thread runs the cell as a child of this sweep
            running[pool.submit(context.run, one, c)] = c
        for done in as_completed(running):
            yield running[done], *done.result()
    finally:  # after an error or Ctrl-C, cells not started yet never start
        pool.shutdown(wait=False, cancel_futures=True)


@flow(name="sweep", flow_run_name=_run_name)
def sweep(sweep_file: str, store: str = ".qsweep", cell_deployment: str | None = None) -> list[dict]:
    """`cell_deployment` (e.g. "cell/qsweep-cell") sends each cell to the workers of that deployment's pool."""
    log = get_run_logger()
    config, digest = load_sweep(sweep_file)
    resolved = resolve_models(config)
    artifacts = open_store(local_store(store))
    history = MetricStore(artifacts.metrics_db)
    cells = plan_cells(config, resolved, artifacts)
    run_id = flow_run.get_id() or "local"
    ensure_model_slots(config.concurrency.model_slots, reclaim=get_current_settings().api.url is None)
    if cell_deployment:
        ensure_zombie_rule()  # so that a cell whose machine died ends Crashed, and is run again below
    history.start_run(run_id, config.name, str(sweep_file), digest, socket.gethostname(), tool_versions(),
                      [{"model": c.model, "recipe": c.recipe, "stages": c.stages() + ["publish"]} for c in cells])
    for c in cells:  # what the console shows, and which stages the store already holds (they cost ~nothing)
        events.emit("planned", c.name, detail=",".join(c.stages() + ["publish"]),
                    stored=tuple(stored_refs(artifacts, c)[0]))
    # What the Prefect UI shows of the run: its progress, a table of finished cells, and each card.
    progress = create_progress_artifact(0.0, key=slug(config.name, "progress"),
                                        description=f"sweep {config.name}: cells measured, then published")
    steps, finished = 2 * len(cells), 0

    measured, failed = [], []
    for c, refs, error in measure_cells(cells, artifacts, run_id, config.concurrency.cells,
                                        config.concurrency.model_slots, cell_deployment):
        if refs is not None:
            measured.append((c, refs))
            events.emit("cell_done", c.name)
        else:
            failed.append(c.name)
            log.error("cell %s failed: %s", c.name, error)
            events.emit("cell_failed", c.name, detail=str(error))
        finished += 1
        update_progress_artifact(progress, 100 * finished / steps)
    # the finished cells as a table in the UI: once, not per cell (a query and an API call, ~1.5 s a cell)
    create_table_artifact(cell_summary(history, [(c.model, c.recipe) for c, _ in measured]),
                          key=slug(config.name, "cells"), description=f"sweep {config.name}: finished cells")
    order = {c.name: i for i, c in enumerate(cells)}
    measured.sort(key=lambda m: order[m[0].name])  # cards in the sweep file's order
    if any(c.recipe == BASE_RECIPE for c in cells):
        try:  # the `comparisons` table, for SQL; cards compute their own, so a failure here must not stop them
            record_comparisons(str(artifacts.root), BASE_RECIPE)
        except Exception as e:
            log.warning("comparisons not recorded (`qsweep publish` records them again): %s: %s", type(e).__name__, e)

    outcomes = []
    for c, refs in measured:  # every card shows its siblings, so cards wait for the last cell
        outcome, error = try_publish(artifacts, run_id, c, refs)
        if outcome is not None:
            outcomes.append(outcome)  # a cell held back by its gates is not a failure of the sweep
            events.emit("published", c.name, detail=outcome["gated"] or "")
        else:
            failed.append(f"{c.name} (publish)")
            log.error("publishing %s failed: %s", c.name, error)
        finished += 1
        update_progress_artifact(progress, 100 * finished / steps)
    update_progress_artifact(progress, 100.0)
    history.finish_run(run_id, "failed" if failed else "completed")
    _, [(computed,)] = history.query("SELECT count(*) FROM stages WHERE run_id = ? AND NOT cached", [run_id])
    if measured and (computed or failed or not (artifacts.root / "report").exists()):
        # (a run that computed nothing would draw the same report: a third of a cached rerun's time, skipped)
        from tasks.report import write_report

        try:  # a picture that cannot be drawn must not fail a sweep whose results are all recorded
            log.info("report: %s", write_report(artifacts.root, artifacts.root / "report")[0])
        except Exception as e:
            log.warning("report not written (`qsweep report` retries it): %s: %s", type(e).__name__, e)
    if (report := artifacts.root / "report" / "report.html").exists():
        events.emit("report", detail=str(report))
    if failed:
        raise SweepFailed(f"{len(failed)} of {len(cells)} cells failed: {', '.join(failed)}; see `qsweep status`")
    return outcomes
