"""What a fully cached rerun costs beyond Prefect's own floor (issue 15, item 2).

Target: per cell at most 1.5x a bare Prefect flow of the same shape whose tasks are all cached,
and a startup of at most Prefect's temporary server start + 3 s. In one run:

  ours    `qsweep run SWEEP --store STORE` in a fresh process, on a store that already holds every
          cell (nothing computes). Split by the timestamps of Prefect's own log lines (the run's
          log file under <store>/logs, else its output): startup = process start -> the sweep
          flow's "Beginning flow run"; in-flow = -> its "Finished in state"; exit = -> the process ends.
  floor   a bare Prefect flow of N subflows x 7 tasks (cache_policy INPUTS, persisted results), run
          twice in fresh processes on a fresh PREFECT_HOME, each with its own temporary server; the
          second run (every task Cached) is split the same way. "+publish" is qsweep's shape instead:
          N subflows x 6 tasks, then N subflows x 1 task.
  server  the temporary server's start alone (SubprocessASGIServer.start() until it answers).

Then the same for a 20-cell sweep of the tiny model (4 seeds of demo://tiny-llama x 5 recipes,
benchmark limit 4, fidelity 1 window of 64 tokens) in a temporary store, computed once first.

    .venv/bin/python bench/rerun_overhead.py [--sweep sweeps/demo.yaml] [--store .qsweep]
        [--tiny-store DIR (kept, computed once)] [--skip-tiny] [--skip-demo] [--profile DIR (py-spy --idle, QSWEEP_BLAS=0)]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| \w+ *\| (.*)$")

FLOOR = '''
import sys
from prefect import flow, task
from prefect.cache_policies import INPUTS

@task(cache_policy=INPUTS, persist_result=True)
def stage(cell: int, i: int, before: dict | None) -> dict:
    return {"cell": cell, "stage": i, "key": f"{cell}-{i}"}

@flow(flow_run_name="{kind}:{c}")
def cell(kind: str, c: int, tasks: int, first: int = 0) -> dict:
    out = None
    for i in range(first, first + tasks):
        out = stage(c, i, out)
    return out

@flow(name="floor", flow_run_name="floor")
def floor(n: int, publish: bool):
    for c in range(n):  # qsweep's shape: 6 stages per cell subflow, then the publish subflows of one task
        cell("cell", c, 6 if publish else 7)
    for c in range(n if publish else 0):
        cell("publish", c, 1, first=6)

floor(int(sys.argv[1]), sys.argv[2] == "publish")
'''

SERVER = '''
import json, time
from prefect.server.api.server import SubprocessASGIServer
started = time.time()
server = SubprocessASGIServer()
server.start()
print(json.dumps({"start": time.time() - started}))
server.stop()
'''


def timeline(text: str, day: date) -> list[tuple[float, str]]:
    """Prefect's log lines as (epoch seconds, message); their stamps are local time of day."""
    out = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            at = datetime.combine(day, datetime.strptime(m.group(1), "%H:%M:%S.%f").time()).timestamp()
            out.append((at, m.group(2)))
    return out


def split(lines: list[tuple[float, str]], started: float, ended: float, top: str) -> dict:
    """Startup / in-flow / exit of the flow run whose name starts with `top`, and what happened inside."""
    begin = next(t for t, msg in lines if msg.startswith(f"Flow run '{top}") and "Beginning flow run" in msg)
    end = next(t for t, msg in lines if msg.startswith(f"Flow run '{top}") and "Finished in state" in msg)
    server = next((t for t, msg in lines if "Starting temporary server" in msg), None)
    subflows, opened = [], {}
    for t, msg in lines:
        m = re.match(r"Flow run '([^']+)' - (Beginning subflow run|Finished in state)", msg)
        if m and not m.group(1).startswith(top):
            if m.group(2).startswith("Beginning"):
                opened[m.group(1)] = t
            elif m.group(1) in opened:
                subflows.append((m.group(1), opened.pop(m.group(1)), t))
    tasks = Counter("cached" if "Cached(" in msg else "computed" for _, msg in lines
                    if msg.startswith("Task run") and "Finished in state" in msg)
    return {"wall": ended - started, "startup": begin - started, "in_flow": end - begin, "exit": ended - end,
            "to_server_line": None if server is None else server - started, "subflows": subflows, "tasks": dict(tasks),
            "before_first_subflow": (subflows[0][1] - begin) if subflows else None,
            "after_last_subflow": (end - subflows[-1][2]) if subflows else None}


def run_ours(sweep: Path, store: Path, env: dict, profile: Path | None = None) -> dict:
    cmd = [str(BIN / "qsweep"), "run", str(sweep), "--store", str(store)]
    if profile is not None:  # every thread, waiting included; no BLAS re-exec, so py-spy sees the real process
        env = {**env, "QSWEEP_BLAS": "0"}
        cmd = [str(BIN / "py-spy"), "record", "--idle", "-r", "50", "-f", "raw", "-o", str(profile), "--",
               sys.executable, "-m", "flows.cli", *cmd[1:]]
    started = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    ended = time.time()
    if done.returncode not in (0, 1):
        sys.exit(f"qsweep run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    logs = sorted((p for p in (store / "logs").glob("*.log") if p.stat().st_mtime >= started), key=os.path.getmtime)
    text = (logs[-1].read_text(errors="replace") if logs else "") + "\n" + done.stdout + "\n" + done.stderr
    out = split(timeline(text, date.fromtimestamp(started)), started, ended, "sweep:")
    out["cells"] = sum(name.startswith("cell:") for name, _, _ in out["subflows"])
    out["cmd"] = " ".join(cmd)
    return out


def floor(n: int, publish: bool, work: Path) -> dict:
    """The second of two runs of the bare flow (the first fills the cache), on a fresh PREFECT_HOME."""
    home = work / f"home-{n}-{'publish' if publish else 'plain'}"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOCAL_STORAGE_PATH=str(home / "results"))
    script = work / "floor.py"
    script.write_text(FLOOR)
    for attempt in ("fill", "timed"):
        started = time.time()
        done = subprocess.run([sys.executable, str(script), str(n), "publish" if publish else "plain"], env=env,
                              capture_output=True, text=True, cwd=work)
        ended = time.time()
        if done.returncode != 0:
            sys.exit(f"the bare flow failed:\n{done.stderr[-3000:]}")
    out = split(timeline(done.stdout + done.stderr, date.fromtimestamp(started)), started, ended, "floor")
    server = subprocess.run([sys.executable, "-c", SERVER], env=env, capture_output=True, text=True, cwd=work)
    out["server_start"] = json.loads(server.stdout.strip().splitlines()[-1])["start"]
    return out


TINY = """name: tiny20
models:
{models}
recipes: [bf16, q8, q6, q4, qx86-hi]
smoke: {{prompt: "What color is the sky?", max_tokens: 8}}
benchmark: {{tasks: [qsweep_demo_mc], limit: 4}}
fidelity: {{window: 64, windows: 1}}
publish: {{repo: null}}
"""


def tiny_sweep(store: Path, env: dict) -> Path:
    """The 20-cell sweep file beside its store; computed once (a few minutes on 2 cores)."""
    store.mkdir(parents=True, exist_ok=True)
    sweep = store.parent / f"{store.name}.yaml"
    models = "\n".join(f"  - {{name: tiny-{s}, source: 'demo://tiny-llama?seed={s}'}}" for s in range(1, 5))
    sweep.write_text(TINY.format(models=models))
    if not (store / "metrics.duckdb").exists():
        started = time.time()
        done = subprocess.run([str(BIN / "qsweep"), "run", str(sweep), "--store", str(store)], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        print(f"tiny sweep computed once in {time.time() - started:.0f} s (exit {done.returncode})", flush=True)
    return sweep


def report(name: str, ours: dict, base: dict, extra: dict) -> list[str]:
    n = ours["cells"]
    per, per_floor, per_extra = ours["in_flow"] / n, base["in_flow"] / n, extra["in_flow"] / n
    cells = [b - a for name_, a, b in ours["subflows"] if name_.startswith("cell:")]
    pubs = [b - a for name_, a, b in ours["subflows"] if name_.startswith("publish:")]
    rows = [
        f"## {name}: {n} cells, tasks {ours['tasks']}",
        f"ours  wall {ours['wall']:6.1f} s = startup {ours['startup']:5.1f} + in-flow {ours['in_flow']:5.1f} "
        f"+ exit {ours['exit']:5.1f}   (process start -> 'Starting temporary server' line {ours['to_server_line'] or 0:.1f} s)",
        f"      in-flow: before the first cell {ours['before_first_subflow']:.1f} s; cell subflows {sum(cells):.1f} s "
        f"(mean {sum(cells) / max(len(cells), 1):.2f}); publish subflows {sum(pubs):.1f} s "
        f"(mean {sum(pubs) / max(len(pubs), 1):.2f}); after the last {ours['after_last_subflow']:.1f} s "
        f"(report); between subflows {ours['in_flow'] - sum(cells) - sum(pubs) - ours['before_first_subflow'] - ours['after_last_subflow']:.1f} s",
        f"floor wall {base['wall']:6.1f} s = startup {base['startup']:5.1f} + in-flow {base['in_flow']:5.1f} "
        f"+ exit {base['exit']:5.1f}   ({n} subflows x 7 cached tasks; tasks {base['tasks']})",
        f"floor+publish in-flow {extra['in_flow']:5.1f} s  ({n} x 6 then {n} x 1 cached tasks: qsweep's shape)",
        f"server start alone {base['server_start']:.1f} s",
        f"per cell: ours {per:.2f} s, floor {per_floor:.2f} s -> {per / per_floor:.2f}x (target <= 1.5x); "
        f"vs qsweep's shape {per_extra:.2f} s -> {per / per_extra:.2f}x",
        f"wall: ours / floor {ours['wall'] / base['wall']:.2f}x",
        f"startup: ours {ours['startup']:.1f} s - server start {base['server_start']:.1f} s = "
        f"{ours['startup'] - base['server_start']:.1f} s (target <= 3 s); the floor's own startup {base['startup']:.1f} s",
    ]
    return rows


def profile_top(raw: Path, count: int = 25) -> list[str]:
    """Wall seconds of qsweep's functions and Prefect's heaviest calls, on the threads that run the flow
    (the main thread and the cells' pool), from a py-spy --idle raw profile."""
    inclusive = Counter()
    for line in raw.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        if not (frames[0].startswith("_run_module_as_main") or any("concurrent/futures/thread.py" in f for f in frames)):
            continue
        for f in dict.fromkeys(re.sub(r":\d+\)$", ")", f) for f in frames):
            inclusive[f] += int(n) / 50
    mine = [(s, f) for f, s in inclusive.items() if re.search(r"\((flows|tasks|storage)/", f)]
    theirs = [(s, f) for f, s in inclusive.items() if re.search(r"(get_client|create_default_context|Task.create_run|"
              r"FlowRunEngine.initialize_run|FlowRunEngine.begin_run|_find_and_load |savefig|connect \(duckdb)", f)]
    return [f"{s:7.2f} s  {f}" for s, f in sorted(mine, reverse=True)[:count]] + ["  -- Prefect / libraries:"] + \
        [f"{s:7.2f} s  {f}" for s, f in sorted(theirs, reverse=True)[:12]]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", type=Path, default=ROOT / "sweeps" / "demo.yaml")
    p.add_argument("--store", type=Path, default=ROOT / ".qsweep", help="must already hold every cell of the sweep")
    p.add_argument("--tiny-store", type=Path, help="kept between runs (computed once); default: a temporary one")
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--profile", type=Path, help="also profile the cached demo rerun with py-spy into this folder")
    args = p.parse_args()
    env = dict(os.environ)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; PREFECT_HOME "
          f"{env.get('PREFECT_HOME', '~/.prefect')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="rerun-floor-") as tmp:
        work = Path(tmp)
        runs = [] if args.skip_demo else [("demo", args.sweep, args.store.resolve())]
        if not args.skip_tiny:
            store = (args.tiny_store or work / "tiny-store").resolve()
            runs.append(("tiny x 20", tiny_sweep(store, env), store))
        lines = []
        for name, sweep, store in runs:
            ours = run_ours(sweep, store, env)
            if ours["tasks"].get("computed"):  # the code changed since the store was computed: now it is
                print(f"{name}: {ours['tasks']['computed']} tasks computed ({ours['wall']:.0f} s), not a cached rerun; "
                      "timing the next one", flush=True)
                ours = run_ours(sweep, store, env)
            base, extra = floor(ours["cells"], False, work), floor(ours["cells"], True, work)
            lines += report(name, ours, base, extra) + [""]
            print("\n".join(report(name, ours, base, extra)), flush=True)
        if args.profile and runs:
            name, sweep, store = runs[0]
            args.profile.mkdir(parents=True, exist_ok=True)
            raw = args.profile / "rerun.raw"
            run_ours(sweep, store, env, profile=raw)
            print(f"\n## where a cached {name} rerun spends its wall time (py-spy --idle, flow threads)")
            print("\n".join(profile_top(raw)))


if __name__ == "__main__":
    main()
