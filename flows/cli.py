"""`qsweep`: run a sweep, see its status, query its metrics, list recipes.

Thin on purpose: it parses arguments and calls flows/ and storage/. Each command imports what it
needs when it runs, so listing recipes, asking for --help or --version or refusing a bad sweep file
imports neither mlx nor lm-eval (tests/test_imports.py).

Exit codes: 0 ok; 1 a cell or command failed; 2 bad input (usage, a bad sweep, recipe or SQL
statement, a store that lacks what was asked for). Every error line starts with `qsweep: error: `.
"""

import argparse
import csv
import json
import os
import re
import sys
from pathlib import Path

from tasks.tables import console_table

EXIT_CODES = """exit codes: 0 ok; 1 a cell or command failed; 2 bad input (usage, a bad sweep file, recipe or
SQL statement, a store that lacks what was asked for)"""


def default_store() -> str:
    from storage.settings import settings

    return settings().store


def history(store: str):
    """The store's metric history; where the file lies is the store's business (storage/workspace.py)."""
    from storage.workspace import history

    return history(store)


def fail(message, code: int = 2) -> int:
    """The one way the CLI reports an error: `qsweep: error: ...` on stderr; the exit code to return."""
    print(f"qsweep: error: {message}", file=sys.stderr)
    return code


def emit(columns: list[str], rows: list, fmt: str, json_columns: set[int] = frozenset()) -> None:
    """Rows as a console table, CSV or JSON (a list of objects; `json_columns` hold JSON text, given as values)."""
    if fmt == "json":
        value = lambda i, v: json.loads(v) if i in json_columns and isinstance(v, str) else v
        print(json.dumps([{c: value(i, v) for i, (c, v) in enumerate(zip(columns, r))} for r in rows],
                         indent=2, default=str))
    elif fmt == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        w.writerows(rows)
    else:
        print(console_table(columns, [list(r) for r in rows]))


def load_or_refuse(args) -> int | None:
    """The sweep file, validated into args.sweep; or 2 after saying what is wrong with it. It runs before
    anything that runs the sweep is imported (mlx, lm-eval, Prefect) or re-executed (flows/blas.py)."""
    from flows.config import SweepError, load_sweep

    try:
        args.sweep, _ = load_sweep(args.sweep_file)
    except SweepError as e:
        return fail(e)
    return None


def refuse_unrunnable(args) -> int | None:
    """2 after saying why, when the (valid) sweep cannot run here: a model source, a benchmark task or a
    card.compare_with cell that does not exist. Before Prefect starts or any work is done."""
    from flows.cells import check_card, resolve_benchmark, resolve_models
    from flows.config import SweepError
    from storage.workspace import open_store

    try:
        resolve_models(args.sweep, "sweep file" if args.command == "run" else "source (as the sweep file's models[0])")
        resolve_benchmark(args.sweep)
        check_card(args.sweep, open_store(args.store, read_only=True))
    except SweepError as e:
        return fail(e)
    return None


def refuse_unwritable(args) -> int | None:
    """1 after one line, when the command must write where it cannot (a read-only filesystem, no permission):
    before anything runs. What only reads (status, sql, compare, publish --dry-run) reads such a store as any other;
    cards and report write to --out, the store's cards/ and report/ without it."""
    if args.command not in ("run", "quantize", "search", "publish", "cards", "report") or getattr(args, "dry_run", False):
        return None
    from storage.workspace import StoreNotWritable, check_writable

    out = args.out if args.command in ("cards", "report") else None
    try:
        check_writable(out, "folder") if out else check_writable(args.store)
    except StoreNotWritable as e:
        where = "--out" if out else "--store" + (" (or --out)" if args.command in ("cards", "report") else "")
        return fail(f"{e}; qsweep {args.command} writes there: give {where} a writable folder", 1)
    return None


def cmd_run(args) -> int:
    if refused := refuse_unrunnable(args):
        return refused
    from flows.console import run_sweep

    if args.cells_on and not os.environ.get("PREFECT_API_URL"):
        return fail("--cells-on needs a Prefect server that the deployment's workers also reach: set PREFECT_API_URL "
                    "(README: Running it as a service)")
    code = run_sweep(args.sweep_file, args.store, verbose=args.verbose, cell_deployment=args.cells_on)
    cmd_status(args)
    return code


# --- qsweep quantize: one model, an implicit sweep ------------------------------------------------

def model_name(source: str) -> str:
    """A source's last path component as a model name (tasks/specs.py SAFE_NAME):
    hf://org/SmolLM2-135M@main -> SmolLM2-135M, ~/models/x.Q8_0.gguf -> x.Q8_0."""
    last = source.split("://", 1)[-1].rstrip("/").rsplit("/", 1)[-1].split("@", 1)[0].removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("._-") or "model"


def comma_list(given: list[str]) -> list[str]:
    """An option repeated or comma-separated (--tasks a,b --tasks c), as one list."""
    return [v for g in given for v in g.split(",") if v]


def implicit_sweep(args) -> dict:
    """The sweep file `qsweep quantize` writes: one model, its recipes, and only the settings given
    (every other default is tasks/specs.py's, as for any sweep file)."""
    local = lambda p: str(Path(p).expanduser().resolve())  # the file lives in the store: no relative paths
    source = args.source if "://" in args.source else local(args.source)
    name = args.name or model_name(source)
    model = {"name": name, "source": source}
    if args.trust_remote_code:
        model["trust_remote_code"] = True
    recipes = [local(r) if r.endswith((".yaml", ".yml", ".toml")) else r for r in getattr(args, "recipe", None) or []]
    sweep = {"name": name, "models": [model], "recipes": recipes}
    if getattr(args, "bpw", None) or getattr(args, "bytes", None):  # qsweep search
        sweep["name"] = f"{name}-search"  # its own sweep file beside `qsweep quantize`'s
        search = {"budgets_bpw": args.bpw or [], "budgets_bytes": args.bytes or []}
        if args.formats:
            search["formats"] = comma_list(args.formats)
        if args.calibration:
            search["calibration"] = args.calibration if args.calibration.startswith("qsweep:") else local(args.calibration)
        sweep["search"] = search
    benchmark = {}
    if args.tasks:
        benchmark["tasks"] = comma_list(args.tasks)
    if args.limit is not None:
        benchmark["limit"] = args.limit
    if benchmark:
        sweep["benchmark"] = benchmark
    if args.repo:
        sweep["publish"] = {"repo": args.repo}
    return sweep


def prepare_quantize(args) -> int | None:
    """The implicit sweep validated into args.sweep (as a sweep file is: the field, the allowed values); or 2."""
    from flows.config import SweepError, parse_sweep

    args.sweep_data = implicit_sweep(args)
    try:
        args.sweep = parse_sweep(args.sweep_data, "qsweep quantize", what="options (as sweep file fields)")
    except SweepError as e:
        return fail(e)
    return None


def cmd_quantize(args) -> int:
    """Write the implicit sweep to <store>/sweeps/<name>.yaml and run it as `qsweep run` runs a sweep file."""
    import yaml

    from flows.config import load_sweep

    if refused := refuse_unrunnable(args):
        return refused
    path = Path(args.store).resolve() / "sweeps" / f"{args.sweep.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# written by `qsweep quantize`; `qsweep run {path}` runs it again, "
                    f"`qsweep publish {path}` publishes it\n" + yaml.safe_dump(args.sweep_data, sort_keys=False))
    args.sweep_file, (args.sweep, _) = path, load_sweep(path)
    from flows.console import run_sweep

    code = run_sweep(path, args.store, verbose=args.verbose)
    print(f"\nsweep file: {path}")
    return max(code, print_cards(args.sweep, Path(args.store).resolve()))


def prepare_search(args) -> int | None:
    if not (args.bpw or args.bytes):
        return fail("qsweep search: no budget; give --bpw B (bits per weight) or --bytes N, repeatable")
    return prepare_quantize(args)


def cmd_search(args) -> int:
    """The implicit sweep of the searched recipes, run and measured; then each found recipe file where asked."""
    import shutil

    from flows.cells import plan_and_check, stored_refs
    from storage.workspace import open_store

    code = cmd_quantize(args)
    store = open_store(args.store, read_only=True)
    found = []
    for cell in plan_and_check(str(args.sweep_file), store)[1]:  # each found recipe is in its quantize artifact
        refs, _ = stored_refs(store, cell)
        if "quantize" not in refs:
            code = 1
            continue
        recipe, path = cell.recipe, store.path(refs["quantize"]) / "recipe.yaml"
        if args.out:
            out = Path(args.out)
            target = out if out.suffix in (".yaml", ".yml") and len(args.sweep.search.names()) == 1 else out / f"{recipe}.yaml"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            path = target
        found.append(f"{recipe}: recipe file {path}")
    print("\n".join(found))
    return code


def print_cards(config, store: Path) -> int:
    """Where each cell's card is after the sweep's latest run: published/ (with the model, and the hub repo if
    uploaded) or gated/ (held back by its quality gates); or why there is none. 1 if a cell has none."""
    from tasks.card import published_name
    from tasks.publish import RECEIPT

    try:
        _, rows = history(str(store)).query(
            "SELECT model, recipe, stage, status, error FROM stages WHERE run_id = "
            "(SELECT run_id FROM runs WHERE sweep = ? ORDER BY started DESC LIMIT 1) ORDER BY finished", [config.name])
    except FileNotFoundError:  # the run stopped before it recorded anything
        rows = []
    failed = {(m, r): f"{s} failed: {e}" for m, r, s, st, e in reversed(rows) if st == "failed"}  # the first one
    published = {(m, r) for m, r, s, st, _ in rows if s == "publish" and st == "done"}
    export_dir = Path(config.publish.export_dir or store / "published")
    code = 0
    for m in config.models:
        for recipe in config.recipe_names():
            cell, name = (m.name, recipe), published_name(m.name, recipe)
            exported, held = export_dir / name, store / "gated" / name
            receipt = {}
            for folder in (exported, held):
                if (folder / RECEIPT).is_file():
                    receipt = json.loads((folder / RECEIPT).read_text())
                    break
            if cell not in published or not receipt:
                code = 1
                print(f"{m.name}/{recipe}: no card: {failed.get(cell, 'not published in the latest run')}")
            elif receipt.get("held_at"):
                print(f"{m.name}/{recipe}: held back by its quality gates ({receipt.get('gated')}); "
                      f"card: {held / 'README.md'}")
            else:
                uploaded = (receipt.get("uploaded") or {}).get("repo")
                print(f"{m.name}/{recipe}: card: {exported / 'README.md'} (the model beside it)"
                      + (f"; uploaded to https://huggingface.co/{uploaded}" if uploaded else "")
                      + (f"; {receipt['note']}" if receipt.get("note") else ""))
    return code


# --- reading the store ----------------------------------------------------------------------------

def status_table(args):
    """(header line, columns, rows, failed stages, held cells, store events) of the latest run; or an error text."""
    from tasks.registry import STAGES
    from tasks.gates import describe

    db = history(args.store)
    try:
        with db.session(read_only=True):  # one connection for its half-dozen queries
            return _status_table(args, db, STAGES, describe)
    except FileNotFoundError as e:
        return str(e)


def _status_table(args, db, STAGES, describe):
    _, runs = db.query("SELECT run_id, sweep, status, started, finished, cells FROM runs ORDER BY started DESC LIMIT 1")
    if not runs:
        return f"no sweep has run on {args.store} yet"
    run_id, name, status, started, finished, cells = runs[0]
    _, stages = db.query("SELECT model, recipe, stage, status, cached, seconds, error FROM stages WHERE run_id = ?", [run_id])
    done = {(m, r, s): ("cached" if c else st, sec, err) for m, r, s, st, c, sec, err in stages}
    cells = json.loads(cells)
    ran = {(c["model"], c["recipe"]) for c in cells}
    held = {cell: describe(failed) for cell, failed in db.failed_gates().items() if cell in ran}
    for (m, r) in held:  # carded, and the card says it failed a gate
        if done.get((m, r, "publish"), ("",))[0] in ("done", "cached"):
            done[m, r, "publish"] = ("gated", *done[m, r, "publish"][1:])
    header = (f"sweep {name}  run {run_id}  {status}  started {started:%Y-%m-%d %H:%M:%S}"
              + (f"  took {(finished - started).total_seconds():.1f}s" if finished else ""))
    if all("stages" in c for c in cells):  # the stages each cell has (`qsweep publish`: publish only)
        shown = [s for s in STAGES if any(s in c["stages"] for c in cells)]
    else:  # a run recorded before runs listed them
        shown = [s for s in STAGES if s not in ("sensitivity", "reference", "fidelity") or any(k[2] == s for k in done)]
    rows = [[c["model"], c["recipe"]] + [done.get((c["model"], c["recipe"], s), ("pending",))[0]
                                         if s in c.get("stages", shown) else "-" for s in shown] for c in cells]
    errors = [(m, r, s, e) for (m, r, s), (st, _, e) in done.items() if st == "failed"]
    try:
        _, events = db.query("SELECT kind, stage, detail FROM events WHERE happened >= ? ORDER BY happened", [started])
    except Exception as e:  # a store last written before qsweep kept events
        if "events" not in str(e):
            raise
        events = []
    return header, ["model", "recipe", *shown], rows, errors, held, events


def cmd_status(args) -> int:
    found = status_table(args)
    if isinstance(found, str):
        return fail(found)
    header, columns, rows, errors, held, events = found
    if getattr(args, "format", "table") != "table":
        emit(columns, rows, args.format)
        return 1 if errors else 0
    print(header)
    print(console_table(columns, rows))
    for m, r, s, e in errors:
        print(f"\n{m}/{r} {s} failed: {e}")
    for (m, r), why in held.items():
        print(f"\n{m}/{r} failed its quality gates: {why}. A gated cell is held back from export and upload "
              "unless gates.allow in the sweep file or `qsweep publish --force-gated` lets it out")
    for kind, stage, detail in events:  # e.g. an artifact altered on disk, found and built again
        print(f"\nstore: {kind} {stage} artifact: {detail}")
    return 1 if errors else 0


def catalog(store: str | None = None) -> list[dict]:
    """The store's tables and views: name, kind, description (its DuckDB comment), columns [(name, type)].
    No store: the schema as this qsweep creates it, in memory (for --help). A store written by an older
    qsweep keeps its own columns, and gets today's descriptions where it has none."""
    import duckdb

    from storage.metrics import SCHEMA

    objects = ("SELECT name, kind, comment FROM (SELECT table_name AS name, 'table' AS kind, comment, table_oid AS oid "
               "FROM duckdb_tables() WHERE NOT internal AND schema_name = 'main' UNION ALL SELECT view_name, 'view', "
               "comment, view_oid FROM duckdb_views() WHERE NOT internal AND schema_name = 'main') ORDER BY kind, oid")
    columns = ("SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE NOT internal AND schema_name = 'main' "
               "ORDER BY column_index")
    with duckdb.connect() as con:  # in memory: ~30 ms
        con.execute(SCHEMA)
        found, cols = con.execute(objects).fetchall(), con.execute(columns).fetchall()
    now = {name: comment for name, _, comment in found}
    if store is not None:
        db = history(store)
        found, cols = db.query(objects)[1], db.query(columns)[1]
    order = list(now)  # SCHEMA's order: the tables, then the views
    found.sort(key=lambda o: (o[1] == "view", order.index(o[0]) if o[0] in order else len(order), o[0]))
    return [{"name": name, "kind": kind, "description": comment or now.get(name) or "",
             "columns": [(c, t) for table, c, t in cols if table == name]} for name, kind, comment in found]


def sql_epilog() -> str:
    """`qsweep sql -h`'s tables and views, made when the help is asked for (it reads DuckDB's comments)."""
    objects = catalog()
    width = max(len(o["name"]) for o in objects)
    lines = [f"  {o['name']:<{width}}  {o['kind'] + ': ' if o['kind'] == 'view' else ''}{o['description']}"
             for o in objects]
    return ("tables and views (`qsweep sql --schema` lists their columns):\n" + "\n".join(lines) + "\n\n"
            "examples:\n"
            "  qsweep sql \"SELECT model, recipe, task, value FROM latest_metrics WHERE metric = 'acc'\"\n"
            "  qsweep sql \"DESCRIBE metrics\"                 # one table's columns; SHOW TABLES lists them\n"
            "  qsweep sql - < query.sql                       # the statement from stdin\n"
            "  qsweep sql \"SELECT cells FROM runs\" --format json   # JSON columns come out as JSON")


def cmd_schema(args) -> int:
    try:
        objects = catalog(args.store)
    except FileNotFoundError as e:
        return fail(e)
    if args.format == "json":
        print(json.dumps([{**o, "columns": [{"name": c, "type": t} for c, t in o["columns"]]} for o in objects], indent=2))
    elif args.format == "csv":
        emit(["name", "kind", "column", "type", "description"],
             [[o["name"], o["kind"], c, t, o["description"]] for o in objects for c, t in o["columns"]], "csv")
    else:
        print(f"the tables and views of {history(args.store).path} (read-only to `qsweep sql`)")
        for o in objects:
            print(f"\n{o['name']} ({o['kind']}): {o['description']}")
            print("\n".join(f"  {c:<{max(len(c) for c, _ in o['columns'])}}  {t}" for c, t in o["columns"]))
    return 0


def json_columns(db, statement: str) -> set[int]:
    """Which columns of the statement's result are DuckDB JSON (runs.cells, runs.tools, ...): DESCRIBE says."""
    import duckdb

    try:
        _, described = db.query("DESCRIBE " + duckdb.extract_statements(statement)[0].query)
    except Exception:  # SHOW, EXPLAIN, ...: nothing to describe, and no JSON column either
        return set()
    return {i for i, row in enumerate(described) if row[1] == "JSON"}


def cmd_sql(args) -> int:
    if args.schema:
        return cmd_schema(args)
    if args.query is None:
        return fail("give one statement, `-` to read it from stdin, or --schema for the tables and views")
    query = sys.stdin.read() if args.query == "-" else args.query
    if query.lstrip().startswith("."):  # sqlite / duckdb shell habits: .tables, .schema
        return fail(f"{query.split()[0]} is a command of the duckdb shell, not SQL: `qsweep sql --schema` lists the "
                    "tables and views with their columns; in SQL, SHOW TABLES or DESCRIBE metrics")
    db = history(args.store)
    try:
        columns, rows = db.read(query)  # one statement that only reads (storage/metrics.py)
    except Exception as e:  # a refused statement or a SQL error is the user's to read, not a traceback
        return fail(e)
    emit(columns, rows, args.format, json_columns(db, query) if args.format == "json" else set())
    return 0


def cmd_compare(args) -> int:
    """Each recipe against a base recipe, per task: accuracy, difference, 95% interval, McNemar p."""
    from dataclasses import astuple, fields

    from flows.compare import compare_recipes
    from tasks.compare import Comparison, format_comparisons

    try:
        found = compare_recipes(args.store, args.base, args.alpha)
    except (FileNotFoundError, ValueError) as e:
        return fail(e)
    if not found:
        return fail(f"no model in {args.store} has benchmark samples for recipe {args.base!r}")
    if args.format != "table":
        emit(["model", *(f.name for f in fields(Comparison))],
             [[model, *astuple(c)] for model, rows in found.items() for c in rows], args.format)
        return 0
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
        return fail(e)
    if not written:
        return fail(f"no cell in {args.store} has been benchmarked yet")
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
        from flows.server import start_temporary_server

        start_temporary_server()  # dies with this process (flows/server.py)
        state = publish_sweep(sweep_file=str(args.sweep_file), store=store, force_gated=args.force_gated,
                              return_state=True)
    except SweepError as e:
        return fail(e)
    if not state.is_completed():
        return fail(state.message, 1)
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
        return fail(e)
    print("\n".join(str(f) for f in files))
    return 0


# --- recipes --------------------------------------------------------------------------------------

MODULE = re.compile(r"^(recipe '[^']*': )\S+( stays )")  # tasks/plan.py's Plan.warnings: one per fallback module


def summarised(warnings: list[str]) -> list[str]:
    """One line per distinct warning, module paths aside: the 181 modules of a model that stay in float
    for one reason are one line, the first of them named, with the count."""
    groups: dict[str, list[str]] = {}
    for w in warnings:
        groups.setdefault(MODULE.sub(r"\1<module>\2", w), []).append(w)
    return [ws[0] + (f" (and {len(ws) - 1} more modules alike)" if len(ws) > 1 else "") for ws in groups.values()]


def cmd_recipes(args) -> int:
    from tasks.plan import REFERENCE_SHAPES, reference_plan
    from tasks.recipes import builtin_recipes

    s = REFERENCE_SHAPES
    print(f"bits per weight estimated on a {s['layers']}-layer llama (hidden {s['hidden']}, vocab {s['vocab']}), "
          f"scales included; `qsweep recipes show NAME --model PATH` for a given model\n")
    # Where a module's width is not a multiple of the group size it stays in float (as mlx-lm leaves it),
    # which makes e.g. q4-g128 a 13.68 bpw estimate on hidden 576: say so, and what it is where widths divide.
    divides = {**s, "hidden": 512, "heads": 8, "kv_heads": 4}
    rows, footnotes = [], {}  # why modules fall back -> (mark, [(recipe, modules, of, bpw where widths divide)])
    for r in builtin_recipes().values():
        plan = reference_plan(r)
        why = "; ".join(sorted({p.note.split(": ", 1)[-1] for p in plan.fallbacks()}))
        mark = ""
        if why:
            mark = footnotes.setdefault(why, ("*" * (len(footnotes) + 1), []))[0]
            footnotes[why][1].append((r.name, len(plan.fallbacks()), len(plan.layers),
                                      reference_plan(r, divides).bits_per_weight()))
        rows.append([r.name, f"{plan.bits_per_weight():.2f}", mark, r.description])
    print(console_table(["recipe", "bpw", "", "what it does"], rows, right=("bpw",)))
    for why, (mark, recipes) in footnotes.items():
        _, fell, of, _ = recipes[0]
        print(f"\n{mark} on the reference shapes {fell} of {of} modules stay in float, and the estimate counts them so: "
              f"{why.replace('its input width', 'their input width')}. Where every width is a multiple of the group "
              f"size (hidden {divides['hidden']}): "
              + ", ".join(f"{name} {bpw:.2f}" for name, _, _, bpw in recipes))
    return 0


def cmd_recipes_show(args) -> int:
    """The per-module plan of a recipe (a built-in's name or a file) for a model, from its config alone."""
    from tasks.plan import format_plan, plan_for, reference_plan
    from tasks.recipes import RECIPE_DIR, RecipeError, get_recipe

    try:
        recipe = get_recipe(args.recipe)
        plan = plan_for(recipe, args.model) if args.model else reference_plan(recipe)
    except (RecipeError, ValueError, OSError) as e:
        return fail(e)
    builtin = RECIPE_DIR / f"{recipe.name}.yaml"
    print(f"recipe {recipe.name}: {recipe.description}" + (f"\n  (file to copy: {builtin})" if builtin.exists() else ""))
    print(f"model: {args.model or 'reference shapes (SmolLM2-135M)'}\n")
    print(format_plan(plan))
    for warning in summarised(plan.warnings()):
        print(f"qsweep: warning: {warning}", file=sys.stderr)
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
            status = fail(e)
            continue
        for warning in summarised(plan.warnings()) if plan else []:
            print(f"qsweep: warning: {path}: {warning}", file=sys.stderr)
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
    if args.worker_store:  # its flow runs (child processes) read it: this machine's store, whatever the run names
        os.environ["QSWEEP_WORKER_STORE"] = str(Path(args.worker_store).resolve())
    # heartbeats from its flow runs, as often as Prefect allows: a run whose machine dies is marked Crashed
    # once they stop (the sweep's rule, flows/stage.py ensure_zombie_rule) and its cell is run again
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    os.execv(sys.executable, cmd)


# --- the command line -----------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse with qsweep's error prefix, and an epilog that may be made only when the help is shown."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"qsweep: error: {message}\n")

    def format_help(self):
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


class Versions(argparse.Action):
    """--version: read from the installed packages' metadata, so that nothing heavy is imported."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the versions of qsweep and the tools it runs")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        lines = []
        for name in ("qsweep", "mlx", "mlx-lm", "lm-eval", "prefect", "duckdb"):
            try:
                lines.append(f"{name} {version(name)}")
            except PackageNotFoundError:
                lines.append(f"{name} not installed")
        print("\n".join(lines + [f"python {sys.version.split()[0]}"]))
        parser.exit(0)


def command(sub, name: str, about: str, example: str, store: bool = True, **kwargs):
    """A subcommand: `about` is its one line in `qsweep -h` and atop its own -h, `example` its epilog."""
    parents = [STORE] if store else []
    return sub.add_parser(name, parents=parents, help=about, description=about, formatter_class=FORMAT,
                          epilog=example if callable(example) else f"example:\n{example}", **kwargs)


FORMAT = argparse.RawDescriptionHelpFormatter
STORE = argparse.ArgumentParser(add_help=False)
STORE.add_argument("--store", default=argparse.SUPPRESS, help="artifact and metric store (default: $QSWEEP_STORE or ./.qsweep)")
FORMATS = dict(choices=("table", "csv", "json"), default="table", help="output format (default: table)")


def implicit_sweep_options(p) -> None:
    """What `qsweep quantize` and `qsweep search` both take beside their own: the implicit sweep's settings."""
    p.add_argument("--tasks", action="append", help="lm-eval tasks, comma-separated or repeated (default: a sweep file's)")
    p.add_argument("--limit", type=int, help="questions per task, a seeded random sample (default: all)")
    p.add_argument("--repo", help="upload to this hub repo, with {model} and {recipe} placeholders (needs a hub token)")
    p.add_argument("--name", help="the model's name in the store, cards and repos (default: the source's last path component)")
    p.add_argument("--trust-remote-code", action="store_true", help="let the model's own code (auto_map, *.py) run on loading")
    p.add_argument("-v", "--verbose", action="store_true", help="show the libraries' output live (else: the run's log file)")


def build_parser() -> Parser:
    parser = Parser(prog="qsweep", description=__doc__.splitlines()[0], formatter_class=FORMAT, epilog=(
        "examples:\n"
        "  qsweep quantize hf://HuggingFaceTB/SmolLM2-135M-Instruct --recipe qx65-hi   # one model: its card\n"
        "  qsweep run sweeps/tiny.yaml                        # a sweep file: models x recipes\n"
        "  qsweep status                                      # cells x stages of the latest run\n"
        "  qsweep sql --schema                                # what the metric history holds\n\n"
        f"`qsweep COMMAND -h` for each command's options and an example.\n\n{EXIT_CODES}"))
    parser.add_argument("--version", action=Versions)
    parser.add_argument("--store", default=default_store(), help="artifact and metric store (default: $QSWEEP_STORE or ./.qsweep)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = command(sub, "run", "run a sweep file: every model x recipe through every stage, then a card per cell",
                "  qsweep run sweeps/tiny.yaml --store .qsweep     # a one-minute look on a generated tiny model")
    p.add_argument("sweep_file", type=Path, help="the sweep file (YAML): models, recipes and stage settings")
    p.add_argument("--cells-on", metavar="DEPLOYMENT", help="send each cell to this deployment's workers (e.g. "
                   "cell/qsweep-cell; needs PREFECT_API_URL) instead of running it here")
    p.add_argument("-v", "--verbose", action="store_true", help="show the libraries' output live (else: the run's log file)")
    p.set_defaults(fn=cmd_run, prepare=load_or_refuse, blas=True)

    p = command(sub, "quantize", "one model through recipes: quantize, test, benchmark and card it (an implicit sweep)",
                "  qsweep quantize hf://HuggingFaceTB/SmolLM2-135M-Instruct --recipe qx65-hi --recipe q6 \\\n"
                "      --tasks arc_easy,hellaswag --limit 100 --repo my-org/{model}-{recipe}-mlx\n\n"
                "It writes the sweep file <store>/sweeps/<name>.yaml and runs it as `qsweep run` would: the same\n"
                "stages, store and cache, so running it again computes nothing; `qsweep status` and\n"
                "`qsweep publish <store>/sweeps/<name>.yaml` work on it later.")
    p.add_argument("source", help="hf://org/name[@revision], a local HF-layout directory, a llama, qwen2 or gemma3 .gguf file, or demo://tiny-llama")
    p.add_argument("--recipe", action="append", required=True,
                   help="a built-in recipe (`qsweep recipes` lists them) or a recipe file; repeat for several")
    implicit_sweep_options(p)
    p.set_defaults(fn=cmd_quantize, prepare=prepare_quantize, blas=True)

    p = command(sub, "search", "find the recipe for a size budget: measured sensitivity, an exact solve, then measured",
                "  qsweep search demo://smollm2-135m-instruct --bpw 4.5 --bpw 5.5 --tasks arc_easy --limit 40 --out recipes/\n\n"
                "Each module's KL cost per format is measured on a calibration text (once per model, cached), the\n"
                "formats that minimise the predicted KL within each budget are chosen exactly (a knapsack), and each\n"
                "found recipe (auto-<budget>) is quantized, benchmarked and compared with the fidelity corpus, as\n"
                "a cell of the implicit sweep <store>/sweeps/<name>-search.yaml. The recipe file is beside its model\n"
                "(<store>/published/<model>-auto-<budget>-mlx/recipe.yaml) and, with --out, copied there.")
    p.add_argument("source", help="hf://org/name[@revision], a local HF-layout directory, a llama, qwen2 or gemma3 .gguf file, or demo://tiny-llama")
    p.add_argument("--bpw", type=float, action="append", help="a budget in bits per weight over the quantizable modules, "
                   "scales included (as `qsweep recipes show`); repeat for several")
    p.add_argument("--bytes", type=int, action="append", help="a budget in bytes of the quantizable modules; repeatable")
    p.add_argument("--formats", action="append", help="what a module may take, comma-separated: q2g32 ... q8g128, mxfp4, "
                   "nvfp4, mxfp8, float (default: all)")
    p.add_argument("--calibration", help="the text sensitivity is measured on (default: qsweep:data/calibration.txt); "
                   "never the fidelity corpus")
    p.add_argument("--out", help="copy the found recipe files here: a folder, or a .yaml file for one budget")
    implicit_sweep_options(p)
    p.set_defaults(fn=cmd_search, prepare=prepare_search, blas=True)

    p = command(sub, "status", "cells x stages of the latest run: done, cached, failed, gated or pending",
                "  qsweep status --format json")
    p.add_argument("--format", **FORMATS)
    p.set_defaults(fn=cmd_status)

    p = command(sub, "sql", "query the metric history: one read-only statement on the store's tables", sql_epilog)
    p.add_argument("query", nargs="?", help="one SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN statement; - reads it from stdin")
    p.add_argument("--schema", action="store_true", help="list the tables and views with their columns, and exit")
    p.add_argument("--format", **FORMATS)
    p.set_defaults(fn=cmd_sql)

    p = command(sub, "compare", "each recipe against a base recipe, per task: which differences are real",
                "  qsweep compare --base bf16 --alpha 0.01 --format csv")
    p.add_argument("--base", default="bf16", help="the recipe to compare against (default: bf16)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (default: 0.05)")
    p.add_argument("--format", **FORMATS)
    p.set_defaults(fn=cmd_compare)

    p = command(sub, "cards", "write every model card the store can make now", "  qsweep cards --out cards/")
    p.add_argument("--out", help="folder for the cards (default: <store>/cards)")
    p.set_defaults(fn=cmd_cards)

    p = command(sub, "publish", "publish a sweep's measured cells: export folders and hub upload; measures nothing",
                "  qsweep publish sweeps/demo.yaml --dry-run       # what it would send; no token needed")
    p.add_argument("sweep_file", type=Path, help="the sweep file whose cells to publish")
    p.add_argument("--dry-run", action="store_true", help="print the operations it would send; send nothing, no token needed")
    p.add_argument("--force-gated", action="store_true",
                   help="also export and upload cells that failed a quality gate (their cards still say so)")
    p.set_defaults(fn=cmd_publish, blas=True)

    p = command(sub, "report", "accuracy table, Pareto plots and metric history as one HTML page, or Markdown",
                "  qsweep report --out report/ --format md")
    p.add_argument("--out", help="folder for the report (default: <store>/report)")
    p.add_argument("--format", choices=("html", "md"), default="html", help="html (one self-contained page) or md (default: html)")
    p.set_defaults(fn=cmd_report)

    p = command(sub, "recipes", "the built-in recipes with a bits-per-weight estimate; `show` a plan, `check` files",
                "  qsweep recipes\n  qsweep recipes show qx86-hi --model demo://tiny-llama\n"
                "  qsweep recipes check my-recipe.yaml --model path/to/model", store=False)
    p.set_defaults(fn=cmd_recipes)
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    v = command(verbs, "show", "the per-module plan of a recipe for a model, from its config alone (no weights)",
                "  qsweep recipes show q4-g128 --model demo://tiny-llama", store=False)
    v.add_argument("recipe", help="a built-in's name or a recipe file")
    v.add_argument("--model", help="a model directory, a .gguf file or demo://... (default: reference shapes)")
    v.set_defaults(fn=cmd_recipes_show)
    v = command(verbs, "check", "validate recipe files; with --model, resolve them for it",
                "  qsweep recipes check my-q4.yaml --model demo://tiny-llama", store=False)
    v.add_argument("files", nargs="+", type=Path, help="recipe files (YAML or TOML)")
    v.add_argument("--model", help="also resolve them for this model: rules matching nothing, fallbacks")
    v.set_defaults(fn=cmd_recipes_check)

    p = command(sub, "worker", "start a Prefect worker for the deployments in prefect.yaml",
                "  qsweep worker --name w1 --limit 2", store=False)
    p.add_argument("--pool", default="qsweep", help="the work pool (default: qsweep; created if missing)")
    p.add_argument("--name", help="the worker's name (default: Prefect's)")
    p.add_argument("--limit", type=int, help="most flow runs at once (default: no limit)")
    p.add_argument("--store", dest="worker_store", metavar="PATH", help="this machine's own store for the runs it takes, instead of the store each run names "
                   "(for machines that share artifacts through QSWEEP_MIRROR)")
    p.set_defaults(fn=cmd_worker, blas=True)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if (prepare := getattr(args, "prepare", None)) and (refused := prepare(args)):
        return refused
    if refused := refuse_unwritable(args):
        return refused
    if getattr(args, "blas", False):  # a command that runs models: mlx must load (a CUDA build needs a driver)
        from tasks.loading import unrunnable_mlx

        if why := unrunnable_mlx():
            return fail(why, 1)
    if argv is None and getattr(args, "blas", False):  # a real command line that runs models: a real BLAS first
        from flows.blas import reexec_with_blas  # (flows/blas.py); it asks mlx whether a GPU does the matmuls

        reexec_with_blas("-m", "flows.cli")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
