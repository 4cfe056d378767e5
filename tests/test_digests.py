"""storage/digests.py: an unchanged artifact is not read again; any change to a file is still caught."""

import os
import time

import pytest

import storage.digests
from storage.artifacts import Store


@pytest.fixture
def hashed(monkeypatch):
    """The files hashed (read whole) from now on."""
    read = []
    real = storage.digests.file_sha256
    monkeypatch.setattr(storage.digests, "file_sha256", lambda path: read.append(path) or real(path))
    return read


def build(out):
    (out / "model.safetensors").write_bytes(b"weights" * 100_000)
    (out / "config.json").write_text("{}")
    return {}


def test_a_rerun_reads_no_unchanged_file(tmp_path, hashed):
    ref = Store(tmp_path).produce("quantize", "1", {}, [], build)
    assert len(hashed) == 2  # written and hashed once, as the manifest was made
    again = Store(tmp_path)  # the next run: a new process knows only what the store remembers
    assert again.current("quantize", ref.key) == ref.__class__(ref.stage, ref.key, ref.digest, reused=True)
    assert again.produce("quantize", "1", {}, [], build).reused
    assert len(hashed) == 2


@pytest.mark.parametrize("change", ["content", "size", "same size and mtime"])
def test_a_changed_file_is_caught(tmp_path, hashed, change):
    store = Store(tmp_path)
    ref = store.produce("quantize", "1", {}, [], build)
    weights = store.path(ref) / "model.safetensors"
    st = weights.stat()
    time.sleep(0.05)  # a write within the clock tick of the one hashed leaves the same stamp (racy git's case)
    if change == "size":
        weights.write_bytes(b"weights")
    else:
        weights.write_bytes(b"X" + weights.read_bytes()[1:])
    if change == "same size and mtime":  # as a careful tamperer would leave it; ctime still moves
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    assert Store(tmp_path).current("quantize", ref.key) is None  # moved aside, to be built again
    rebuilt = Store(tmp_path).produce("quantize", "1", {}, [], build)
    assert rebuilt.digest == ref.digest and not rebuilt.reused


def test_a_read_only_store_remembers_nothing(tmp_path):
    ref = Store(tmp_path).produce("quantize", "1", {}, [], build)
    (tmp_path / "hashes.sqlite").unlink()
    assert Store(tmp_path, read_only=True).current("quantize", ref.key) is not None
    assert not (tmp_path / "hashes.sqlite").exists()
