"""Publishing: once every cell of a sweep is measured, each gets its card, its export and its upload.

Cards show a cell beside its siblings, so they are written after all of them: at the end of a
sweep, by `qsweep publish SWEEP` (the same step alone, from what the store holds: nothing is
measured again, which is how a failed upload is retried), and by `qsweep cards` (every card
the store can make, written to a folder, no hub).
"""

import socket
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.cell import Ledger, run_recorded
from flows.cells import Cell, SweepFailed, plan_and_check, slug, stored_refs
from flows.compare import record_comparisons
from storage.artifacts import ArtifactRef, Store
from storage.keys import tool_versions
from storage.metrics import MetricStore
from storage.workspace import open_store
from tasks import card as cards
from tasks import gates
from tasks.compare import BASE_RECIPE
from tasks.publish import card_inputs, card_params, deliver, dry_run, held, held_at
from tasks.recipes import builtin_recipes
from tasks.registry import STAGES


def deliver_card(store: Store, card: ArtifactRef, quantized: ArtifactRef, params: dict, dest: str, allow_gated: bool) -> dict:
    """The card's delivery: the export folder and the upload, or holding a gated cell back. Not a cached
    task: it checks the folder and the hub each time and does only what does not hold yet."""
    receipt = deliver(store, card, quantized, params, Path(dest), allow_gated)
    log = get_run_logger()
    if receipt.get("held_at"):
        log.warning("%s/%s held back by its quality gates (%s): not exported or uploaded; its card is in %s%s",
                    params["model"], params["recipe"]["name"], receipt["gated"], receipt["held_at"],
                    f". Note: {receipt['note']}" if receipt.get("note") else "")
    else:
        log.info("published to %s%s", receipt["exported_to"],
                 f" and {receipt['uploaded']['repo']}" if receipt["uploaded"] else "")
    return receipt


def publish_cell(store: str, run_id: str, cell: Cell, refs: dict, force_gated: bool = False) -> dict:
    """The card (an artifact keyed by what it shows), then its delivery: the export folder and the upload
    when asked; a cell that failed a quality gate is held back (card under <store>/gated/) unless allowed
    or forced. Runs inside the sweep's (or `qsweep publish`'s) flow: a subflow per card cost ~1 s each in
    Prefect alone, as much as a cached cell (bench/RESULTS.md, rerun_overhead)."""
    artifacts = open_store(store)
    with MetricStore(artifacts.metrics_db).session(read_only=True):  # the card's facts: one connection for its queries
        params, facts = card_params(artifacts, cell.params["publish"], refs)
    allow = force_gated or cell.allow_gated
    # A task of the sweep's flow, untagged (a tag on it costs ~2 s: Prefect checks tag concurrency limits), so
    # its name says whose card it is.
    card = run_recorded(Ledger(artifacts, run_id, cell), "publish", card_inputs(refs), params, {"facts": asdict(facts)},
                        label=f"{cell.model}/{cell.recipe}", then=lambda card: deliver_card(artifacts, card, refs["quantize"], params, cell.export_to, allow))
    text = (artifacts.path(card) / "README.md").read_text()
    create_markdown_artifact(key=slug("card", cell.model, cell.recipe), markdown=_body(text),
                             description=f"model card of {cell.model} quantized with {cell.recipe}")
    kept_back = held(artifacts, card, allow)  # the same decision the delivery made
    return {"model": cell.model, "recipe": cell.recipe, "card": card.key, "gated": gates.describe(facts.gates),
            "exported_to": None if kept_back else cell.export_to,
            "held_at": str(held_at(artifacts, Path(cell.export_to))) if kept_back else None}


def try_publish(store: Store, run_id: str, cell: Cell, refs: dict, force_gated: bool = False):
    """publish_cell for one planned cell: (its outcome, None), or (None, what failed)."""
    try:
        return publish_cell(str(store.root), run_id, cell, refs, force_gated), None
    except Exception as e:  # a failed card or delivery fails this cell only; the stage recorded why
        return None, f"{type(e).__name__}: {e}"


def _body(card_text: str) -> str:
    """The card without its YAML front matter, which the Prefect UI would show as text."""
    from huggingface_hub import ModelCard

    return ModelCard(card_text).text


@flow(name="publish-sweep", flow_run_name="publish:{sweep_file}")
def publish_sweep(sweep_file: str, store: str = ".qsweep", force_gated: bool = False) -> list[dict]:
    """Publish every cell of a sweep from the store, measuring nothing (a sweep must have run).
    `force_gated` lets out cells that failed a quality gate too (their cards still say so)."""
    artifacts = open_store(store)
    config, cells = plan_and_check(sweep_file, artifacts)
    history = MetricStore(artifacts.metrics_db)
    run_id = flow_run.get_id() or "local"
    history.start_run(run_id, config.name, str(sweep_file), "", socket.gethostname(), tool_versions(),
                      [{"model": c.model, "recipe": c.recipe, "stages": ["publish"]} for c in cells])
    record_comparisons(str(artifacts.root), BASE_RECIPE)
    done, missing = [], []
    for c in cells:
        refs, lacking = stored_refs(artifacts, c)
        if lacking:
            missing.append(f"{c.name} (not measured: no {lacking} artifact for these settings; "
                           f"run `qsweep run {sweep_file}` first)")
            continue
        outcome, error = try_publish(artifacts, run_id, c, refs, force_gated)
        if outcome is not None:
            done.append(outcome)
        else:
            missing.append(f"{c.name} ({error})")
    history.finish_run(run_id, "failed" if missing else "completed")
    if missing:
        raise SweepFailed(f"{len(missing)} of {len(cells)} cells not published: {'; '.join(missing)}")
    return done


def dry_run_sweep(sweep_file: str, store: str, force_gated: bool = False) -> list[str]:
    """What `qsweep publish` would send for each cell of the sweep, as lines to print; sends nothing,
    writes nothing."""
    artifacts = open_store(store, read_only=True)
    config, cells = plan_and_check(sweep_file, artifacts)
    lines = []
    for c in cells:
        refs, lacking = stored_refs(artifacts, c)
        lines.append(f"{c.name}:")
        if lacking:
            lines.append(f"  not measured yet (no {lacking} artifact for these settings): run the sweep first")
            continue
        text, plan, failed = dry_run(artifacts, c.params["publish"], refs)
        if failed and not (force_gated or c.allow_gated):
            lines.append(f"  held back by its quality gates ({gates.describe(failed)}): not exported, not uploaded; "
                         f"its card would go to {held_at(artifacts, Path(c.export_to))}")
            continue
        if failed:
            lines.append(f"  fails its quality gates ({gates.describe(failed)}), let out by "
                         + ("--force-gated" if force_gated else "the sweep file's gates.allow"))
        lines.append(f"  export to {c.export_to}: the model files and README.md ({len(text):,} characters)")
        if plan is None:
            lines.append("  no hub repo in the sweep file (publish.repo): nothing to upload")
            continue
        if plan.note:
            lines.append(f"  note: {plan.note}")
        lines += [f"  {op}" for op in plan.operations()]
        lines += [f"  leave {name} (not written by qsweep)" for name in plan.kept]
    return lines


def write_cards(store: str, out: Path) -> list[tuple[str, str, Path, bool]]:
    """Every card the store can make now, as README.md under out/<name>/; (model, recipe, path, changed)."""
    artifacts = open_store(store)
    db = MetricStore(artifacts.metrics_db)
    _, rows = db.query("""
        SELECT model, recipe, stage, key FROM stages WHERE status = 'done'
        QUALIFY row_number() OVER (PARTITION BY model, recipe, stage ORDER BY finished DESC) = 1
        ORDER BY model, recipe""")
    cells: dict[tuple, dict] = {}
    for model, recipe, stage, key in rows:
        if stage in STAGES and (ref := artifacts.current(stage, key)) is not None:
            cells.setdefault((model, recipe), {})[stage] = ref
    written = []
    for (model, recipe), refs in cells.items():
        if not {"download", "quantize", "smoke", "benchmark"} <= set(refs):
            continue
        params = _publish_params(artifacts, model, refs)
        text = cards.render(cards.gather(artifacts, params, {s: r for s, r in refs.items() if s != "publish"}))
        path = out / cards.published_name(model, recipe) / "README.md"
        changed = not path.exists() or path.read_text() != text
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append((model, recipe, path, changed))
    return written


def _publish_params(artifacts: Store, model: str, refs: dict) -> dict:
    """The publish settings of the cell's last publish (repo, license), or what the artifacts say."""
    if "publish" in refs:
        return {k: v for k, v in artifacts.manifest(refs["publish"])["params"].items() if k != "facts"}
    recipe = artifacts.manifest(refs["quantize"])["params"]
    builtin = builtin_recipes().get(recipe["name"])
    return {"model": model, "recipe": recipe, "source": artifacts.manifest(refs["download"])["params"],
            "recipe_description": builtin.description if builtin and builtin.params() == recipe else "",
            "repo_id": None, "private": True, "license": None}
