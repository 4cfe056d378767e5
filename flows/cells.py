"""A sweep file planned into cells: one base model through one recipe, with every stage's parameters.

Planning resolves what the file leaves to the machine (a hub revision to its commit, `auto`
backends, where each benchmark task's data comes from, the corpus's digest), so that a
stage's parameters are all its key needs. The sweep and publish flows both start here.
"""

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from flows.config import Sweep, SweepError, load_sweep
from storage.artifacts import ArtifactRef, Store
from storage.digests import digest_files, scan_files
from storage.metrics import MetricStore
from tasks.download import SourceError, key_params, resolve_source
from tasks.registry import MEASURING, STAGES


class SweepFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Cell:
    model: str
    recipe: str
    source: dict  # the model's source resolved to what identifies its content (a hub commit, a local digest)
    params: dict  # stage name -> its parameters (its key's material); None: the stage does not run
    export_to: str  # where publishing exports the model and its card
    allow_gated: bool = False  # the sweep file lets it out although it fails a quality gate
    trust_remote_code: bool = False  # in no key: it changes no result, only what may run

    @property
    def name(self) -> str:
        return f"{self.model}/{self.recipe}"

    def stages(self) -> list[str]:
        """Its measuring stages in order: those with parameters."""
        return [s for s in MEASURING if self.params.get(s) is not None]

    def inputs(self, stage: str, refs: dict) -> list[ArtifactRef]:
        return [refs[n] for n in STAGES[stage].needs if n in refs]


def slug(*parts: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def resolve_models(config: Sweep, what: str = "sweep file") -> dict[str, dict]:
    """Each model's source, resolved to what identifies its content (hub revision -> commit sha). `what` names
    the input in the message, as parse_sweep's does."""
    resolved, errors = {}, []
    for i, m in enumerate(config.models):
        try:
            resolved[m.name] = resolve_source(m.source)
        except SourceError as e:
            errors.append(f"models[{i}].source: {e}")
    if errors:
        raise SweepError(f"invalid {what}:\n  " + "\n  ".join(errors))
    return resolved


def resolve_benchmark(config: Sweep) -> dict:
    """Benchmark parameters with the choices made for this machine: backend, and each task's data source."""
    from tasks.benchmark import LOCAL_TASKS, local_task_names, task_manager_for
    from tasks.loading import resolve_backend
    from tasks.offline_tasks import plan_tasks

    try:
        plan = plan_tasks(config.benchmark.tasks, config.benchmark.data)
    except (ValueError, ModuleNotFoundError) as e:
        raise SweepError(f"invalid sweep file:\n  benchmark.tasks: {e}") from None
    local = local_task_names()  # qsweep's own tasks; lm-eval's full index only when a task is not among them
    runs = [t["run"] for t in plan]
    known = local if all(r in local for r in runs) else task_manager_for(runs).all_tasks
    unknown = [r for r in runs if r not in known]
    if unknown:
        import difflib

        close = sorted({m for r in unknown for m in difflib.get_close_matches(r, known, n=5, cutoff=0.6)})
        raise SweepError(f"invalid sweep file:\n  benchmark.tasks: unknown task {', '.join(unknown)}"
                         + (f"; did you mean {', '.join(close)}?" if close else "") + "; allowed: "
                         f"{', '.join(sorted(local))}, or any lm-eval task (`lm-eval ls tasks`)")
    params = config.benchmark.model_dump(exclude={"data"})
    # The shipped task files are inputs too: an edited prompt or dataset must not reuse old results.
    return {**params, "backend": resolve_backend(config.benchmark.backend), "plan": plan,
            "task_files": digest_files({n: f for n, f in scan_files(LOCAL_TASKS).items() if "__pycache__" not in n})}


def resolve_fidelity(config: Sweep) -> dict | None:
    """The fidelity stages' parameters: the corpus by reference and by content, the backend resolved."""
    from tasks.loading import resolve_backend
    from tasks.specs import shipped_path

    f = config.fidelity
    if not f.enabled:
        return None
    digest = hashlib.sha256(shipped_path(f.corpus).read_bytes()).hexdigest()
    return {**f.model_dump(exclude={"enabled"}), "corpus_sha256": digest, "backend": resolve_backend(f.backend)}


def resolve_search(config: Sweep) -> dict | None:
    """The sensitivity stage's parameters (one artifact per model, shared by its budgets): the calibration text
    by reference and by content, the formats, the backend resolved."""
    from tasks.loading import resolve_backend
    from tasks.specs import format_names, parse_format, shipped_path

    s = config.search
    if not s.names():
        return None
    digest = hashlib.sha256(shipped_path(s.calibration).read_bytes()).hexdigest()
    return {"calibration": s.calibration, "calibration_sha256": digest, "window": s.window, "windows": s.windows,
            "check_every": s.check_every, "formats": [parse_format(f) for f in (s.formats or format_names())],
            "backend": resolve_backend(s.backend)}


def check_card(config: Sweep, store: Store) -> None:
    """card.compare_with names cells this sweep measures or the store holds; anything else is a typo."""
    mine = {(m.name, r) for m in config.models for r in config.recipe_names()}
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


def compare_with(config: Sweep, model: str, recipe: str) -> list[dict]:
    """The other models' cells a card shows beside its own: the author's, then the same recipe's of every other
    model of the sweep (card.compare_matching); the card keeps those measured on the same questions."""
    cells = [c.model_dump() for c in config.card.compare_with if c.model != model]
    if config.card.compare_matching:
        cells += [{"model": m.name, "recipe": recipe} for m in config.models if m.name != model]
    return list({(c["model"], c["recipe"]): c for c in cells}.values())


def plan_cells(config: Sweep, resolved: dict, store: Store) -> list[Cell]:
    """Every (model, recipe) cell with the parameters of each of its stages."""
    from tasks.loading import resolve_backend

    check_card(config, store)
    benchmark = resolve_benchmark(config)
    fidelity = resolve_fidelity(config)
    smoke = {**config.smoke.model_dump(), "backend": resolve_backend(config.smoke.backend)}
    export_dir = Path(config.publish.export_dir or store.root / "published")
    sensitivity = resolve_search(config)
    recipes = [(r.name, r.params(), r.description, None) for r in config.recipe_objects()]
    for name, budget in zip(config.search.names(), [{"budget_bpw": b} for b in config.search.budgets_bpw]
                            + [{"budget_bytes": b} for b in config.search.budgets_bytes]):
        searched = {"name": name, "search": {**budget, "formats": sensitivity["formats"]}}
        recipes.append((name, searched, f"found for {name.removeprefix('auto-')} by qsweep search", sensitivity))
    cells = []
    for m in config.models:
        for recipe_name, recipe, description, measured_on in recipes:
            repo = config.publish.repo.format(model=m.name, recipe=recipe_name) if config.publish.repo else None
            publish = {
                "model": m.name, "recipe": recipe, "recipe_description": description,
                "source": key_params(resolved[m.name]), "repo_id": repo,
                "private": config.publish.private, "license": config.publish.license,
                "gates": config.gates.limits(), "notes": config.notes_for(m.name, recipe_name),
                "compare_with": compare_with(config, m.name, recipe_name),
            }
            params = {"download": key_params(resolved[m.name]), "sensitivity": measured_on, "quantize": recipe,
                      "smoke": smoke, "benchmark": benchmark, "reference": fidelity, "fidelity": fidelity,
                      "publish": publish}
            cells.append(Cell(m.name, recipe_name, resolved[m.name], params,
                              export_to=str(export_dir / f"{m.name}-{recipe_name}-mlx"),
                              allow_gated=config.allowed_gated(m.name, recipe_name),
                              trust_remote_code=m.trust_remote_code))
    return cells


def plan_and_check(sweep_file: str, store: Store) -> tuple[Sweep, list[Cell]]:
    """The sweep file validated, its sources resolved, its cells planned; a SweepError names what is wrong."""
    config, _ = load_sweep(sweep_file)
    return config, plan_cells(config, resolve_models(config), store)


def stored_refs(store: Store, cell: Cell) -> tuple[dict, str | None]:
    """A cell's artifacts as its stages would key them now, found in the store without running
    anything; and the first stage missing, if any (then publishing must wait for a sweep)."""
    refs = {}
    for name in cell.stages():
        stage = STAGES[name]
        if (ref := store.current(name, stage.key(cell.params[name], cell.inputs(name, refs)))) is None:
            return refs, name
        refs[name] = ref
    return refs, None
