"""`qsweep`: run a sweep, see its status, query its metrics, list recipes.

Thin on purpose: it parses arguments and calls flows/ and storage/. Each command imports what it
needs when it runs, so listing recipes, asking for --help or refusing a bad sweep file imports
neither mlx nor lm-eval (tests/test_imports.py).
"""

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from tasks.tables import console_table


def default_store() -> str:
    from storage.settings import settings

    return settings().store


def history(store: str):
    """The store's metric history; where the file lies is the store's business (storage/workspace.py)."""
    from storage.workspace import history

    return history(store)


def load_or_refuse(args) -> int | None:
    """The sweep file, validated into args.sweep; or 2 after saying what is wrong with it. It runs before
    anything that runs the sweep is imported (mlx, lm-eval, Prefect) or re-executed (flows/blas.py)."""
    from flows.config import SweepError, load_sweep

    try:
        args.sweep, _ = load_sweep(args.sweep_file)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return None


def cmd_run(args) -> int:
    from flows.cells import check_card, resolve_benchmark, resolve_models
    from flows.config import SweepError
    from storage.workspace import open_store

    config = args.sweep  # valid (load_or_refuse)
    try:  # refuse bad input before Prefect starts or any work is done
        resolve_models(config)
        resolve_benchmark(config)
        check_card(config, open_store(args.store, read_only=True))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from flows.console import run_sweep

    code = run_sweep(args.sweep_file, args.store, verbose=getattr(args, "verbose", False))
    cmd_status(args)
    return code


def cmd_status(args) -> int:
    from tasks.registry import STAGES
    from tasks.gates import describe

    db = history(args.store)
    try:
        _, runs = db.query("SELECT run_id, sweep, status, started, finished, cells FROM runs ORDER BY started DESC LIMIT 1")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not runs:
        print(f"no sweep has run on {args.store} yet", file=sys.stderr)
        return 2
    run_id, name, status, started, finished, cells = runs[0]
    _, stages = db.query("SELECT model, recipe, stage, status, cached, seconds, error FROM stages WHERE run_id = ?", [run_id])
    done = {(m, r, s): ("cached" if c else st, sec, err) for m, r, s, st, c, sec, err in stages}
    cells = json.loads(cells)
    ran = {(c["model"], c["recipe"]) for c in cells}
    held = {cell: describe(failed) for cell, failed in db.failed_gates().items() if cell in ran}
    for (m, r) in held:  # carded, and the card says it failed a gate
        if done.get((m, r, "publish"), ("",))[0] in ("done", "cached"):
            done[m, r, "publish"] = ("gated", *done[m, r, "publish"][1:])
    print(f"sweep {name}  run {run_id}  {status}  started {started:%Y-%m-%d %H:%M:%S}"
          + (f"  took {(finished - started).total_seconds():.1f}s" if finished else ""))
    if all("stages" in c for c in cells):  # a run of some stages only, e.g. `qsweep publish`
        shown = [s for s in STAGES if any(s in c["stages"] for c in cells)]
    else:
        shown = [s for s in STAGES if s not in ("reference", "fidelity") or any(k[2] == s for k in done)]
    rows = [[c["model"], c["recipe"]] + [done.get((c["model"], c["recipe"], s), ("pending",))[0] for s in shown]
            for c in cells]
    print(console_table(["model", "recipe", *shown], rows))
    errors = [(m, r, s, e) for (m, r, s), (st, _, e) in done.items() if st == "failed"]
    for m, r, s, e in errors:
        print(f"\n{m}/{r} {s} failed: {e}")
    for (m, r), why in held.items():
        print(f"\n{m}/{r} failed its quality gates: {why}. A gated cell is held back from export and upload "
              "unless gates.allow in the sweep file or `qsweep publish --force-gated` lets it out")
    try:
        _, events = db.query("SELECT kind, stage, detail FROM events WHERE happened >= ? ORDER BY happened", [started])
    except Exception as e:  # a store last written before qsweep kept events
        if "events" not in str(e):
            raise
        events = []
    for kind, stage, detail in events:  # e.g. an artifact altered on disk, found and built again
        print(f"\nstore: {kind} {stage} artifact: {detail}")
    return 1 if errors else 0


def cmd_sql(args) -> int:
    try:
        columns, rows = history(args.store).read(args.query)  # one statement that only reads (storage/metrics.py)
    except Exception as e:  # a refused statement or a SQL error is the user's to read, not a traceback
        print(f"qsweep sql: {e}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps([dict(zip(columns, r)) for r in rows], indent=2, default=str))
    elif args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        w.writerows(rows)
    else:
        print(console_table(columns, rows))
    return 0


def cmd_compare(args) -> int:
    """Each recipe against a base recipe, per task: accuracy, difference, 95% interval, McNemar p."""
    from flows.compare import compare_recipes
    from tasks.compare import format_comparisons

    try:
        found = compare_recipes(args.store, args.base, args.alpha)
    except (FileNotFoundError, ValueError) as e:
        print(f"qsweep compare: {e}", file=sys.stderr)
        return 2
    if not found:
        print(f"qsweep compare: no model in {args.store} has benchmark samples for recipe {args.base!r}", file=sys.stderr)
        return 2
    for model, rows in found.items():
        print(f"model {model}, against {args.base}\n")
        print(format_comparisons(rows, args.alpha))
    print("\n(a sweep and `qsweep publish` record these, at alpha 0.05, in SQL: SELECT * FROM comparisons)")
    return 0


def cmd_cards(args) -> int:
    """Every model card the store can make now, from its artifacts and metric history."""
    from flows.publish import write_cards

    out = Path(args.out or Path(args.store) / "cards")
    try:
        written = write_cards(args.store, out)
    except FileNotFoundError as e:
        print(f"qsweep cards: {e}", file=sys.stderr)
        return 2
    if not written:
        print(f"qsweep cards: no cell in {args.store} has been benchmarked yet", file=sys.stderr)
        return 2
    print(console_table(["model", "recipe", "card", ""], [[m, r, str(p), "updated" if c else "unchanged"]
                                                        for m, r, p, c in written]))
    print("\n`qsweep publish SWEEP_FILE` delivers them: export folders and, with a token, the hub")
    return 0


def cmd_publish(args) -> int:
    """Publish a sweep's cells from the store (no measuring); --dry-run prints what would be sent."""
    from flows.config import SweepError
    from flows.publish import dry_run_sweep, publish_sweep

    store = str(Path(args.store).resolve())
    try:
        if args.dry_run:
            print("\n".join(dry_run_sweep(str(args.sweep_file), store, args.force_gated)))
            return 0
        state = publish_sweep(sweep_file=str(args.sweep_file), store=store, force_gated=args.force_gated,
                              return_state=True)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not state.is_completed():
        print(f"qsweep publish: {state.message}", file=sys.stderr)
        return 1
    for done in state.result():
        print(f"{done['model']}/{done['recipe']}: " + (f"held back by its quality gates ({done['gated']}); card: "
                                                        f"{done['held_at']}" if done["held_at"] else done["exported_to"]))
    return 0


def cmd_report(args) -> int:
    """The sweep as pictures: accuracy table, Pareto frontiers, metric history."""
    from tasks.report import write_report

    out = Path(args.out or Path(args.store) / "report")
    try:
        files = write_report(args.store, out, args.format)
    except (FileNotFoundError, ValueError) as e:
        print(f"qsweep report: {e}", file=sys.stderr)
        return 2
    print("\n".join(str(f) for f in files))
    return 0


def cmd_recipes(args) -> int:
    from tasks.plan import REFERENCE_SHAPES, bits_per_weight
    from tasks.recipes import builtin_recipes

    print(f"bits per weight estimated on a {REFERENCE_SHAPES['layers']}-layer llama "
          f"(hidden {REFERENCE_SHAPES['hidden']}, vocab {REFERENCE_SHAPES['vocab']}), scales included; "
          f"`qsweep recipes show NAME --model PATH` for a given model\n")
    rows = [[r.name, f"{bits_per_weight(r):.2f}", r.description] for r in builtin_recipes().values()]
    print(console_table(["recipe", "bpw", "what it does"], rows, right=("bpw",)))
    return 0


def cmd_recipes_show(args) -> int:
    """The per-module plan of a recipe (a built-in's name or a file) for a model, from its config alone."""
    from tasks.plan import format_plan, plan_for, reference_plan
    from tasks.recipes import RECIPE_DIR, RecipeError, get_recipe

    try:
        recipe = get_recipe(args.recipe)
        plan = plan_for(recipe, args.model) if args.model else reference_plan(recipe)
    except (RecipeError, ValueError, OSError) as e:
        print(f"qsweep recipes show: {e}", file=sys.stderr)
        return 2
    builtin = RECIPE_DIR / f"{recipe.name}.yaml"
    print(f"recipe {recipe.name}: {recipe.description}" + (f"\n  (file to copy: {builtin})" if builtin.exists() else ""))
    print(f"model: {args.model or 'reference shapes (SmolLM2-135M)'}\n")
    print(format_plan(plan))
    for warning in plan.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_recipes_check(args) -> int:
    """Validate recipe files; with --model, also resolve them and report rules that match nothing and fallbacks."""
    from tasks.plan import plan_for
    from tasks.recipes import RecipeError, load_recipe

    status = 0
    for path in args.files:
        try:
            recipe = load_recipe(path)
            plan = plan_for(recipe, args.model) if args.model else None
        except (RecipeError, ValueError, OSError) as e:
            print(f"{e}", file=sys.stderr)
            status = 1
            continue
        for warning in plan.warnings() if plan else []:
            print(f"{path}: warning: {warning}", file=sys.stderr)
        for note in plan.notes() if plan else []:  # e.g. lm_head tied to the embedding
            print(f"{path}: note: {note}")
        print(f"{path}: ok ({recipe.name})")
    return status


def cmd_worker(args) -> int:
    """A Prefect worker on a process pool. Started through qsweep, so the flow runs it starts
    inherit the OpenBLAS preload (flows/blas.py) that a plain `prefect worker start` lacks."""
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", args.pool, "--type", "process"]
    cmd += ["--name", args.name] if args.name else []
    cmd += ["--limit", str(args.limit)] if args.limit else []
    os.execv(sys.executable, cmd)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qsweep", description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=default_store(), help="artifact and metric store (default: $QSWEEP_STORE or ./.qsweep)")
    sub = parser.add_subparsers(dest="command", required=True)
    store_opt = argparse.ArgumentParser(add_help=False)
    store_opt.add_argument("--store", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p = sub.add_parser("run", parents=[store_opt], help="run a sweep file")
    p.add_argument("sweep_file", type=Path)
    p.set_defaults(fn=cmd_run, blas=True)
    p = sub.add_parser("status", parents=[store_opt], help="cells x stages of the latest run")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("sql", parents=[store_opt], help="query the metric history (read-only, the store's tables only)")
    p.add_argument("query", help="one SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN statement")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(fn=cmd_sql)
    p = sub.add_parser("compare", parents=[store_opt], help="each recipe against a base recipe: which differences are real")
    p.add_argument("--base", default="bf16", help="the recipe to compare against (default: bf16)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (default: 0.05)")
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("cards", parents=[store_opt], help="write every model card the store can make now")
    p.add_argument("--out", help="folder for the cards (default: <store>/cards)")
    p.set_defaults(fn=cmd_cards)
    p = sub.add_parser("publish", parents=[store_opt], help="publish a sweep's measured cells: export and hub upload")
    p.add_argument("sweep_file", type=Path)
    p.add_argument("--dry-run", action="store_true", help="print the operations it would send; send nothing, no token needed")
    p.add_argument("--force-gated", action="store_true",
                   help="also export and upload cells that failed a quality gate (their cards still say so)")
    p.set_defaults(fn=cmd_publish, blas=True)
    p = sub.add_parser("report", parents=[store_opt], help="accuracy table, Pareto plots and metric history as HTML or Markdown")
    p.add_argument("--out", help="folder for the report (default: <store>/report)")
    p.add_argument("--format", choices=("html", "md"), default="html")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("recipes", help="the built-in recipes; `show` a plan, `check` recipe files")
    p.set_defaults(fn=cmd_recipes)
    verbs = p.add_subparsers(dest="verb")
    v = verbs.add_parser("show", help="the per-module plan of a recipe for a model (from its config; no weights)")
    v.add_argument("recipe", help="a built-in's name or a recipe file")
    v.add_argument("--model", help="a model directory, a .gguf file or demo://... (default: reference shapes)")
    v.set_defaults(fn=cmd_recipes_show)
    v = verbs.add_parser("check", help="validate recipe files")
    v.add_argument("files", nargs="+", type=Path)
    v.add_argument("--model", help="also resolve them for this model: rules matching nothing, fallbacks")
    v.set_defaults(fn=cmd_recipes_check)

    p = sub.add_parser("worker", help="start a Prefect worker for the deployments in prefect.yaml")
    p.add_argument("--pool", default="qsweep", help="the work pool (default: qsweep; created if missing)")
    p.add_argument("--name", help="the worker's name (default: Prefect's)")
    p.add_argument("--limit", type=int, help="most flow runs at once (default: no limit)")
    p.set_defaults(fn=cmd_worker, blas=True)

    args = parser.parse_args(argv)
    if args.fn is cmd_run and (refused := load_or_refuse(args)):
        return refused
    if argv is None and getattr(args, "blas", False):  # a real command line that runs models: a real BLAS first
        from flows.blas import reexec_with_blas  # (flows/blas.py); it asks mlx whether a GPU does the matmuls

        reexec_with_blas("-m", "flows.cli")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
