"""The mirror on a real S3 API: QSWEEP_MIRROR=s3://bucket/prefix through s3fs, against moto's server in
its own process (tests/s3server.py), with keys and endpoint from the environment as a worker gets them.
Each "host" is a store of its own, and a process of its own where that matters (a SIGKILLed push)."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from s3server import S3Server

from storage.digests import MANIFEST, scan_files
from storage.metrics import MetricStore
from storage.workspace import open_store

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"bits": 4}

# A host: its own store, the mirror from QSWEEP_MIRROR, a quantize then a smoke artifact. Prints what it
# built and what it got: [{stage, key, digest, reused}], built: [stage, ...].
HOST = textwrap.dedent("""
    import json, logging, sys
    from storage.workspace import open_store
    sys.path.insert(0, "tests")
    from test_remote_s3 import PARAMS, build

    logging.basicConfig(level=logging.INFO)
    built = []
    def counted(stage):
        return lambda out: (built.append(stage), build(out))[1]
    store = open_store(sys.argv[1])
    q = store.produce("quantize", "1", PARAMS, [], counted("quantize"))
    s = store.produce("smoke", "1", PARAMS, [q], counted("smoke"))
    print(json.dumps({"refs": [r.__dict__ for r in (q, s)], "built": built}))
""")


def build(out):
    """Several files, one in a subfolder (no folders on S3) and one large enough to go up in parts
    of s3fs's concurrent put."""
    (out / "model.bin").write_bytes(bytes(range(256)) * 40_000)  # 10 MB
    (out / "config.json").write_text('{"bits": 4}')
    (out / "sub" / "deeper").mkdir(parents=True)
    (out / "sub" / "deeper" / "notes.txt").write_text("notes")
    return {"metrics": []}


@pytest.fixture
def s3(monkeypatch):
    from s3fs import S3FileSystem

    with S3Server() as server:
        for name, value in server.env.items():  # this process is a host too
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        # fsspec keeps one S3FileSystem per process, its client bound to the endpoint it first read: a worker's
        # never changes, but each test here has a server of its own.
        S3FileSystem.clear_instance_cache()
        yield server
    S3FileSystem.clear_instance_cache()


def host(s3, store, **env):
    """Run HOST in a process of its own, as another machine: only the environment says where the mirror is."""
    env = {**os.environ, **s3.env, "QSWEEP_MIRROR": s3.url(), "QSWEEP_STORE": str(store), **env}
    return subprocess.run([sys.executable, "-c", HOST, str(store)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def report(run):
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def objects(s3, prefix="qsweep/"):
    """Every object on the mirror: {key: bytes}."""
    client = s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])]
    return {k: client.get_object(Bucket=s3.bucket, Key=k)["Body"].read() for k in keys}


def events(store):
    """The store's recorded events (a corrupt artifact found); no metric history yet means none."""
    db = Path(store) / "metrics.duckdb"
    return MetricStore(db).query("SELECT kind, stage, key, detail FROM events")[1] if db.exists() else []


def everything(*stores):
    """The bytes of every file in these stores (manifests, hashes, metrics.duckdb)."""
    return b"".join(p.read_bytes() for s in stores for p in sorted(Path(s).rglob("*")) if p.is_file())


def test_what_host_a_built_host_b_pulls_and_never_builds(s3, tmp_path):
    a = report(host(s3, tmp_path / "a"))
    assert a["built"] == ["quantize", "smoke"] and not any(r["reused"] for r in a["refs"])
    on_s3 = objects(s3)
    for r in a["refs"]:  # every file and the manifest, under <prefix>/<stage>/<key>/, bytes as built
        local = tmp_path / "a" / "artifacts" / r["stage"] / r["key"]
        names = sorted(scan_files(local)) + [MANIFEST]
        assert {k: v for k, v in on_s3.items() if k.startswith(f"qsweep/{r['stage']}/{r['key']}/")} == \
            {f"qsweep/{r['stage']}/{r['key']}/{n}": (local / n).read_bytes() for n in names}

    b_run = host(s3, tmp_path / "b")
    b = report(b_run)
    assert b["built"] == [] and all(r["reused"] for r in b["refs"])
    assert [r["digest"] for r in b["refs"]] == [r["digest"] for r in a["refs"]]
    for r in b["refs"]:
        there, here = (tmp_path / h / "artifacts" / r["stage"] / r["key"] for h in "ab")
        assert scan_files(there) == scan_files(here)
        assert (there / MANIFEST).read_bytes() == (here / MANIFEST).read_bytes()
    assert not list((tmp_path / "b" / "artifacts").glob("*/.*"))  # no pull folder left behind
    assert events(tmp_path / "b") == []
    # the keys came from the environment only: not in the mirror's objects, the stores, nor what the hosts logged
    secret = s3.secret.encode()
    assert secret not in b"".join(objects(s3).values()) + everything(tmp_path / "a", tmp_path / "b")
    assert s3.secret not in b_run.stdout + b_run.stderr


def test_object_altered_on_s3_is_refused_removed_rebuilt_and_pushed_again(s3, tmp_path, caplog):
    a = report(host(s3, tmp_path / "a"))
    smoke = a["refs"][1]
    where = f"qsweep/smoke/{smoke['key']}/model.bin"
    original = objects(s3)[where]
    s3.client().put_object(Bucket=s3.bucket, Key=where, Body=b"tampered" + original[8:])  # same size, other bytes

    built, seen = [], []

    def counted(stage):
        def run(out):
            built.append(stage)
            seen.append(objects(s3, f"qsweep/{stage}/"))  # what the mirror holds while B builds
            return build(out)
        return run

    b = open_store(tmp_path / "b", mirror=s3.url())  # this process is host B
    with caplog.at_level(logging.WARNING, "qsweep"):
        q = b.produce("quantize", "1", PARAMS, [], counted("quantize"))
        s = b.produce("smoke", "1", PARAMS, [q], counted("smoke"))
    assert q.reused and not s.reused and built == ["smoke"] and s.digest == smoke["digest"]
    assert seen == [{}]  # the altered copy was removed from the mirror before B built its own
    [(kind, stage, key, detail)] = events(tmp_path / "b")
    assert (kind, stage, key) == ("corrupt", "smoke", smoke["key"]) and "s3://qsweep/qsweep" in detail
    assert "corrupt smoke/" in caplog.text and s3.secret not in caplog.text
    assert objects(s3)[where] == original  # B's push repaired the mirror
    c = report(host(s3, tmp_path / "c"))  # and a third host takes it
    assert c["built"] == [] and all(r["reused"] for r in c["refs"])


def test_push_killed_before_its_manifest_leaves_nothing_a_puller_takes(s3, tmp_path):
    killed = host(s3, tmp_path / "a", QSWEEP_FAILPOINT="quantize:push")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    key = next((tmp_path / "a" / "artifacts" / "quantize").iterdir()).name
    left = {k.rsplit("/", 1)[-1] for k in objects(s3, f"qsweep/quantize/{key}/")}
    assert left == {"model.bin", "config.json", "notes.txt"}  # every file went up, the manifest did not

    b = report(host(s3, tmp_path / "b"))
    assert b["built"] == ["quantize", "smoke"]  # the half-upload was not taken for a whole one
    assert events(tmp_path / "b") == []  # nor for corrupt
    c = report(host(s3, tmp_path / "c"))  # B's push completed it
    assert c["built"] == [] and [r["digest"] for r in c["refs"]] == [r["digest"] for r in b["refs"]]


def test_the_host_whose_push_was_killed_pushes_it_when_it_runs_again(s3, tmp_path):
    assert host(s3, tmp_path / "a", QSWEEP_FAILPOINT="quantize:push").returncode == -signal.SIGKILL
    again = report(host(s3, tmp_path / "a"))
    assert again["built"] == ["smoke"]  # its quantize artifact is whole here, and now on the mirror too
    b = report(host(s3, tmp_path / "b"))
    assert b["built"] == [] and [r["digest"] for r in b["refs"]] == [r["digest"] for r in again["refs"]]


def test_server_killed_before_a_push_leaves_the_local_artifact_and_a_warning(s3, tmp_path, caplog, monkeypatch):
    # botocore tries a refused connection 5 times over ~10 s by default; once is enough to see the failure
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")

    def build_then_lose_the_mirror(out):
        build(out)
        s3.kill()  # the mirror dies between the build and its upload

    a = open_store(tmp_path / "a", mirror=s3.url())
    with caplog.at_level(logging.WARNING, "qsweep"):
        ref = a.produce("quantize", "1", PARAMS, [], build_then_lose_the_mirror)
    assert not ref.reused and a.current("quantize", ref.key) == ref.__class__(**{**ref.__dict__, "reused": True})
    assert f"quantize/{ref.key} not pushed to Mirror('s3://qsweep/qsweep')" in caplog.text
    assert s3.secret not in caplog.text

    s3.restart()  # empty: moto keeps its objects in memory
    built = []
    b = open_store(tmp_path / "b", mirror=s3.url())
    got = b.produce("quantize", "1", PARAMS, [], lambda out: (built.append(1), build(out))[1])
    assert built == [1] and got.digest == ref.digest
    assert f"qsweep/quantize/{ref.key}/{MANIFEST}" in objects(s3)


def test_a_misspelt_bucket_is_not_created(s3, tmp_path, caplog):
    a = open_store(tmp_path / "a", mirror="s3://qsweep-typo/qsweep")
    with caplog.at_level(logging.WARNING, "qsweep"):
        ref = a.produce("quantize", "1", PARAMS, [], build)
    assert a.current("quantize", ref.key) is not None  # built and kept here
    assert "not pushed to Mirror('s3://qsweep-typo/qsweep'): FileNotFoundError" in caplog.text
    assert [b["Name"] for b in s3.client().list_buckets()["Buckets"]] == [s3.bucket]
