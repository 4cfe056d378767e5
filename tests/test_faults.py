"""Faults really done to a sweep, and what the rerun makes of them: a SIGKILL in each stage and in
the middle of an artifact write, an artifact altered on disk, the disk filling up during
quantize, and two sweeps started at once on one store. What a rerun makes must equal what an
uninterrupted run made."""

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cli_runs import artifact_digests, artifact_dirs, qsweep, rows, stable_metrics, write_sweep

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["bf16", "q4"]
# Where each run is killed: as the stage's build starts, or once its files are written and
# before its manifest is (in the middle of the artifact write).
KILLS = ["download:start", "quantize:write", "smoke:start", "benchmark:write", "publish:start"]


def sweep_file(tmp_path, tiny_model, recipes=RECIPES):
    return write_sweep(tmp_path / "faults.yaml", {"tiny": tiny_model}, recipes=recipes, fidelity={"enabled": False},
                       gates={"max_kl_mean": None, "max_ppl_ratio": None})  # no fidelity stage, so no gates on it


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    result = qsweep(tmp / "store", "run", sweep_file(tmp, tiny_model), prefect_home=tmp / "prefect")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "store"


def measured(store):
    """The cell results that must not depend on crashes: every artifact but the cards, which show
    this run's tokens/s, and every metric but the timings."""
    return [a for a in artifact_digests(store) if a[0] != "publish"], stable_metrics(store)


def test_sigkills_and_an_altered_artifact_then_a_rerun_gives_the_uninterrupted_results(uninterrupted, tiny_model,
                                                                                        tmp_path):
    sweep, store, home = sweep_file(tmp_path, tiny_model), tmp_path / "store", tmp_path / "prefect"
    for kill in KILLS:  # each run dies one stage further on; every run before it did its part
        killed = qsweep(store, "run", sweep, prefect_home=home, env={"QSWEEP_FAILPOINT": kill})
        assert killed.returncode == -signal.SIGKILL, (kill, killed.stderr[-3000:])
        assert killed.left_behind == [], kill  # its temporary Prefect server died with it
        stage = kill.split(":")[0]
        assert list((store / "artifacts" / stage).glob(".tmp-*")), kill  # it died with the artifact half made
        assert not [p for p in (store / "artifacts" / stage).iterdir() if not p.name.startswith(".")]
    # and before the last run, one bit-rotted byte in the weights an earlier run quantized
    quantized = sorted((store / "artifacts" / "quantize").glob("*/model.safetensors"))[0]
    data = bytearray(quantized.read_bytes())
    data[-1] ^= 0xFF
    quantized.write_bytes(bytes(data))

    rerun = qsweep(store, "run", sweep, prefect_home=home)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert measured(store) == measured(uninterrupted)
    assert {p.name for p in (store / "published").iterdir()} == {f"tiny-{r}-mlx" for r in RECIPES}
    assert not [p for p in (store / "artifacts").glob("*/.tmp-*")]  # what the killed runs left is cleaned up
    # the altered artifact was found, kept aside, recorded, and built again; nothing after it reran
    [(kind, stage, detail)] = rows(store, "SELECT kind, stage, detail FROM events")
    assert (kind, stage) == ("corrupt", "quantize") and "model.safetensors" in detail
    assert "store: corrupt quantize artifact" in rerun.stdout  # `qsweep status`, printed after the run
    assert list((store / "artifacts" / "quantize").glob(".corrupt-*/model.safetensors"))
    # every stage was computed exactly once over all the runs, the killed ones included, but that one
    computed = rows(store, "SELECT stage, key, count(*) FROM stages WHERE NOT cached AND status = 'done' GROUP BY ALL")
    assert sorted(n for *_, n in computed) == [1] * (len(computed) - 1) + [2]
    assert [s for s, _, n in computed if n == 2] == ["quantize"] and len(computed) == len(artifact_dirs(store))


QUANTIZE = textwrap.dedent("""
    import os, sys
    from storage.artifacts import Store
    from tasks import quantize
    from tasks.recipes import get_recipe
    store, base = Store(sys.argv[1]), None
    [base] = [store.current("download", p.name) for p in (store.root / "artifacts" / "download").iterdir()]
    recipe = get_recipe("bf16")
    try:
        store.produce("quantize", quantize.CODE_VERSION, recipe.params(), [base],
                      lambda out: quantize.quantize(store.path(base), recipe, out))
        print("built")
    except Exception as e:
        print("error:", e)
    print("left:", sorted(os.listdir(store.root / "artifacts" / "quantize")))
""")


def _small_disk(store):
    """QUANTIZE with the quantize folder on a 100 KB tmpfs of its own (in a user and mount namespace)."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no unprivileged mount namespace here to make a small tmpfs in")
    script = f'mount -t tmpfs -o size=100k tmpfs "{store}/artifacts/quantize" && exec "{sys.executable}" -c "$0" "$1"'
    return [unshare, "-rm", "sh", "-c", script, QUANTIZE, str(store)], None


def _file_size_limit(store):
    """QUANTIZE with files limited to 100 KB (ulimit -f), as a quota would."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return [sys.executable, "-c", QUANTIZE, str(store)], limit


@pytest.mark.parametrize("room", [_small_disk, _file_size_limit], ids=["tmpfs", "ulimit"])
def test_the_disk_filling_during_quantize_is_a_clear_error_and_leaves_nothing(room, tiny_model, tmp_path):
    from storage.artifacts import Store
    from tasks import download

    store = Store(tmp_path / "store")
    resolved = download.resolve_source(str(tiny_model))
    store.produce("download", download.CODE_VERSION, download.key_params(resolved), [],
                  lambda out: download.download(resolved, out))
    (store.root / "artifacts" / "quantize").mkdir(parents=True)
    cmd, preexec = room(store.root)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=preexec, cwd=REPO)
    out = done.stdout
    assert "error: quantize: could not write its artifact" in out, out + done.stderr[-3000:]
    assert ("is full" if room is _small_disk else "ulimit -f") in out
    assert "Nothing of this stage was kept" in out
    assert "left: []" in out  # no artifact, complete or not, and no temporary folder
    # with room again, the same stage builds
    rebuilt = subprocess.run([sys.executable, "-c", QUANTIZE, str(store.root)], capture_output=True, text=True,
                             timeout=300, cwd=REPO)
    assert "built" in rebuilt.stdout, rebuilt.stdout + rebuilt.stderr[-3000:]


def test_two_sweeps_started_at_once_on_one_store_compute_each_stage_once(uninterrupted, tiny_model, tmp_path):
    sweep, store = sweep_file(tmp_path, tiny_model), tmp_path / "store"
    started = [qsweep(store, "run", sweep, prefect_home=tmp_path / f"prefect{i}", wait=False) for i in (1, 2)]
    try:
        deadline = time.monotonic() + 400
        while any(p.poll() is None for p in started) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [p.returncode for p in started] == [0, 0]
    finally:
        for p in started:  # each in its own session, with the Prefect server it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    computed = rows(store, "SELECT stage, key, count(*) FROM stages WHERE NOT cached GROUP BY ALL")
    assert all(n == 1 for *_, n in computed) and len(computed) == len(artifact_dirs(store))
    # both ran every stage of every cell, at the same time
    per_run = rows(store, "SELECT run_id, count(DISTINCT (recipe, stage)) FROM stages WHERE status = 'done' GROUP BY ALL")
    assert [n for _, n in per_run] == [len(RECIPES) * 5] * 2
    (a_start, a_end), (b_start, b_end) = rows(store, "SELECT started, finished FROM runs ORDER BY started")
    assert b_start < a_end
    assert measured(store) == measured(uninterrupted)


SLOW_SERVER = textwrap.dedent("""
    # sitecustomize for the test below: Prefect's temporary server (a uvicorn child) starts 25 s late
    import time
    if b"prefect.server.api.server:create_app" in open("/proc/self/cmdline", "rb").read():
        time.sleep(25)
""")


def test_a_temporary_server_slower_than_prefects_20_s_is_waited_for(uninterrupted, tiny_model, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_SERVER)
    store = tmp_path / "store"
    shutil.copytree(uninterrupted, store)
    done = qsweep(store, "run", sweep_file(tmp_path, tiny_model), prefect_home=tmp_path / "prefect",
                  env={"PYTHONPATH": f"{tmp_path / 'site'}:{os.environ.get('PYTHONPATH', '')}"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 of 2 cells measured" in done.stdout


def test_a_temporary_server_that_cannot_start_is_one_line(tmp_path, tiny_model):
    database = "postgresql+asyncpg://nobody@127.0.0.1:9/none"  # nothing listens there: every start fails
    done = qsweep(tmp_path / "store", "run", sweep_file(tmp_path, tiny_model), prefect_home=tmp_path / "prefect",
                  env={"PREFECT_API_DATABASE_CONNECTION_URL": database})
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("qsweep: running"), done.stdout
    assert lines[1].startswith("qsweep: error: Prefect's temporary server exited with code 3 while starting")
    assert "PREFECT_API_URL" in lines[1] and done.left_behind == []
