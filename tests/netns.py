"""Separate hosts on one machine, for tests of what crosses a network: each host is its own network namespace
(and its own hostname), joined to a bridge in the test's namespace. A host reaches the servers the test binds
to `network.gateway` only through that address, and nothing of another host but its address.

    with Network() as net:
        h1 = net.host("h1")                    # 10.x.0.2, hostname h1
        p = h1.start(["qsweep", "worker"], env, log_path)
        h1.kill()                              # SIGKILL every process on the host, as a power cut would

Needs root and iproute2 (`make system` installs it); under CI=true a missing one fails the test."""

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest


def require() -> None:
    why = ("network namespaces need root" if os.geteuid() != 0 else
           "network namespaces need iproute2's `ip` and util-linux's `unshare`" if not (
               shutil.which("ip") and shutil.which("unshare")) else None)
    if why is not None:
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(why)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class Network:
    def __init__(self):
        require()
        self.tag = f"{os.getpid() % 10000}{random.randrange(100)}"
        self.subnet = f"10.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
        self.bridge = f"qsbr{self.tag}"
        self.gateway = f"{self.subnet}.1"
        self.hosts: list[Host] = []

    def __enter__(self):
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        return self

    def host(self, name: str) -> "Host":
        h = Host(self, name, f"{self.subnet}.{len(self.hosts) + 2}")
        self.hosts.append(h)
        return h

    def __exit__(self, *exc):
        for h in self.hosts:
            h.kill()
            with contextlib.suppress(subprocess.CalledProcessError):
                sh("ip", "netns", "delete", h.netns)
        with contextlib.suppress(subprocess.CalledProcessError):
            sh("ip", "link", "delete", self.bridge)


class Host:
    def __init__(self, net: Network, name: str, address: str):
        self.name, self.address, self.netns = name, address, f"qs{net.tag}{name}"
        outside, inside = f"qs{net.tag}{name}o"[:15], f"qs{net.tag}{name}i"[:15]
        sh("ip", "netns", "add", self.netns)
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        sh("ip", "link", "set", outside, "master", net.bridge, "up")
        sh("ip", "link", "set", inside, "netns", self.netns)
        for cmd in (["ip", "addr", "add", f"{address}/24", "dev", inside], ["ip", "link", "set", inside, "up"],
                    ["ip", "link", "set", "lo", "up"], ["ip", "route", "add", "default", "via", net.gateway]):
            sh("ip", "netns", "exec", self.netns, *cmd)
        self.processes: list[subprocess.Popen] = []

    def command(self, cmd: list[str]) -> list[str]:
        """`cmd` run on this host: in its network namespace, under its own hostname."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.name, *map(str, cmd)]

    def start(self, cmd: list, env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
        out = open(log, "w")
        p = subprocess.Popen(self.command(cmd), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.processes.append(p)
        return p

    def run(self, cmd: list, env: dict, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(cmd), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill(self) -> None:
        """SIGKILL every process on the host at once, as a power cut would, and wait until none is left."""
        deadline = time.monotonic() + 30
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        for p in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
