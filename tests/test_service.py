"""qsweep as a service, the way the README sets it up: a real `prefect server` on a free
loopback port, its database on a real PostgreSQL server (tests/postgres.py), the `qsweep`
process pool, `prefect deploy --all` from prefect.yaml, two workers, and a small sweep
triggered through the server's API. Everything started here is stopped here. Checks go
through Prefect's REST API, as the UI reads it, the store, and Postgres itself."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import httpx
import pytest
import yaml
from postgres import Postgres

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["bf16", "q4", "qx86-hi"]
LOADS_MODEL = ("quantize", "smoke", "benchmark")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, root: Path, pg: Postgres):
        self.root, self.port = root, free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_API_URL": self.api,
                    "PREFECT_API_DATABASE_CONNECTION_URL": pg.url,
                    "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        self.processes: list[subprocess.Popen] = []

    def start(self, name: str, *cmd) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        p = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(p)
        return p

    def run(self, *cmd):
        done = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
        return done

    def get(self, path: str):
        return self.call("GET", path)

    def post(self, path: str, body: dict):
        return self.call("POST", path, json=body)

    def call(self, method: str, path: str, **kwargs):
        """A request to the API, retried on 503 as Prefect's own client does (a server on SQLite
        answers so while its database is busy; on Postgres it should not)."""
        for attempt in range(10):
            response = httpx.request(method, self.api + path, timeout=30, **kwargs)
            if response.status_code != 503:
                break
            time.sleep(1 + attempt)
        return response.raise_for_status().json()

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def stop(self):
        for p in self.processes:  # each in its own session: the worker's flow runs go with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.processes:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def wait_for(self, flow_run_id: str, timeout: float = 480) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{flow_run_id}")
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {flow_run_id} still {run['state']['name']} after {timeout} s")

    def trigger(self, deployment: str, parameters: dict) -> dict:
        d = self.get(f"/deployments/name/{deployment}")
        return self.wait_for(self.post(f"/deployments/{d['id']}/create_flow_run", {"parameters": parameters})["id"])

    def children(self, flow_run_id: str) -> list[dict]:
        """The subflow runs a flow run started (Prefect links each to a task run of its parent)."""
        parents = {t["id"] for t in self.post("/task_runs/filter", {"task_runs": {}, "limit": 200})
                   if t["flow_run_id"] == flow_run_id}
        return [f for f in self.post("/flow_runs/filter", {"limit": 200}) if f["parent_task_run_id"] in parents]

    def task_runs(self, flow_run_ids: set) -> list[dict]:
        return [t for t in self.post("/task_runs/filter", {"limit": 200}) if t["flow_run_id"] in flow_run_ids]


@pytest.fixture(scope="module")
def pg():
    with Postgres() as pg:  # outlives the server: pytest tears `service` down first
        yield pg


@pytest.fixture(scope="module")
def service(pg, tmp_path_factory):
    s = Service(tmp_path_factory.mktemp("service"), pg)
    prefect = [sys.executable, "-m", "prefect"]
    try:
        s.start("server", *prefect, "server", "start", "--host", "127.0.0.1", "--port", str(s.port))
        deadline = time.monotonic() + 240  # a new server migrates its database first
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(s.api + "/health", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline and s.processes[0].poll() is None, \
                s.log("server")[-3000:] + pg.log()[-2000:]
            time.sleep(1)
        # The README's commands, in its order.
        s.run(*prefect, "work-pool", "create", "qsweep", "--type", "process")
        s.run(*prefect, "--no-prompt", "deploy", "--all")
        for name in ("w1", "w2"):
            s.start(name, sys.executable, "-m", "flows.cli", "worker", "--name", name, "--limit", "2")
        while {w["name"] for w in s.post("/work_pools/qsweep/workers/filter", {})} != {"w1", "w2"}:
            assert time.monotonic() < deadline + 120, s.log("w1")[-2000:] + s.log("w2")[-2000:]
            time.sleep(1)  # both polling before any run exists, so that both can take cells
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def runs(service, tiny_model, tmp_path_factory):
    """The deployed sweep, triggered twice through the API on a tiny model: (store, first, second)."""
    tmp = tmp_path_factory.mktemp("served")
    sweep = tmp / "svc.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "svc", "models": [{"name": "tiny", "source": str(tiny_model)}], "recipes": RECIPES,
        "smoke": {"max_tokens": 8}, "benchmark": {"tasks": ["qsweep_demo_mc"], "limit": 8},
        "fidelity": {"enabled": False}, "gates": {"max_kl_mean": None, "max_ppl_ratio": None},
        "concurrency": {"cells": 3, "model_slots": 1},
    }))
    params = {"sweep_file": str(sweep), "store": str(tmp / "store")}
    first = service.trigger("sweep/demo-nightly", params)
    second = service.trigger("sweep/demo-nightly", params)
    return tmp / "store", first, second


def test_the_ui_and_the_deployments_are_served(service):
    assert "<html" in httpx.get(f"http://127.0.0.1:{service.port}/", timeout=30).text.lower()
    pool = service.get("/work_pools/qsweep")
    assert pool["type"] == "process"
    nightly = service.get("/deployments/name/sweep/demo-nightly")
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
    assert nightly["parameters"]["cell_deployment"] == "cell/qsweep-cell"
    assert nightly["parameters"]["store"] == str(REPO / ".qsweep")  # {{ $PWD }} as `prefect deploy` saw it
    assert service.get("/deployments/name/cell/qsweep-cell")["work_pool_name"] == "qsweep"


def test_a_triggered_sweep_runs_its_cells_on_both_workers(service, runs):
    store, first, _ = runs
    assert first["state"]["type"] == "COMPLETED", service.log("w1")[-3000:] + service.log("w2")[-3000:]
    assert first["name"] == "sweep:svc"
    cells = {f["name"]: f for f in service.children(first["id"]) if f["name"].startswith("cell:")}
    assert set(cells) == {f"cell:tiny/{r}" for r in RECIPES}
    assert all(f["state"]["type"] == "COMPLETED" and f["deployment_id"] for f in cells.values())
    assert sorted(cells["cell:tiny/q4"]["tags"]) == ["model:tiny", "recipe:q4"]
    names = {t["name"] for t in service.task_runs({f["id"] for f in cells.values()})}
    assert {"download:tiny", "quantize:q4", "smoke:qx86-hi", "benchmark:bf16"} <= names
    # each worker took cells of the one sweep (a worker may try a run the other took, and is told so)
    taken = {w: {i for i in (f["id"] for f in cells.values()) if f"submitting flow run '{i}'" in service.log(w)
                 and f"Aborted submission of flow run '{i}'" not in service.log(w)} for w in ("w1", "w2")}
    assert taken["w1"] and taken["w2"] and not taken["w1"] & taken["w2"], taken


def test_two_workers_one_store_every_row_once_no_artifact_corrupt(runs):
    from storage.artifacts import Store

    store, first, _ = runs
    with duckdb.connect(str(store / "metrics.duckdb"), read_only=True) as con:
        computed = con.execute("SELECT stage, key, count(*) FROM stages WHERE run_id = ? AND NOT cached "
                               "GROUP BY ALL", [first["id"]]).fetchall()
        rows = con.execute("SELECT recipe, stage, task, metric, count(*) FROM metrics GROUP BY ALL").fetchall()
    assert computed and all(n == 1 for *_, n in computed)  # no stage computed twice, by either worker
    assert {s for s, *_ in computed} == {"download", "quantize", "smoke", "benchmark", "publish"}
    assert rows and all(n == 1 for *_, n in rows)
    assert {(r, t) for r, s, t, m, _ in rows if m == "acc"} == {(r, "qsweep_demo_mc") for r in RECIPES}
    s = Store(store)
    for path in (store / "artifacts").glob("*/*"):
        assert not path.name.startswith("."), path  # nothing half-written or moved aside
        s.verify(path.parent.name, path.name)


def test_model_slots_hold_one_model_at_a_time_across_workers(service, runs):
    store, first, _ = runs
    limit = service.get(f"/v2/concurrency_limits/qsweep-models-{socket.gethostname()}")
    assert limit["limit"] == 1
    loads = sorted((m["started"], m["started"] + m["seconds"], m["stage"]) for m in
                   (json.loads(p.read_text()) for stage in LOADS_MODEL
                    for p in (store / "artifacts" / stage).glob("*/manifest.json")))
    assert len(loads) == 3 * len(LOADS_MODEL)
    assert all(end <= start for (_, end, _), (start, _, _) in zip(loads, loads[1:])), loads
    # while the cells themselves ran at the same time
    cells = [f for f in service.children(first["id"]) if f["name"].startswith("cell:")]
    spans = sorted((f["start_time"], f["end_time"]) for f in cells)
    assert any(later_start < end for (_, end), (later_start, _) in zip(spans, spans[1:])), spans


def test_a_second_run_shows_every_stage_cached(service, runs):
    store, _, second = runs
    assert second["state"]["type"] == "COMPLETED"
    subflows = service.children(second["id"])
    assert len(subflows) == len(RECIPES)  # a cell flow per recipe; the cards are tasks of the sweep flow
    parents = {f["parent_task_run_id"] for f in subflows}  # Prefect's stand-in task run for each subflow
    states = {(t["name"], t["state"]["name"]) for t in service.task_runs({f["id"] for f in subflows} | {second["id"]})
              if t["id"] not in parents}
    assert {name for name, _ in states} >= {"quantize:q4", "smoke:q4", "benchmark:q4", "publish:tiny/q4"}
    assert {state for _, state in states} == {"Cached"}, states


def test_the_server_keeps_its_runs_in_postgres(pg, service, runs):
    _, first, second = runs
    names = dict(pg.sql("SELECT id, name FROM flow_run"))
    assert names[first["id"]] == names[second["id"]] == "sweep:svc"
    assert {n for n in names.values() if n.startswith("cell:")} == {f"cell:tiny/{r}" for r in RECIPES}
    assert not list((service.root / "prefect").glob("*.db"))  # no SQLite database beside it


def test_the_ui_shows_the_sweep_its_cells_and_their_cached_tasks(service, runs, tmp_path):
    """In a real browser (Debian's Chromium): the second run, its cell runs, and every task of them Cached."""
    from browser import check_prefect_ui, chromium

    _, _, second = runs
    with chromium() as browser:
        check_prefect_ui(browser.new_page(), f"http://127.0.0.1:{service.port}/", "sweep:svc",
                         [f"cell:tiny/{r}" for r in RECIPES],
                         [f"{s}:{r}" for r in RECIPES for s in ("quantize", "smoke", "benchmark")]
                         + ["download:tiny"] + [f"publish:tiny/{r}" for r in RECIPES],
                         flow_run_id=second["id"], shots=tmp_path)
