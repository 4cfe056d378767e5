import csv
import importlib.metadata
import io
import json
import re
import sys
from dataclasses import asdict

import duckdb
import pytest
import yaml

from flows.cli import main
from storage.metrics import MetricStore
from tasks.recipes import BUILTINS


@pytest.fixture
def store(tmp_path):
    db = MetricStore(tmp_path / "metrics.duckdb")
    db.start_run("r1", "demo", "sweeps/demo.yaml", "abc", "host", {"mlx": "x"}, [{"model": "m", "recipe": "q4"}])
    db.record_metrics("r1", "m", "q4", "benchmark", "k1", [
        {"task": "arc", "metric": "acc", "value": 0.5, "stderr": 0.1, "n": 10},
        {"task": "arc", "metric": "acc_norm", "value": 0.6, "stderr": 0.1, "n": 10},
    ])
    db.record_stage("r1", "m", "q4", "download", "k0", "done", False, 1.0)
    db.finish_run("r1", "completed")
    return tmp_path


def test_sql_formats(store, capsys):
    query = "SELECT recipe, metric, value FROM metrics ORDER BY metric"
    assert main(["--store", str(store), "sql", query]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["recipe", "metric", "value"] and table[2].split() == ["q4", "acc", "0.5"]

    assert main(["--store", str(store), "sql", query, "--format", "csv"]) == 0
    assert list(csv.reader(io.StringIO(capsys.readouterr().out)))[1:] == [["q4", "acc", "0.5"], ["q4", "acc_norm", "0.6"]]

    assert main(["--store", str(store), "sql", query, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[1] == {"recipe": "q4", "metric": "acc_norm", "value": 0.6}


def test_sql_table_keeps_each_row_on_one_line_off_a_terminal(store, capsys):
    """Captured or piped, a table is never wrapped to 80 columns, and a cell is shown as written, not as markup."""
    long = "x" * 150
    assert main(["--store", str(store), "sql", f"SELECT '{long}' AS wide, '[bold]q4[/bold]' AS markup, 0.5 AS value"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[2].split() == [long, "[bold]q4[/bold]", "0.5"]
    assert all(line == line.rstrip() for line in lines)


def test_sql_is_read_only(store, capsys):
    assert main(["--store", str(store), "sql", "DELETE FROM metrics"]) == 2
    assert "read-only" in capsys.readouterr().err.lower()
    assert main(["--store", str(store), "sql", "SELECT count(*) AS n FROM metrics"]) == 0
    assert capsys.readouterr().out.split()[-1] == "2"


def test_status_shows_done_and_pending(store, capsys):
    main(["--store", str(store), "status"])
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("m "))
    assert line.split() == ["m", "q4", "done", "pending", "pending", "pending", "pending"]


def test_status_and_sql_without_a_store_say_so(tmp_path, capsys):
    assert main(["--store", str(tmp_path / "none"), "status"]) == 2
    assert "run a sweep first" in capsys.readouterr().err


def test_recipes_lists_every_builtin_with_bits_per_weight(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in BUILTINS:
        assert any(line.split()[:1] == [name] and float(line.split()[1]) > 2 for line in out.splitlines()), name


def test_run_refuses_bad_input_before_any_work(tmp_path, capsys):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(yaml.safe_dump({"name": "x", "models": [{"name": "m", "source": str(tmp_path / "missing")}],
                                     "recipes": ["q4", {"name": "odd", "bits": 7, "group_size": 48}]}))
    assert main(["--store", str(tmp_path / "store"), "run", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert "recipes[1]" in err and "allowed: 2, 3, 4, 5, 6, 8" in err
    assert not (tmp_path / "store").exists()

    sweep.write_text(yaml.safe_dump({"name": "x", "models": [{"name": "m", "source": str(tmp_path / "missing")}],
                                     "recipes": ["q4"]}))
    assert main(["--store", str(tmp_path / "store"), "run", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert "models[0].source" in err and "hf://org/name" in err
    assert not (tmp_path / "store").exists()


def test_run_refuses_an_unknown_benchmark_task(tmp_path, tiny_model, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "x", "models": [{"name": "m", "source": str(tiny_model)}],
                                     "recipes": ["q4"], "benchmark": {"tasks": ["no_such_task", "hellaswg"]}}))
    assert main(["--store", str(tmp_path / "store"), "run", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert "benchmark.tasks: unknown task no_such_task, hellaswg" in err and "qsweep_demo_mc" in err
    assert "did you mean" in err and "hellaswag" in err.split("did you mean")[1].split("?")[0]
    assert not (tmp_path / "store").exists()


def test_recipes_show_prints_the_plan_for_a_model(tiny_model, capsys):
    assert main(["recipes", "show", "qx86-hi", "--model", str(tiny_model)]) == 0
    out = capsys.readouterr().out
    assert "recipe qx86-hi" in out and "qx86-hi.yaml" in out  # where to copy it from
    lines = {tuple(line.split()[:2]): line for line in out.splitlines() if "proj" in line or "embed" in line}
    assert "8-bit affine g32" in lines[("0-3", "self_attn.q_proj")]
    assert "6-bit affine g32" in lines[("0-3", "mlp.down_proj")]
    assert "bits per weight" in out


def test_recipes_show_names_a_bad_recipe(capsys):
    assert main(["recipes", "show", "q7"]) == 2
    assert "unknown recipe 'q7'" in capsys.readouterr().err


def test_recipes_check_validates_files_and_warns_for_a_model(tiny_model, tmp_path, capsys):
    good, bad, typo = tmp_path / "good.yaml", tmp_path / "bad.yaml", tmp_path / "typo.yaml"
    good.write_text("name: good\nbits: 4\nrules:\n  - match: lm_head\n    bits: 8\n")
    bad.write_text("name: bad\nbits: 4\ngroup_size: 48\n")
    typo.write_text("name: typo\nbits: 4\nrules:\n  - match: self_atn\n    bits: 8\n"
                    "  - match: q_proj\n    group_size: 128\n")
    assert main(["recipes", "check", str(good), str(bad), str(typo), "--model", str(tiny_model)]) == 2  # bad input
    captured = capsys.readouterr()
    assert f"{good}: ok (good)" in captured.out and f"{typo}: ok (typo)" in captured.out
    assert "group_size 48 is not allowed for mode affine; allowed: 32, 64, 128" in captured.err
    assert "rules[0] (match 'self_atn') matches no module" in captured.err
    assert "model.layers.0.self_attn.q_proj stays bfloat16: its input width 64 is not a multiple of group size 128" in captured.err


# --- a CLI that explains itself -------------------------------------------------------------------

def run(capsys, *argv) -> tuple[int, str, str]:
    """main(argv) as the shell sees it: exit code (argparse's own exits too), stdout, stderr."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_version_names_qsweep_and_the_tools_it_runs(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0
    said = dict(line.split(" ", 1) for line in out.splitlines())
    for name in ("qsweep", "mlx", "mlx-lm", "lm-eval", "prefect", "duckdb"):
        assert said[name] == importlib.metadata.version(name), name


def test_version_and_help_import_neither_mlx_nor_lm_eval():
    from test_imports import HEAVY, imported

    for args in (["--version"], ["sql", "-h"], ["quantize", "-h"]):
        done, names = imported("-m", "flows.cli", *args)
        assert done.returncode == 0, done.stderr[-2000:]
        assert not names & set(HEAVY), (args, sorted(names & set(HEAVY)))


COMMANDS = ["run", "quantize", "status", "sql", "compare", "cards", "publish", "report", "recipes", "worker"]


@pytest.mark.parametrize("command", COMMANDS + ["recipes show", "recipes check"])
def test_every_command_says_what_it_does_its_options_and_an_example(command, capsys):
    code, out, _ = run(capsys, *command.split(), "-h")
    assert code == 0
    description = out.split("\n\n")[1]
    assert description and "\n" not in description.strip(), out  # one line under the usage
    options = out.split("options:\n", 1)[1].split("\n\n")[0]
    for flag in re.findall(r"^  (--?[\w-]+)", options, re.M):
        assert re.search(rf"^  {flag}\b.*\S.*\S", options, re.M) or flag == "-h", (flag, options)
    assert re.search(r"^examples?:\n  qsweep ", out, re.M), out
    top = run(capsys, "-h")[1]
    if " " not in command:
        assert re.search(rf"^    {command} +{re.escape(description.strip()[:30])}", top, re.M), top


def test_sql_help_names_every_table_and_view_with_its_description(store, capsys):
    code, out, _ = run(capsys, "sql", "-h")
    assert code == 0
    with duckdb.connect(str(store / "metrics.duckdb"), read_only=True) as con:
        described = con.execute("SELECT table_name, comment FROM duckdb_tables() UNION ALL "
                                "SELECT view_name, comment FROM duckdb_views() WHERE NOT internal").fetchall()
    assert len(described) >= 8
    for name, comment in described:
        assert re.search(rf"^  {name} +(view: )?{re.escape(comment or '')}$", out, re.M), (name, out)
    assert "SHOW TABLES" in out and "--schema" in out


def test_sql_schema_lists_tables_and_views_with_their_columns(store, capsys):
    code, out, err = run(capsys, "--store", str(store), "sql", "--schema")
    assert code == 0 and err == ""
    with duckdb.connect(str(store / "metrics.duckdb"), read_only=True) as con:
        for name, in con.execute("SELECT table_name FROM duckdb_tables() UNION ALL "
                                 "SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall():
            block = out.split(f"\n{name} (", 1)[1].split("\n\n")[0]
            for column, kind, *_ in con.execute(f"DESCRIBE {name}").fetchall():
                assert re.search(rf"^  {column} +{re.escape(kind)}$", block, re.M), (name, column, block)
    code, out, _ = run(capsys, "--store", str(store), "sql", "--schema", "--format", "json")
    schema = {o["name"]: o for o in json.loads(out)}
    assert {"name": "cells", "type": "JSON"} in schema["runs"]["columns"] and schema["latest_metrics"]["kind"] == "view"


def test_sql_schema_without_a_store_says_so(tmp_path, capsys):
    code, out, err = run(capsys, "--store", str(tmp_path / "none"), "sql", "--schema")
    assert code == 2 and out == ""
    assert err.startswith("qsweep: error: no metric history at") and "run a sweep first" in err
    assert not (tmp_path / "none").exists()


def test_sql_reads_the_statement_from_stdin(store, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("SELECT count(*) AS n\nFROM metrics;\n"))
    code, out, _ = run(capsys, "--store", str(store), "sql", "-", "--format", "csv")
    assert code == 0 and out.splitlines() == ["n", "2"]


def test_sql_json_gives_json_columns_as_json(store, capsys):
    code, out, _ = run(capsys, "--store", str(store), "sql", "SELECT sweep, cells, tools FROM runs", "--format", "json")
    assert code == 0
    assert json.loads(out) == [{"sweep": "demo", "cells": [{"model": "m", "recipe": "q4"}], "tools": {"mlx": "x"}}]
    code, out, _ = run(capsys, "--store", str(store), "sql", "SELECT cells::VARCHAR AS text FROM runs", "--format", "json")
    assert isinstance(json.loads(out)[0]["text"], str)  # a string stays a string


@pytest.mark.parametrize("command", [".tables", ".schema metrics"])
def test_a_shell_dot_command_points_at_schema_and_show_tables(store, command, capsys):
    code, out, err = run(capsys, "--store", str(store), "sql", command)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"qsweep: error: {command.split()[0]} is a command of the duckdb shell, not SQL")
    assert "--schema" in err and "SHOW TABLES" in err


def test_status_formats(store, capsys):
    code, table, _ = run(capsys, "--store", str(store), "status")
    header, *rows = [line.split() for line in table.splitlines()[1:] if line.strip() and not line.startswith("─")]
    assert code == 0
    code, out, _ = run(capsys, "--store", str(store), "status", "--format", "csv")
    assert list(csv.reader(io.StringIO(out))) == [header, *rows]
    code, out, _ = run(capsys, "--store", str(store), "status", "--format", "json")
    assert json.loads(out) == [dict(zip(header, r)) for r in rows]


def test_compare_formats(tmp_path, capsys):
    from flows.compare import compare_recipes

    db = MetricStore(tmp_path / "metrics.duckdb")
    db.start_run("r1", "demo", "demo.yaml", "abc", "host", {}, [{"model": "m", "recipe": r} for r in ("bf16", "q4")])
    for recipe, right in (("bf16", range(0, 14)), ("q4", range(4, 16))):  # the questions each answers right
        key = f"bench-{recipe}"
        db.record_stage("r1", "m", recipe, "benchmark", key, "done", False, 1.0)
        db.record_metrics("r1", "m", recipe, "benchmark", key, [{"task": "arc", "metric": "acc", "value": len(right) / 20,
                                                                 "n": 20, "backend": "fp32", "data": "d"}])
        db.record_samples("m", recipe, key, [{"task": "arc", "doc_id": i, "target": 0, "chosen": 0 if i in right else 1,
                                              "correct": i in right, "correct_norm": i in right, "logliks": [0.0, -1.0]}
                                             for i in range(20)])
    expected = [{"model": "m", **asdict(c)} for c in compare_recipes(str(tmp_path), "bf16")["m"]]
    code, out, _ = run(capsys, "--store", str(tmp_path), "compare", "--format", "json")
    assert code == 0 and json.loads(out) == expected and expected[0]["recipe"] == "q4"
    code, out, _ = run(capsys, "--store", str(tmp_path), "compare", "--format", "csv")
    got = list(csv.DictReader(io.StringIO(out)))
    assert list(got[0]) == list(expected[0]) and got[0]["recipe"] == "q4" and float(got[0]["diff"]) == expected[0]["diff"]
    code, out, _ = run(capsys, "--store", str(tmp_path), "compare")
    assert code == 0 and "arc: each recipe against bf16" in out


@pytest.mark.parametrize("argv, says", [
    (["sql", "SELECT 1", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
    (["quantize", "demo://tiny-llama"], "the following arguments are required: --recipe"),
    (["recipes", "show"], "the following arguments are required: recipe"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
])
def test_a_usage_error_exits_2_with_the_one_prefix(argv, says, capsys):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith(f"qsweep: error: {says}"), err


@pytest.mark.parametrize("argv, says", [
    (["sql", "SELECT nope FROM metrics"], "Binder Error"),
    (["sql", "DELETE FROM metrics"], "DELETE is not allowed: qsweep sql is read-only"),
    (["sql"], "give one statement, `-` to read it from stdin, or --schema"),
    (["compare", "--base", "q9"], "no model in"),
    (["recipes", "show", "q7"], "unknown recipe 'q7'"),
])
def test_bad_input_exits_2_and_every_error_line_has_the_one_prefix(store, argv, says, capsys):
    code, out, err = run(capsys, "--store", str(store), *argv)
    assert code == 2 and out == "" and err.startswith("qsweep: error: ") and says in err.splitlines()[0], err


def test_a_failed_cell_exits_1(store, capsys):
    MetricStore(store / "metrics.duckdb").record_stage("r1", "m", "q4", "quantize", "k1", "failed", False, 1.0, "OOM")
    code, out, _ = run(capsys, "--store", str(store), "status")
    assert code == 1 and "m/q4 quantize failed: OOM" in out


def test_recipes_show_summarises_repeated_warnings_once_with_a_count(tiny_model, capsys):
    from tasks.plan import plan_for
    from tasks.recipes import get_recipe

    fallbacks = plan_for(get_recipe("q4-g128"), tiny_model).fallbacks()
    assert len(fallbacks) > 2
    code, out, err = run(capsys, "recipes", "show", "q4-g128", "--model", str(tiny_model))
    assert code == 0 and out.count("fallback") >= 1
    [line] = err.splitlines()  # one reason, one line
    assert line.startswith(f"qsweep: warning: recipe 'q4-g128': {fallbacks[0].path} {fallbacks[0].note}")
    assert line.endswith(f"(and {len(fallbacks) - 1} more modules alike)")


def test_recipes_marks_estimates_that_fall_back_and_says_why(capsys):
    from tasks.plan import REFERENCE_SHAPES, reference_plan

    code, out, _ = run(capsys, "recipes")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in BUILTINS}
    marked = {name for name, cols in rows.items() if cols[2] == "*"}
    assert marked == {name for name, r in BUILTINS.items() if reference_plan(r).fallbacks()} and "q4-g128" in marked
    footnote = next(line for line in out.splitlines() if line.startswith("* "))
    plan = reference_plan(BUILTINS["q4-g128"])
    assert f"{len(plan.fallbacks())} of {len(plan.layers)} modules stay in float" in footnote
    assert f"input width {REFERENCE_SHAPES['hidden']} is not a multiple of the recipe's group size 128" in footnote
    assert re.search(r"q4-g128 4\.\d\d", footnote)  # what it is where the widths divide
