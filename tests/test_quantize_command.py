"""`qsweep quantize SOURCE --recipe ...`: one model, one command. It writes an implicit sweep into the
store and runs it as `qsweep run` runs a sweep file: same stages, store and cache."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_runs import qsweep

from flows.cli import main, model_name
from tasks.recipes import BUILTINS
from tasks.specs import SAFE_NAME

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("source, name", [
    ("hf://HuggingFaceTB/SmolLM2-135M-Instruct@main", "SmolLM2-135M-Instruct"),
    ("/models/llama 3 (8B)/", "llama-3-8B"),
    ("~/gguf/SmolLM2-135M.Q8_0.gguf", "SmolLM2-135M.Q8_0"),
    ("demo://tiny-llama", "tiny-llama"),
    ("./.hidden", "hidden"),
])
def test_the_model_name_is_the_sources_last_path_component_made_safe(source, name):
    assert model_name(source) == name and re.fullmatch(SAFE_NAME, name)


def test_a_bad_recipe_name_exits_2_naming_recipes_and_the_allowed_ones(tmp_path):
    store = tmp_path / "store"
    done = subprocess.run([sys.executable, "-m", "flows.cli", "--store", str(store), "quantize", "demo://tiny-llama",
                           "--recipe", "q4", "--recipe", "q7"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.startswith("qsweep: error: qsweep quantize: invalid options"), done.stderr
    assert "recipes[1]: unknown recipe 'q7'; allowed: " + ", ".join(BUILTINS) in done.stderr
    assert not store.exists()  # refused before anything is written


@pytest.mark.parametrize("argv, says", [
    (["--recipe", "q4", "--recipe", "q6", "--repo", "me/tiny-mlx"], "publish.repo: 'me/tiny-mlx' lacks {recipe}"),
    (["--recipe", "q4", "--limit", "0"], "benchmark.limit: Input should be greater than or equal to 1"),
    (["--recipe", "q4", "--name", "../up"], "models[0].name: '../up': letters, digits"),
])
def test_other_bad_options_name_their_field(tmp_path, argv, says, capsys):
    assert main(["--store", str(tmp_path / "store"), "quantize", "demo://tiny-llama", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qsweep: error: ") and says in err, err
    assert not (tmp_path / "store").exists()


def test_quantize_runs_an_implicit_sweep_prints_the_card_and_reruns_cached(tiny_model, tmp_path):
    store, home = tmp_path / "store", tmp_path / "prefect"
    argv = ["quantize", tiny_model, "--recipe", "q4", "--limit", "4", "--name", "tiny"]
    first = qsweep(store, *argv, prefect_home=home)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    [line] = [line for line in first.stdout.splitlines() if line.startswith("tiny/q4: ") and "card: " in line]
    card = Path(re.search(r"card: (\S+/README\.md)", line).group(1))
    assert card.is_file() and card.parent.name == "tiny-q4-mlx", line
    assert card.parent.parent in (store.resolve() / "published", store.resolve() / "gated")
    assert ("held back by its quality gates" in line) == (card.parent.parent.name == "gated")

    sweep_file = store / "sweeps" / "tiny.yaml"  # `qsweep run` / `publish` / `status` can use it later
    assert yaml.safe_load(sweep_file.read_text()) == {"name": "tiny", "models": [{"name": "tiny", "source": str(tiny_model)}],
                                                     "recipes": ["q4"], "benchmark": {"limit": 4}}
    assert f"sweep file: {sweep_file.resolve()}" in first.stdout

    again = qsweep(store, *argv, prefect_home=home)
    assert again.returncode == 0, again.stderr[-3000:]
    assert line in again.stdout.splitlines()
    last_run = "SELECT stage, cached FROM stages WHERE run_id = (SELECT run_id FROM runs ORDER BY started DESC LIMIT 1)"
    read = qsweep(store, "sql", last_run, "--format", "json", prefect_home=home)
    stages = json.loads(read.stdout)
    assert len(stages) == 7 and all(s["cached"] for s in stages), stages
