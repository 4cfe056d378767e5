"""Faults a new user meets on the way in, done for real through `qsweep`: a store on a read-only
filesystem, a model folder whose safetensors file was cut short (copied, or downloaded from a hub),
a model folder without weights, an empty sweep file and one that is a YAML list. Each is one line
that names what is wrong, and nothing is stored."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_runs import qsweep, write_sweep

from flows.cli import main
from hub_server import COMMIT, FakeHub

REPO = Path(__file__).resolve().parents[1]


def sweep_file(tmp_path: Path, source, recipes=("bf16", "q4")) -> Path:
    return write_sweep(tmp_path / "sweep.yaml", {"tiny": source}, recipes=list(recipes), fidelity={"enabled": False},
                       gates={"max_kl_mean": None, "max_ppl_ratio": None})


def cli(capsys, *argv) -> tuple[int, str, str]:
    """`qsweep ARGV` in this process: exit code, stdout, stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# --- a store on a read-only filesystem ------------------------------------------------------------

def _mount_namespace() -> str:
    """unshare, where a mount namespace of our own can be made (as root, or in a user namespace)."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode == 0:
        return unshare
    why = "no mount namespace here (unshare -rm) to make a read-only filesystem in"
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def read_only(folder: Path, *argv, prefect_home: Path) -> subprocess.CompletedProcess:
    """`qsweep ARGV` with `folder` on a read-only filesystem: a bind mount remounted ro, in a mount namespace
    that ends with the command (chmod would not stop root). Outside it the folder stays writable."""
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    cmd = [_mount_namespace(), "-rm", "sh", "-c", script, "sh", str(folder), sys.executable, "-m", "flows.cli",
           *map(str, argv)]
    env = {**os.environ, "PREFECT_HOME": str(prefect_home)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def tree(folder: Path) -> list:
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def measured(tiny_model, tmp_path_factory):
    """A store with history: the tiny model through bf16 and q4, run as a user runs it."""
    _mount_namespace()  # skip before the sweep where no read-only filesystem can be made
    tmp = tmp_path_factory.mktemp("measured")
    done = qsweep(tmp / "store", "run", sweep_file(tmp, tiny_model), prefect_home=tmp / "prefect")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "store", tmp / "sweep.yaml", tiny_model


WRITERS = {  # a command that writes into the store -> its arguments (S: the sweep file, M: the model folder)
    "run": ["run", "S"], "run --store after": ["run", "S", "--store", None], "quantize": ["quantize", "M", "--recipe", "q4"],
    "search": ["search", "M", "--bpw", "4.5"], "publish": ["publish", "S"], "cards": ["cards"], "report": ["report"],
}


@pytest.mark.parametrize("command", WRITERS)
def test_a_command_that_writes_refuses_a_read_only_store_in_one_line(measured, command, tmp_path):
    store, sweep, model = measured
    before = tree(store)
    argv = [{"S": sweep, "M": model, None: store}.get(a, a) for a in WRITERS[command]]
    done = read_only(store, "--store", store, *argv, prefect_home=tmp_path / "prefect")
    name, hint = argv[0], "--store (or --out)" if argv[0] in ("cards", "report") else "--store"
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"qsweep: error: store {store} is on a read-only filesystem; qsweep {name} writes there: "
                           f"give {hint} a writable folder\n")
    assert tree(store) == before


def test_commands_that_only_read_work_on_a_read_only_store(measured, tmp_path):
    store, sweep, _ = measured
    ro = lambda *argv: read_only(store, "--store", store, *argv, prefect_home=tmp_path / "prefect")
    before = tree(store)
    status = ro("status")
    assert status.returncode == 0, status.stderr
    cells = [line.split() for line in status.stdout.splitlines() if line.startswith("tiny ")]
    assert [c[1] for c in cells] == ["bf16", "q4"] and {s for c in cells for s in c[2:]} <= {"done", "cached"}, status.stdout
    sql = ro("sql", "SELECT count(DISTINCT recipe) AS n FROM latest_metrics", "--format", "csv")
    assert (sql.returncode, sql.stdout.split()) == (0, ["n", "2"]), sql.stderr
    for argv in (["sql", "--schema"], ["compare"], ["publish", sweep, "--dry-run"],
                 ["report", "--out", tmp_path / "report"], ["cards", "--out", tmp_path / "cards"]):
        done = ro(*argv)
        assert done.returncode == 0 and "error" not in done.stderr, (argv, done.stderr[-2000:])
    assert (tmp_path / "report" / "report.html").is_file() and list((tmp_path / "cards").glob("*/README.md"))
    assert tree(store) == before


def test_a_store_under_a_read_only_folder_and_an_out_folder_there_are_named(tiny_model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    sweep = sweep_file(tmp_path, tiny_model)
    done = read_only(locked, "--store", locked / "store", "run", sweep, prefect_home=tmp_path / "prefect")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"qsweep: error: store {locked}/store cannot be made: {locked} is on a read-only filesystem; "
                           "qsweep run writes there: give --store a writable folder\n")
    done = read_only(locked, "--store", tmp_path / "store", "report", "--out", locked / "report",
                     prefect_home=tmp_path / "prefect")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"qsweep: error: folder {locked}/report cannot be made: {locked} is on a read-only "
                           "filesystem; qsweep report writes there: give --out a writable folder\n")
    assert not any(locked.iterdir()) and not (tmp_path / "store").exists()


# --- model folders that cannot be whole -----------------------------------------------------------

def cut_short(tiny_model: Path, folder: Path) -> Path:
    """A copy of the tiny model whose model.safetensors stops half way (a copy or download cut short)."""
    shutil.copytree(tiny_model, folder)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return folder


def test_a_truncated_local_model_fails_its_download_and_the_other_model_goes_on(tiny_model, tmp_path):
    model = cut_short(tiny_model, tmp_path / "model")
    whole, size = ((m / "model.safetensors").stat().st_size for m in (tiny_model, model))
    sweep = write_sweep(tmp_path / "sweep.yaml", {"tiny": tiny_model, "cut": model}, recipes=["q4"],
                        fidelity={"enabled": False}, gates={"max_kl_mean": None, "max_ppl_ratio": None})
    done = qsweep(tmp_path / "store", "run", sweep, prefect_home=tmp_path / "prefect")
    said = done.stdout + done.stderr
    assert done.returncode == 1, said[-3000:]
    assert (f"model.safetensors is truncated: its tensors need {whole:,} bytes, the file has {size:,}; "
            "copy or download it again") in said and "cut/q4: download FAILED" in said, said[-3000:]
    assert "tiny/q4 measured" in said  # the other model's cell went on
    stored = [json.loads(m.read_text()) for m in (tmp_path / "store" / "artifacts").glob("download/*/manifest.json")]
    assert [s["info"]["files"]["model.safetensors"]["bytes"] for s in stored] == [whole]  # only the whole one


def test_a_truncated_download_is_refused_by_the_download_stage_and_not_stored(tiny_model, tmp_path):
    repo = cut_short(tiny_model, tmp_path / "repo")
    with FakeHub({"org/tiny": repo}) as hub:
        env = {**hub.env(), "HF_HOME": str(tmp_path / "hf-home")}
        done = qsweep(tmp_path / "store", "run", sweep_file(tmp_path, f"hf://org/tiny@{COMMIT}", recipes=["q4"]),
                      prefect_home=tmp_path / "prefect", env=env)
    said = done.stdout + done.stderr
    assert done.returncode == 1, said[-3000:]
    assert (f"tiny/q4: download FAILED: SourceError: hf://org/tiny@{COMMIT}: model.safetensors is truncated: "
            "its tensors need") in said, said[-3000:]
    assert list((tmp_path / "store" / "artifacts").glob("*/*")) == []  # nothing stored, not even half of it


@pytest.mark.parametrize("command", ["run", "quantize"])
def test_a_model_folder_without_weights_names_the_folder_and_the_pattern(command, tiny_model, tmp_path, capsys):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    (model / "model.safetensors").rename(model / "pytorch_model.bin")  # as many repos ship them
    argv = ["run", sweep_file(tmp_path, model)] if command == "run" else ["quantize", model, "--recipe", "q4"]
    code, out, err = cli(capsys, "--store", tmp_path / "store", *argv)
    assert (code, out) == (2, "")
    assert (f"the folder {model} has no weights (model*.safetensors); it has pytorch_model.bin, but qsweep reads "
            "weights from model*.safetensors only") in err, err
    assert not (tmp_path / "store").exists()


# --- sweep files that are no mapping --------------------------------------------------------------

KEYS = "name, models, recipes, smoke, benchmark, fidelity, search, publish, gates, card, concurrency"


@pytest.mark.parametrize("text, says", [
    ("", "empty; a sweep file is a mapping with keys " + KEYS),
    ("# models and recipes to come\n\n", "empty; a sweep file is a mapping with keys " + KEYS),
    (yaml.safe_dump([{"name": "tiny", "source": "demo://tiny-llama"}]), f"expected a mapping with keys {KEYS}; got a list"),
    ("tiny\n", f"expected a mapping with keys {KEYS}; got a string"),
])
def test_a_sweep_file_that_is_no_mapping_says_what_it_is(text, says, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(text)
    assert cli(capsys, "--store", tmp_path / "store", "run", sweep) == (2, "", f"qsweep: error: {sweep}: {says}\n")
    assert not (tmp_path / "store").exists()
