"""One sweep across separate hosts, on the parts a team would run: Prefect's server on PostgreSQL, the artifact
mirror on an S3 API (moto's server), and three hosts in network namespaces (tests/netns.py), each with its own
store and Prefect home, reaching the servers only through the bridge address.

h0 runs the sweep (`qsweep run --cells-on cell/qsweep-cell`); h1 and h2 run `qsweep worker --store`. h1 stops
in the middle of its cell (as a frozen machine) and is then killed whole; its cell's flow run must end Crashed
when its heartbeats stop, run again on h2, and the sweep completes with every stage built once across hosts and
every cell's rows in h0's own metric history, from the artifacts it pulled."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from netns import Network
from postgres import Postgres
from s3server import S3Server

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["bf16", "q4", "q8"]
ZOMBIE_SECONDS = 60  # two of the workers' heartbeats (30 s, Prefect's least) missed


def wait(what: str, done, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (result := done()):
        assert time.monotonic() < deadline, f"still waiting, after {timeout} s, for {what}"
        time.sleep(every)
    return result


def built_here(store: Path) -> dict[tuple[str, str], str]:
    """(stage, key) -> the host that built it, for the artifacts in a store (pulled ones name another host)."""
    return {(m.parent.parent.name, m.parent.name): json.loads(m.read_text())["host"]
            for m in store.glob("artifacts/*/*/manifest.json")}


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    """The servers and hosts, a sweep run across them with h1 killed mid-cell: a dict of what the checks read."""
    root = tmp_path_factory.mktemp("hosts")
    with Network() as net, Postgres(host="127.0.0.1") as pg, S3Server(host=net.gateway) as s3:
        api = f"http://{net.gateway}:{free_port()}/api"
        env = {**os.environ, **s3.env, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_WORKER_QUERY_SECONDS": "1", "QSWEEP_MIRROR": s3.url("qsweep")}
        env.pop("QSWEEP_STORE", None)
        server = Server(root, env, api, pg.url)
        try:
            server.start()
            sweep = root / "hosts.yaml"
            sweep.write_text(yaml.safe_dump({
                "name": "hosts", "models": [{"name": "tiny", "source": str(tiny_model)}], "recipes": RECIPES,
                "smoke": {"max_tokens": 8}, "benchmark": {"tasks": ["qsweep_demo_mc"], "limit": 8},
                "fidelity": {"enabled": False}, "gates": {"max_kl_mean": None, "max_ppl_ratio": None},
                "concurrency": {"cells": len(RECIPES)}}))
            hosts = {name: net.host(name) for name in ("h0", "h1", "h2")}

            def env_of(name, **more):
                (root / name).mkdir(exist_ok=True)
                return {**env, "PREFECT_HOME": str(root / name / "prefect"), **more}

            def worker(name, **more):
                return hosts[name].start([sys.executable, "-m", "flows.cli", "worker", "--name", name, "--limit", "1",
                                          "--store", root / name / "store"], env_of(name, **more),
                                         root / f"{name}.log", cwd=REPO)

            worker("h1", QSWEEP_FAILPOINT="benchmark:start:hang")
            wait("h1's worker to poll the pool", lambda: "h1" in server.workers(), 120)
            started = time.monotonic()
            sweeping = hosts["h0"].start([sys.executable, "-m", "flows.cli", "--store", root / "h0" / "store", "run",
                                          sweep, "--cells-on", "cell/qsweep-cell"],
                                         env_of("h0", QSWEEP_ZOMBIE_SECONDS=str(ZOMBIE_SECONDS)), root / "h0.log",
                                         cwd=REPO)
            wait("h1 to stop in the middle of its cell (benchmark)",
                 lambda: list((root / "h1" / "store" / "artifacts" / "benchmark").glob(".tmp-*")), 300)
            worker("h2")
            wait("h2's worker to poll the pool", lambda: "h2" in server.workers(), 120)
            hosts["h1"].kill()
            killed = time.time()
            code = sweeping.wait(timeout=600)
            sql = hosts["h0"].run([sys.executable, "-m", "flows.cli", "--store", root / "h0" / "store", "sql",
                                   "SELECT recipe, task, metric, value FROM latest_metrics WHERE stage = 'benchmark' "
                                   "AND metric = 'acc'", "--format", "json"], env_of("h0"), cwd=REPO)
            yield dict(root=root, code=code, log=(root / "h0.log").read_text(), sql=sql, killed=killed,
                       took=time.monotonic() - started, runs=server.flow_runs(), s3=s3)
        finally:
            server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`prefect server start` on the bridge address and PostgreSQL, with the README's pool and deployments."""

    def __init__(self, root: Path, env: dict, api: str, database: str):
        self.root, self.api, self.process = root, api, None
        self.env = {**env, "PREFECT_HOME": str(root / "server"), "PREFECT_API_DATABASE_CONNECTION_URL": database}

    def start(self):
        host, port = self.api.split("//")[1].split("/")[0].split(":")
        self.process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host,
                                         "--port", port], cwd=REPO, env=self.env, start_new_session=True,
                                        stdout=open(self.root / "server.log", "w"), stderr=subprocess.STDOUT)
        wait("the Prefect server", lambda: self.healthy(), 240, every=1)
        for cmd in (["work-pool", "create", "qsweep", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
            done = subprocess.run([sys.executable, "-m", "prefect", *cmd], cwd=REPO, env=self.env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    def healthy(self) -> bool:
        assert self.process.poll() is None, (self.root / "server.log").read_text()[-3000:]
        try:
            return httpx.get(self.api + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def post(self, path: str, body: dict):
        return httpx.post(self.api + path, json=body, timeout=30).raise_for_status().json()

    def workers(self) -> set[str]:
        return {w["name"] for w in self.post("/work_pools/qsweep/workers/filter", {})}

    def flow_runs(self) -> list[dict]:
        return self.post("/flow_runs/filter", {"limit": 200})

    def stop(self):
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def test_the_sweep_completes_despite_a_host_killed_mid_cell(cluster):
    assert cluster["code"] == 0, cluster["log"][-4000:]
    [sweep] = [r for r in cluster["runs"] if r["name"] == "sweep:hosts"]
    assert sweep["state"]["type"] == "COMPLETED"  # the rule crashes cell runs only (the sweep's beat is 180 s)
    cells = [r for r in cluster["runs"] if r["name"].startswith("cell:")]
    crashed = [r for r in cells if r["state"]["type"] == "CRASHED"]
    assert len(crashed) == 1, [(r["name"], r["state"]["name"]) for r in cells]
    assert len(cells) == len(RECIPES) + 1 and all(r["state"]["type"] == "COMPLETED" for r in cells if r not in crashed)
    [dead] = crashed
    assert "heartbeat" in dead["state"]["message"]
    took = {h: (cluster["root"] / f"{h}.log").read_text() for h in ("h1", "h2")}  # "submitting flow run '<id>'"
    assert f"flow run '{dead['id']}'" in took["h1"]
    again = [r for r in cells if r["name"] == dead["name"] and r["state"]["type"] == "COMPLETED"]
    assert len(again) == 1 and f"flow run '{again[0]['id']}'" in took["h2"]
    assert f"{dead['name'][5:]}: its run crashed" in cluster["log"]
    # how long the server took to notice, from the kill to the Crashed state
    noticed = time_of(dead["state"]["timestamp"]) - cluster["killed"]
    print(f"\ncrash noticed {noticed:.0f} s after the kill (window {ZOMBIE_SECONDS} s); sweep {cluster['took']:.0f} s")
    assert 0 < noticed < ZOMBIE_SECONDS + 30 + 30  # the window, a heartbeat period, the server's check


def test_every_stage_built_once_across_hosts_and_h0_holds_every_row(cluster):
    root = cluster["root"]
    stores = {h: built_here(root / h / "store") for h in ("h0", "h1", "h2")}
    # h0 built only the cards; every measured artifact it holds came from the mirror
    assert {s for (s, _), host in stores["h0"].items() if host == "h0"} == {"publish"}
    built = [(key, host) for h in ("h1", "h2") for key, host in stores[h].items() if host == h]
    assert len(built) == len({key for key, _ in built})  # no key built on both workers
    assert {host for _, host in built} == {"h1", "h2"}  # the sweep's cells were spread over both
    measured = {key for key, host in stores["h0"].items() if host != "h0"}
    assert measured == {key for key, _ in built}  # h0 pulled every one of them
    sizes = {h: sum(f.stat().st_size for (s, k), host in stores[h].items() if host == h
                    for f in (root / h / "store" / "artifacts" / s / k).rglob("*") if f.is_file()) for h in ("h1", "h2")}
    pulled = sum(f.stat().st_size for (s, k), host in stores["h0"].items() if host != "h0"
                 for f in (root / "h0" / "store" / "artifacts" / s / k).rglob("*") if f.is_file())
    print(f"\nbuilt on h1 {sizes['h1']} B, on h2 {sizes['h2']} B; pulled by h0 {pulled} B")
    assert cluster["sql"].returncode == 0, cluster["sql"].stderr
    rows = json.loads(cluster["sql"].stdout)
    assert sorted(r["recipe"] for r in rows) == sorted(RECIPES)


def time_of(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
