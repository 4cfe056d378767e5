"""A throwaway PostgreSQL server for tests, from Debian's binaries (`make system`).

    with Postgres(host="127.0.0.1") as pg:   # initdb, start, CREATE DATABASE prefect
        pg.url                               # postgresql+asyncpg://postgres@127.0.0.1:<port>/prefect
        pg.sql("SELECT count(*) FROM flow_run")   # [("3",)]: rows of psql's text output

`host` is the one address it listens on (a bridge address works: any client that reaches it
gets in, with trust auth). The cluster lives in a temporary folder of its own (postgres must
own it, and refuses to run as root: as root, everything runs as the `postgres` user); on exit
the server is stopped (`pg_ctl stop -m immediate`) and that folder removed, nothing else.
Without the binaries: skip, or fail under CI=true."""

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def binaries() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


class Postgres:
    def __init__(self, host: str = "127.0.0.1", database: str = "prefect"):
        self.host, self.database = host, database
        self.bin = binaries()
        if self.bin is None:
            why = "needs PostgreSQL's server (initdb, pg_ctl): `apt-get install postgresql`, or `make system`"
            if os.environ.get("CI") == "true":
                pytest.fail(why)
            pytest.skip(why)
        with socket.socket() as s:  # a port free on that address; it stays free for the moment until start
            s.bind((host, 0))
            self.port = s.getsockname()[1]
        self.url = f"postgresql+asyncpg://postgres@{host}:{self.port}/{database}"
        self.as_user = {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}

    def run(self, *cmd: str) -> str:
        done = subprocess.run([str(self.bin / cmd[0]), *cmd[1:]], cwd=self.dir, capture_output=True, text=True,
                              timeout=120, **self.as_user)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done.stdout

    def sql(self, query: str) -> list[tuple[str, ...]]:
        out = self.run("psql", "-h", str(self.dir), "-p", str(self.port), "-U", "postgres", "-d", self.database,
                       "-X", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", query)
        return [tuple(line.split("\t")) for line in out.splitlines()]

    def __enter__(self) -> "Postgres":
        self.dir = Path(tempfile.mkdtemp(prefix="qsweep-pg-"))
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        try:
            self.run("initdb", "-D", "data", "-U", "postgres", "--auth=trust", "--no-sync")
            with open(self.dir / "data" / "pg_hba.conf", "a") as hba:
                hba.write("host all all all trust\n")  # clients on a bridge, not only loopback
            with open(self.dir / "data" / "postgresql.conf", "a") as conf:  # speed over durability
                conf.write(f"listen_addresses = '{self.host}'\nport = {self.port}\n"
                           f"unix_socket_directories = '{self.dir}'\n"
                           "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
            self.run("pg_ctl", "start", "-D", "data", "-w", "-t", "60", "-l", "server.log")
            self.run("createdb", "-h", str(self.dir), "-p", str(self.port), "-U", "postgres", self.database)
        except BaseException:
            self.__exit__()
            raise
        return self

    def log(self) -> str:
        return (self.dir / "server.log").read_text(errors="replace")

    def __exit__(self, *_):
        try:
            if (self.dir / "data" / "postmaster.pid").exists():
                self.run("pg_ctl", "stop", "-D", "data", "-m", "immediate", "-w")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
