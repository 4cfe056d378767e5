"""Running `qsweep` as a user does, in its own process, and reading what it left: the end-to-end
tests' shared helpers."""

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import yaml

RECIPES = ["bf16", "q4", "qx86-hi"]
VOLATILE = ("generation_tokens_per_s", "prompt_tokens_per_s", "peak_memory_gb")


def write_sweep(path: Path, models: dict, recipes=RECIPES, **extra) -> Path:
    sweep = {
        "name": "test",
        "models": [{"name": n, "source": str(s)} for n, s in models.items()],
        "recipes": recipes,
        "smoke": {"max_tokens": 16},
        "benchmark": {"tasks": ["qsweep_demo_mc"], "limit": 8},
        "fidelity": {"window": 64, "windows": 4},
        **extra,
    }
    path.write_text(yaml.safe_dump(sweep))
    return path


WARM = "from prefect import flow; flow(lambda: None)()"
FRESH: dict[str, Path] = {}  # a Prefect home that has never run a sweep, made once per test process


def warm(prefect_home: Path) -> None:
    """Create Prefect's database before a sweep uses it: Prefect 3's first start on a fresh
    home can fail with 'database is locked' under load (seen here; not qsweep's doing).
    Its migrations take about 25 s here, so they run once and each new home is a copy."""
    if (prefect_home / "prefect.db").exists():
        return
    if "home" not in FRESH:
        FRESH["home"] = Path(tempfile.mkdtemp(prefix="qsweep-fresh-prefect-"))
        atexit.register(shutil.rmtree, FRESH["home"], True)
    template = FRESH["home"]
    env = {**os.environ, "PREFECT_HOME": str(template)}
    for _ in range(3):
        if (template / "prefect.db").exists():
            break
        subprocess.run([sys.executable, "-c", WARM], env=env, capture_output=True, timeout=300)
    prefect_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template / "prefect.db", prefect_home / "prefect.db")


def qsweep(store: Path, *args, prefect_home: Path, env=None, wait=True):
    warm(prefect_home)
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), **(env or {})}
    cmd = [sys.executable, "-m", "flows.cli", "--store", str(store), *map(str, args)]
    # Its own session, so that what it leaves behind (the temporary Prefect server of a killed run) can go.
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    # Files, not pipes: a killed run's server would hold a pipe open, and reading it would never end.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            p.wait(timeout=600)
            left = left_in_group(p.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        out.seek(0), err.seek(0)
        done = subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read())
        done.left_behind = left  # processes of its session alive 5 s after it ended (a temporary server, say)
        return done


def left_in_group(pgid: int, grace: float = 5.0) -> list[str]:
    """`ps` lines of the live (not zombie) processes left in a process group, after up to `grace` seconds."""
    deadline = time.monotonic() + grace
    while True:
        ps = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-g", str(pgid)], capture_output=True, text=True).stdout
        left = [line.strip() for line in ps.splitlines() if line.split()[1][0] != "Z"]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def rows(store: Path, sql: str):
    with duckdb.connect(str(store / "metrics.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


def stages_of_last_run(store: Path):
    return rows(store, """SELECT model, recipe, stage, status, cached FROM stages
                          WHERE run_id = (SELECT run_id FROM runs ORDER BY started DESC LIMIT 1)""")


def stable_metrics(store: Path):
    return sorted(rows(store, f"""SELECT model, recipe, stage, task, metric, value FROM metrics
                                  WHERE metric NOT IN {VOLATILE}"""))


def artifact_dirs(store: Path):
    return sorted(p for p in (store / "artifacts").glob("*/*") if not p.name.startswith("."))


def artifact_digests(store: Path):
    """(stage, key, content digest) of every artifact: equal inputs must give equal ones."""
    return sorted((p.parent.name, p.name, json.loads((p / "manifest.json").read_text())["digest"])
                  for p in artifact_dirs(store))
