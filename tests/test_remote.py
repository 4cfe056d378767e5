"""Mirror: artifacts shared between machines through an fsspec filesystem."""

import hashlib
import importlib.util
import json
import uuid

import fsspec
import pytest

from storage.artifacts import Store
from storage.digests import MANIFEST, digest_files, scan_files
from storage.metrics import MetricStore
from storage.remote import Mirror, redact
from storage.workspace import open_store

PARAMS = {"bits": 4}


def build(out):
    (out / "model.bin").write_bytes(b"weights" * 1000)
    (out / "sub" / "deeper").mkdir(parents=True)
    (out / "sub" / "deeper" / "notes.txt").write_text("notes")
    return {"metrics": []}


@pytest.fixture(params=["memory", "file"])
def mirror_url(request, tmp_path):
    if request.param == "file":
        yield (tmp_path / "remote").as_uri()
        return
    url = f"memory://qsweep-test-{uuid.uuid4().hex}"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture
def pushed(tmp_path, mirror_url):
    """A store on machine A that built an artifact and pushed it: (mirror, store, ref)."""
    store = Store(tmp_path / "a")
    ref = store.produce("quantize", "1", PARAMS, [], build)
    mirror = Mirror(mirror_url)
    mirror.push(store.path(ref), ref.stage, ref.key)
    return mirror, store, ref


def test_pull_on_another_machine_gets_the_same_artifact(pushed, tmp_path):
    mirror, a, ref = pushed
    b = Store(tmp_path / "b")
    dest = b.path(ref).with_name(f".tmp-{ref.key}-1")
    assert mirror.has(ref.stage, ref.key)
    assert mirror.pull(ref.stage, ref.key, dest) is True
    dest.rename(b.path(ref))

    got = b.current(ref.stage, ref.key)  # the store's own verification accepts it
    assert got is not None and got.digest == ref.digest
    assert (b.path(ref) / "sub" / "deeper" / "notes.txt").read_text() == "notes"
    assert scan_files(b.path(ref)) == scan_files(a.path(ref))
    assert digest_files(scan_files(b.path(ref))) == ref.digest
    assert b.manifest(got) == a.manifest(ref)


def test_pull_of_an_unknown_key_is_false(tmp_path, mirror_url):
    dest = tmp_path / "dest"
    assert Mirror(mirror_url).has("quantize", "0" * 64) is False
    assert Mirror(mirror_url).pull("quantize", "0" * 64, dest) is False
    assert not dest.exists()


def test_interrupted_push_is_not_there(pushed, tmp_path):
    mirror, _, ref = pushed
    mirror.fs.rm(mirror._path(ref.stage, ref.key, MANIFEST))  # the push died before its last upload
    dest = tmp_path / "dest"
    dest.mkdir()
    assert mirror.has(ref.stage, ref.key) is False
    assert mirror.pull(ref.stage, ref.key, dest) is False
    assert list(dest.iterdir()) == []


def test_altered_remote_file_is_refused_and_nothing_stays(pushed, tmp_path):
    mirror, _, ref = pushed
    mirror.fs.pipe_file(mirror._path(ref.stage, ref.key, "sub/deeper/notes.txt"), b"tampered")
    dest = tmp_path / "dest"
    assert mirror.pull(ref.stage, ref.key, dest) is False
    assert not dest.exists()

    mirror.fs.rm(mirror._path(ref.stage, ref.key, "model.bin"))  # a file the manifest names is gone
    assert mirror.pull(ref.stage, ref.key, dest) is False
    assert not dest.exists()


def test_manifest_naming_files_outside_the_artifact_is_refused(pushed, tmp_path):
    mirror, store, ref = pushed
    manifest = store.manifest(ref)
    manifest["files"]["../../escape.txt"] = {"sha256": hashlib.sha256(b"x").hexdigest(), "bytes": 1}
    for where in (mirror._path(ref.stage, ref.key, "../../escape.txt"), f"{mirror.root}/escape.txt"):
        mirror.fs.pipe_file(where, b"x")  # the file is there, so only the name check stops it
    mirror.fs.pipe_file(mirror._path(ref.stage, ref.key, MANIFEST), json.dumps(manifest).encode())
    assert mirror.pull(ref.stage, ref.key, tmp_path / "x" / "dest") is False
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "x" / "dest").exists()


def test_push_twice_is_harmless_and_a_torn_manifest_is_repaired(pushed, tmp_path):
    mirror, store, ref = pushed
    where = mirror._path(ref.stage, ref.key, MANIFEST)
    before = mirror.fs.cat_file(where)
    mirror.push(store.path(ref), ref.stage, ref.key)
    assert mirror.fs.cat_file(where) == before

    # Another machine's build of the same key (a non-deterministic build): the first complete copy stays.
    c = Store(tmp_path / "c")
    other = c.produce("quantize", "1", PARAMS, [], lambda out: (out / "model.bin").write_bytes(b"other"))
    assert other.key == ref.key and other.digest != ref.digest
    mirror.push(c.path(other), other.stage, other.key)
    assert mirror.fs.cat_file(where) == before
    assert mirror.fs.cat_file(mirror._path(ref.stage, ref.key, "model.bin")) != b"other"

    mirror.fs.pipe_file(where, before[:20])  # a push killed mid-write on a shared disk
    mirror.push(store.path(ref), ref.stage, ref.key)
    assert mirror.fs.cat_file(where) == before
    assert mirror.pull(ref.stage, ref.key, tmp_path / "dest") is True


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", "."])
def test_bad_stage_or_key_is_refused(pushed, tmp_path, bad):
    mirror, store, ref = pushed
    for call in (lambda: mirror.has(ref.stage, bad), lambda: mirror.has(bad, ref.key),
                 lambda: mirror.push(store.path(ref), ref.stage, bad),
                 lambda: mirror.pull(bad, ref.key, tmp_path / "dest")):
        with pytest.raises(ValueError):
            call()
    assert not (tmp_path / "dest").exists()


def test_pull_refuses_a_dest_with_files(pushed, tmp_path):
    mirror, _, ref = pushed
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError):
        mirror.pull(ref.stage, ref.key, tmp_path / "dest")
    assert (tmp_path / "dest" / "mine.txt").read_text() == "keep"


def test_repr_hides_credentials():
    assert redact("s3://user:secret@bucket/x") == "s3://bucket/x"
    assert redact("https://host/x?X-Amz-Signature=secret") == "https://host/x"
    assert redact("file:///nfs/qsweep") == "file:///nfs/qsweep"
    if importlib.util.find_spec("s3fs") is not None:
        mirror = Mirror("s3://user:secret@bucket/x")
    else:  # s3fs is not installed here; memory:// keeps the userinfo in its path, so it must be hidden too
        mirror = Mirror(f"memory://user:secret@qsweep-test-{uuid.uuid4().hex}")
    assert "secret" not in repr(mirror) and "secret" not in str(mirror) and "secret" not in mirror.url


def test_two_stores_one_mirror_build_each_artifact_once(tmp_path, mirror_url, monkeypatch):
    """Machine A builds and pushes; machine B, with its own store, pulls instead of building."""
    built = []

    def counted(out):
        built.append(out)
        return build(out)

    a = open_store(tmp_path / "a", mirror=mirror_url)
    ref_a = a.produce("quantize", "1", PARAMS, [], counted)
    monkeypatch.setenv("QSWEEP_MIRROR", mirror_url)  # how a worker's machine is told
    b = open_store(tmp_path / "b")
    ref_b = b.produce("quantize", "1", PARAMS, [], counted)
    assert len(built) == 1 and ref_b.reused and ref_b.digest == ref_a.digest
    assert scan_files(b.path(ref_b)) == scan_files(a.path(ref_a))
    assert not [p for p in b.path(ref_b).parent.iterdir() if p.name.startswith(".")]
    # an artifact altered on the mirror is refused there and built locally instead
    fs, root = fsspec.core.url_to_fs(mirror_url)
    ref2 = a.produce("smoke", "1", PARAMS, [ref_a], counted)
    fs.pipe_file(f"{root}/smoke/{ref2.key}/model.bin", b"tampered")
    ref2_b = b.produce("smoke", "1", PARAMS, [ref_b], counted)
    assert len(built) == 3 and ref2_b.digest == ref2.digest
    c = open_store(tmp_path / "c")  # and B's push repaired the mirror
    assert c.produce("smoke", "1", PARAMS, [ref_a], counted).reused and len(built) == 3
    [(kind, stage)] = MetricStore(b.metrics_db).query("SELECT kind, stage FROM events")[1]
    assert (kind, stage) == ("corrupt", "smoke")
