import csv
import io
import json

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
    assert main(["recipes", "check", str(good), str(bad), str(typo), "--model", str(tiny_model)]) == 1
    captured = capsys.readouterr()
    assert f"{good}: ok (good)" in captured.out and f"{typo}: ok (typo)" in captured.out
    assert "group_size 48 is not allowed for mode affine; allowed: 32, 64, 128" in captured.err
    assert "rules[0] (match 'self_atn') matches no module" in captured.err
    assert "model.layers.0.self_attn.q_proj stays bfloat16: its input width 64 is not a multiple of group size 128" in captured.err
