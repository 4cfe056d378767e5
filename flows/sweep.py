"""A sweep: validate the sweep file, record the run, run one cell flow per (model, recipe),
`concurrency.cells` at a time, here or on the workers of a deployment's pool; then publish
each measured cell (its card shows the others) and write the report.

A failed cell is recorded with its error and the others go on; the sweep
fails at the end if any cell did. Finished stages are never recomputed: run
the same sweep again after a crash and only unfinished stages run.
"""

import contextvars
import hashlib
import socket
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from prefect import flow, get_run_logger, tags
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.runtime import flow_run
from prefect.settings import get_current_settings

from flows.cell import cell, record_found, stored_refs
from flows.compare import record_comparisons
from flows.config import Sweep, SweepError, load_sweep
from flows.publish import publish_tagged, slug
from storage.artifacts import Store, digest_files, scan_files
from storage.keys import tool_versions
from storage.metrics import MetricStore
from tasks.benchmark import LOCAL_TASKS, resolve_backend, task_manager_for
from tasks.compare import BASE_RECIPE
from tasks.download import SourceError, key_params, resolve_source
from tasks.offline_tasks import plan_tasks
from tasks.stage import ensure_model_slots


class SweepFailed(RuntimeError):
    pass


def resolve_models(config: Sweep) -> dict[str, dict]:
    """Each model's source, resolved to what identifies its content (hub revision -> commit sha)."""
    resolved, errors = {}, []
    for i, m in enumerate(config.models):
        try:
            resolved[m.name] = resolve_source(m.source)
        except SourceError as e:
            errors.append(f"models[{i}].source: {e}")
    if errors:
        raise SweepError("invalid sweep file:\n  " + "\n  ".join(errors))
    return resolved


def resolve_benchmark(config: Sweep) -> dict:
    """Benchmark parameters with the choices made for this machine: backend, and each task's data source."""
    try:
        plan = plan_tasks(config.benchmark.tasks, config.benchmark.data)
    except (ValueError, ModuleNotFoundError) as e:
        raise SweepError(f"invalid sweep file:\n  benchmark.tasks: {e}") from None
    local = task_manager_for([])  # qsweep's own tasks; lm-eval's full index only when a task is not among them
    runs = [t["run"] for t in plan]
    known = local.all_tasks if all(r in local.all_tasks for r in runs) else task_manager_for(runs).all_tasks
    unknown = [r for r in runs if r not in known]
    if unknown:
        import difflib

        close = sorted({m for r in unknown for m in difflib.get_close_matches(r, known, n=5, cutoff=0.6)})
        raise SweepError(f"invalid sweep file:\n  benchmark.tasks: unknown task {', '.join(unknown)}"
                         + (f"; did you mean {', '.join(close)}?" if close else "") + "; allowed: "
                         f"{', '.join(sorted(local.all_tasks))}, or any lm-eval task (`lm-eval ls tasks`)")
    params = config.benchmark.model_dump(exclude={"data"})
    # The shipped task files are inputs too: an edited prompt or dataset must not reuse old results.
    return {**params, "backend": resolve_backend(config.benchmark.backend), "plan": plan,
            "task_files": digest_files({n: f for n, f in scan_files(LOCAL_TASKS).items() if "__pycache__" not in n})}


def resolve_fidelity(config: Sweep) -> dict | None:
    """The fidelity stages' parameters: the corpus by reference and by content, the backend resolved."""
    f = config.fidelity
    if not f.enabled:
        return None
    from tasks.fidelity import corpus_path

    digest = hashlib.sha256(corpus_path(f.corpus).read_bytes()).hexdigest()
    return {**f.model_dump(exclude={"enabled"}), "corpus_sha256": digest, "backend": resolve_backend(f.backend)}


def check_card(config: Sweep, store: Store) -> None:
    """card.compare_with names cells this sweep measures or the store holds; anything else is a typo."""
    mine = {(m.name, r.name) for m in config.models for r in config.recipe_objects()}
    wanted = [(i, c) for i, c in enumerate(config.card.compare_with) if (c.model, c.recipe) not in mine]
    if not wanted:
        return
    db = MetricStore(store.metrics_db)
    held = set()
    if db.path.exists():
        _, rows = db.query("SELECT DISTINCT model, recipe FROM latest_metrics WHERE stage = 'benchmark' ORDER BY 1, 2")
        held = {tuple(r) for r in rows}
    errors = [f"card.compare_with[{i}]: no cell {c.model}/{c.recipe} in this sweep or measured in {store.root}; "
              f"allowed: {', '.join(f'{m}/{r}' for m, r in sorted(mine | held))}"
              for i, c in wanted if (c.model, c.recipe) not in held]
    if errors:
        raise SweepError("invalid sweep file:\n  " + "\n  ".join(errors))


def plan_cells(config: Sweep, resolved: dict, store: Store) -> list[dict]:
    """Every (model, recipe) cell with the parameters of each of its stages."""
    check_card(config, store)
    benchmark = resolve_benchmark(config)
    fidelity = resolve_fidelity(config)
    export_dir = Path(config.publish.export_dir or store.root / "published")
    cells = []
    for m in config.models:
        for recipe in config.recipe_objects():
            repo = config.publish.repo.format(model=m.name, recipe=recipe.name) if config.publish.repo else None
            cells.append({
                "model": m.name,
                "recipe": recipe.name,
                "source": resolved[m.name],
                "settings": {
                    "recipe": recipe.params(),
                    "smoke": {**config.smoke.model_dump(), "backend": resolve_backend(config.smoke.backend)},
                    "benchmark": benchmark,
                    "fidelity": fidelity,
                    "publish": {
                        "model": m.name, "recipe": recipe.params(), "recipe_description": recipe.description,
                        "source": key_params(resolved[m.name]), "repo_id": repo,
                        "private": config.publish.private, "license": config.publish.license,
                        "gates": config.gates.limits(), "notes": config.notes_for(m.name, recipe.name),
                        "compare_with": [c.model_dump() for c in config.card.compare_with if c.model != m.name],
                    },
                    "export_to": str(export_dir / f"{m.name}-{recipe.name}-mlx"),
                    "allow_gated": config.allowed_gated(m.name, recipe.name),
                    "trust_remote_code": m.trust_remote_code,
                },
            })
    return cells


def plan_and_check(sweep_file: str, store: str) -> tuple[Sweep, list[dict]]:
    """The sweep file validated, its sources resolved, its cells planned; a SweepError names what is wrong."""
    config, _ = load_sweep(sweep_file)
    return config, plan_cells(config, resolve_models(config), Store(store))


def _run_name() -> str:
    """sweep:<name from the sweep file>, for the Prefect UI; the file's stem if it cannot be read."""
    import yaml

    path = Path(flow_run.parameters["sweep_file"])
    try:
        return f"sweep:{yaml.safe_load(path.read_text())['name']}"
    except Exception:  # the flow itself reports a bad sweep file, with the field and the allowed values
        return f"sweep:{path.stem}"


def measure_cells(cells: list[dict], store: Store, run_id: str, at_once: int, model_slots: int,
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
        params = dict(store=str(store.root), run_id=run_id, model=c["model"], recipe=c["recipe"],
                      source=c["source"], settings=c["settings"], model_slots=model_slots)
        if cell_deployment is None:
            state = cell(**params, return_state=True)
            return state.result()["refs"] if state.is_completed() else None, state.message
        from prefect.deployments import run_deployment

        run = run_deployment(cell_deployment, parameters=params, tags=[f"model:{c['model']}", f"recipe:{c['recipe']}"],
                             as_subflow=True)
        if not run.state.is_completed():
            return None, f"cell run {run.name} ended {run.state.name}: {run.state.message or 'see it in the UI'}"
        refs, missing = stored_refs(store, c["source"], c["settings"])  # pulled from the mirror if it ran elsewhere
        if missing is not None:
            return None, (f"cell run {run.name} completed, but its {missing} artifact is not in {store.root}: "
                          "every worker needs this store, or a mirror (QSWEEP_MIRROR)")
        record_found(store, run_id, c["model"], c["recipe"], refs)
        return refs, None

    pool = ThreadPoolExecutor(max_workers=at_once)
    try:
        running = {}
        for c in cells:
            with tags(f"model:{c['model']}", f"recipe:{c['recipe']}"):
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
    artifacts = Store(store)
    history = MetricStore(artifacts.metrics_db)
    cells = plan_cells(config, resolved, artifacts)
    run_id = flow_run.get_id() or "local"
    ensure_model_slots(config.concurrency.model_slots, reclaim=get_current_settings().api.url is None)
    history.start_run(run_id, config.name, str(sweep_file), digest, socket.gethostname(), tool_versions(),
                      [{"model": c["model"], "recipe": c["recipe"]} for c in cells])
    # What the Prefect UI shows of the run: its progress, a table of finished cells, and each card.
    progress = create_progress_artifact(0.0, key=slug(config.name, "progress"),
                                        description=f"sweep {config.name}: cells measured, then published")
    steps, finished = 2 * len(cells), 0

    measured, failed = [], []
    for c, refs, error in measure_cells(cells, artifacts, run_id, config.concurrency.cells,
                                        config.concurrency.model_slots, cell_deployment):
        if refs is not None:
            measured.append((c, refs))
        else:
            failed.append(f"{c['model']}/{c['recipe']}")
            log.error("cell %s/%s failed: %s", c["model"], c["recipe"], error)
        finished += 1
        update_progress_artifact(progress, 100 * finished / steps)
        create_table_artifact(history.cell_summary([(c["model"], c["recipe"]) for c, _ in measured]),
                              key=slug(config.name, "cells"), description=f"sweep {config.name}: finished cells")
    order = {(c["model"], c["recipe"]): i for i, c in enumerate(cells)}
    measured.sort(key=lambda m: order[(m[0]["model"], m[0]["recipe"])])  # cards in the sweep file's order
    if any(c["recipe"] == BASE_RECIPE for c in cells):
        try:  # the `comparisons` table, for SQL; cards compute their own, so a failure here must not stop them
            record_comparisons(str(artifacts.root), BASE_RECIPE)
        except Exception as e:
            log.warning("comparisons not recorded (`qsweep publish` records them again): %s: %s", type(e).__name__, e)

    outcomes = []
    for c, refs in measured:  # every card shows its siblings, so cards wait for the last cell
        state = publish_tagged(str(artifacts.root), run_id, c, refs)
        if state.is_completed():
            outcomes.append(state.result())  # a cell held back by its gates is not a failure of the sweep
        else:
            failed.append(f"{c['model']}/{c['recipe']} (publish)")
            log.error("publishing %s/%s failed: %s", c["model"], c["recipe"], state.message)
        finished += 1
        update_progress_artifact(progress, 100 * finished / steps)
    update_progress_artifact(progress, 100.0)
    history.finish_run(run_id, "failed" if failed else "completed")
    if measured:
        from tasks.report import write_report

        try:  # a picture that cannot be drawn must not fail a sweep whose results are all recorded
            log.info("report: %s", write_report(artifacts.root, artifacts.root / "report")[0])
        except Exception as e:
            log.warning("report not written (`qsweep report` retries it): %s: %s", type(e).__name__, e)
    if failed:
        raise SweepFailed(f"{len(failed)} of {len(cells)} cells failed: {', '.join(failed)}; see `qsweep status`")
    return outcomes
