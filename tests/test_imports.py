"""What a command imports: listing recipes, --help and refusing a bad sweep file must not wait for mlx or lm-eval.

Each case runs qsweep in a fresh interpreter with `python -X importtime`, which names every module the
process imports, so nothing imported earlier by the test session can hide an import.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("mlx", "mlx_lm", "lm_eval")


def imported(*args: str, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime ARGS`; its result and the top-level packages it imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
             if line.startswith("import time:") and "|" in line}
    assert "flows" in names, done.stderr[-2000:]  # -X importtime did report
    return done, names


def test_listing_recipes_imports_neither_mlx_nor_lm_eval():
    done, names = imported("-m", "flows.cli", "recipes")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "qx86-hi" in done.stdout and "gptq-4" in done.stdout
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


def test_run_help_imports_neither_mlx_nor_lm_eval():
    done, names = imported("-m", "flows.cli", "run", "--help")
    assert done.returncode == 0 and "sweep_file" in done.stdout, done.stderr[-2000:]
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


GOOD = {"name": "x", "models": [{"name": "m", "source": "demo://tiny-llama"}], "recipes": ["q4"]}


@pytest.mark.parametrize("change, says", [
    ({"recipes": ["q4", "q7"]}, "recipes[1]: unknown recipe 'q7'; allowed: bf16"),
    ({"recipes": [{"name": "odd", "bits": 7}]}, "bits 7 is not allowed for mode affine; allowed: 2, 3, 4, 5, 6, 8"),
    ({"benchmark": {"limt": 5}}, "benchmark.limt: unknown key; allowed keys: tasks, limit"),
], ids=["unknown-recipe", "bits-7", "unknown-key"])
def test_a_bad_sweep_file_is_refused_without_mlx_or_lm_eval(tmp_path, change, says):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(yaml.safe_dump({**GOOD, **change}))
    done, names = imported("-m", "flows.cli", "--store", str(tmp_path / "store"), "run", str(sweep))
    assert done.returncode == 2 and says in done.stderr, done.stderr[-2000:]
    assert not names & set(HEAVY), sorted(names & set(HEAVY))
    assert not (tmp_path / "store").exists()


def test_validating_a_good_sweep_file_imports_neither_mlx_nor_lm_eval(tmp_path):
    sweep = tmp_path / "good.yaml"
    sweep.write_text(yaml.safe_dump({**GOOD, "recipes": ["q4", "qx86-hi", {"name": "mine", "bits": 6}]}))
    done, names = imported("-c", f"from flows.config import load_sweep; print(len(load_sweep({str(sweep)!r})[0].recipes))")
    assert done.returncode == 0 and done.stdout.split() == ["3"], done.stderr[-2000:]
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


def test_importing_recipes_reads_no_recipe_file_until_one_is_asked_for():
    code = ("import tasks.recipes as r; before = r.builtin_recipes.cache_info().currsize; "
            "r.get_recipe('q4'); print(before, r.builtin_recipes.cache_info().currsize, len(r.BUILTINS))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    before, after, count = map(int, done.stdout.split())
    assert (before, after) == (0, 1) and count == len(list((ROOT / "tasks" / "data" / "recipes").glob("*.yaml")))
