"""A real S3 API for tests: moto's server, in a process of its own, on one address and a free port.

    with S3Server() as s3:                  # host="127.0.0.1"; any other local address works (a bridge
        s3.env                              # that network namespaces reach): what a client machine sets:
                                            # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, region
        s3.url("qsweep")                    # "s3://<bucket>/qsweep": a QSWEEP_MIRROR, credentials not in it
        s3.client()                         # a boto3 client, to look at or alter objects behind the code's back
        s3.kill()                           # SIGKILL, as a crashed server (stop(): SIGTERM, and wait)
        s3.restart()                        # again on the same port, EMPTY (moto keeps state in memory), bucket made

The secret key is made per server, so a test can look for it where it must not be (logs, manifests).
Without moto[server] or s3fs: skip, or fail under CI=true.
"""

import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


def needs_s3() -> None:
    missing = [m for m in ("moto", "flask", "s3fs", "boto3") if importlib.util.find_spec(m) is None]
    if missing:
        why = f"{', '.join(missing)} not installed (pip install 'moto[server]' s3fs)"
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(why)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None, bucket: str = "qsweep"):
        needs_s3()
        self.host, self.port, self.bucket = host, port, bucket
        self.key_id, self.secret = "qsweep-test", f"secret-{secrets.token_hex(8)}"
        self.proc: subprocess.Popen | None = None
        self.log = Path(tempfile.mkstemp(prefix="qsweep-moto-", suffix=".log")[1])

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}  # no 1 s wait for an instance profile that is not there

    def url(self, prefix: str = "qsweep") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key_id,
                            aws_secret_access_key=self.secret, region_name="us-east-1")

    def start(self) -> "S3Server":
        for _ in range(3):  # a free port may be taken between the check and moto's bind: try another
            port = self.port or _free_port(self.host)
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(port)],
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            if self._wait(port):
                self.port = port
                self.client().create_bucket(Bucket=self.bucket)
                return self
            self.proc.kill()
            self.proc.wait()
        raise RuntimeError(f"moto server did not start on {self.host}: {self.log.read_text()[-2000:]}")

    def _wait(self, port: int, seconds: float = 30) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection((self.host, port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def restart(self) -> "S3Server":
        self.stop()
        return self.start()

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.unlink(missing_ok=True)
