"""Store: content-addressed artifacts, built once, verified on every reuse."""

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from storage.artifacts import Store, artifact_key
from storage.digests import MANIFEST
from storage.keys import tool_versions

PARAMS = {"bits": 4, "note": "x"}


class Build:
    """A stage build that writes two files (one in a subfolder) and counts its calls."""

    def __init__(self, content: bytes = b"weights"):
        self.content, self.calls = content, 0

    def __call__(self, out):
        self.calls += 1
        (out / "model.bin").write_bytes(self.content)
        (out / "sub").mkdir()
        (out / "sub" / "notes.txt").write_text("notes")
        return {"metrics": [{"task": "t", "metric": "m", "value": 1.0}]}


def leftovers(store: Store, stage: str = "quantize") -> list[str]:
    """Names under a stage's folder other than finished artifacts (temp or aside dirs)."""
    where = store.root / "artifacts" / stage
    return sorted(p.name for p in where.iterdir() if p.name.startswith(".")) if where.exists() else []


def test_produce_builds_once_then_reuses(tmp_path):
    store, build = Store(tmp_path), Build()
    first = store.produce("quantize", "1", PARAMS, [], build)
    second = store.produce("quantize", "1", dict(PARAMS), [], build)
    later = Store(tmp_path).produce("quantize", "1", PARAMS, [], build)  # e.g. the next sweep run

    assert build.calls == 1
    assert first.reused is False and second.reused is True and later.reused is True
    assert first.key == second.key == later.key and first.digest == second.digest == later.digest
    assert (store.path(first) / "model.bin").read_bytes() == b"weights"
    assert leftovers(store) == []


def test_other_params_or_inputs_build_again(tmp_path):
    store, build = Store(tmp_path), Build()
    base = store.produce("download", "1", {}, [], build)
    a = store.produce("quantize", "1", PARAMS, [base], build)
    b = store.produce("quantize", "1", {**PARAMS, "bits": 8}, [base], build)
    c = store.produce("quantize", "2", PARAMS, [base], build)
    assert build.calls == 4 and len({a.key, b.key, c.key}) == 3


def test_digest_depends_on_content_only(tmp_path):
    a = Store(tmp_path / "a").produce("quantize", "1", PARAMS, [], Build())
    b = Store(tmp_path / "b").produce("quantize", "1", PARAMS, [], Build())
    assert a.digest == b.digest
    # so the next stage's key is the same wherever and whenever its input was made
    assert artifact_key("smoke", "1", {}, [a]) == artifact_key("smoke", "1", {}, [b])

    c = Store(tmp_path / "c").produce("quantize", "1", PARAMS, [], Build(b"other weights"))
    assert c.key == a.key and c.digest != a.digest
    assert artifact_key("smoke", "1", {}, [c]) != artifact_key("smoke", "1", {}, [a])


def test_manifest_records_how_it_was_made(tmp_path):
    store = Store(tmp_path)
    base = store.produce("download", "1", {"source": "demo"}, [], Build(b"base"))
    ref = store.produce("quantize", "1", PARAMS, [base], Build())
    m = store.manifest(ref)

    assert (m["stage"], m["key"], m["code_version"], m["params"]) == ("quantize", ref.key, "1", PARAMS)
    assert m["inputs"] == [{"stage": "download", "key": base.key, "digest": base.digest}]
    assert m["digest"] == ref.digest
    where = store.path(ref)
    assert set(m["files"]) == {"model.bin", "sub/notes.txt"}
    for name, meta in m["files"].items():
        data = (where / name).read_bytes()
        assert meta == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert m["tools"] == tool_versions() and {"mlx", "mlx-lm", "lm-eval"} <= set(m["tools"])
    assert m["seconds"] >= 0 and m["started"] > 0
    assert m["info"]["metrics"] == [{"task": "t", "metric": "m", "value": 1.0}]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_build_leaves_nothing(tmp_path, error):
    store = Store(tmp_path)

    def build(out):
        (out / "half-written.bin").write_bytes(b"x" * 100)
        raise error

    with pytest.raises(type(error)):
        store.produce("quantize", "1", PARAMS, [], build)
    key = artifact_key("quantize", "1", PARAMS, [])
    assert store.current("quantize", key) is None
    assert not store.path("quantize", key).exists() and leftovers(store) == []

    built = Build()
    assert store.produce("quantize", "1", PARAMS, [], built).reused is False and built.calls == 1


def test_temp_dir_of_a_killed_run_is_cleaned(tmp_path):
    store = Store(tmp_path)
    key = artifact_key("quantize", "1", PARAMS, [])
    stale = store.path("quantize", key).with_name(f".tmp-{key}-999999")
    stale.mkdir(parents=True)
    (stale / "model.bin").write_bytes(b"half")

    ref = store.produce("quantize", "1", PARAMS, [], Build())
    assert not stale.exists() and leftovers(store) == []
    assert (store.path(ref) / "model.bin").read_bytes() == b"weights"


def flip_a_byte(where):
    data = bytearray((where / "model.bin").read_bytes())
    data[0] ^= 1
    (where / "model.bin").write_bytes(bytes(data))


@pytest.mark.parametrize("tamper", [
    flip_a_byte,
    lambda where: (where / "sub" / "notes.txt").unlink(),
    lambda where: (where / "extra.txt").write_text("added later"),
    lambda where: (where / MANIFEST).write_text("{not json"),
    lambda where: (where / MANIFEST).unlink(),
], ids=["changed", "deleted", "added", "bad-manifest", "no-manifest"])
def test_tampered_artifact_is_moved_aside_and_rebuilt(tmp_path, tamper):
    build = Build()
    ref = Store(tmp_path).produce("quantize", "1", PARAMS, [], build)
    tamper(Store(tmp_path).path(ref))

    store = Store(tmp_path)  # the next run
    assert store.current("quantize", ref.key) is None
    assert not store.path(ref).exists()
    [aside] = leftovers(store)
    assert aside.startswith(f".corrupt-{ref.key}")

    again = store.produce("quantize", "1", PARAMS, [], build)
    assert build.calls == 2 and again.reused is False
    assert (again.key, again.digest) == (ref.key, ref.digest)
    assert Store(tmp_path).current("quantize", ref.key) == replace(again, reused=True)
    assert json.loads((store.path(again) / MANIFEST).read_text())["digest"] == ref.digest
    assert os.listdir(store.path(again) / "sub") == ["notes.txt"]


BUILD_TWICE = """
import os, sys, time
from pathlib import Path
from storage.artifacts import Store

log = Path(sys.argv[2])
def build(out):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(1.0)
    (out / "x.txt").write_text("same bytes")
    return {}
ref = Store(sys.argv[1]).produce("quantize", "1", {"recipe": "q4"}, [], build)
print(ref.key, ref.digest)
"""


def test_two_processes_never_build_the_same_artifact_at_once(tmp_path):
    """Two sweeps on one store: the second waits for the first's artifact instead of building it again."""
    import subprocess
    import sys

    log = tmp_path / "builds.log"
    cmd = [sys.executable, "-c", BUILD_TWICE, str(tmp_path / "store"), str(log)]
    both = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0].strip() for p in both]
    assert all(p.returncode == 0 for p in both)
    assert outs[0] == outs[1] and len(log.read_text().splitlines()) == 1  # one build, the same artifact for both
