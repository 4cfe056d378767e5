"""tests/hub_server.py can be published to: the real huggingface_hub client against FakeHub on 127.0.0.1."""

import hashlib
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from huggingface_hub import (CommitOperationAdd, CommitOperationDelete, HfApi, constants, hf_hub_download,
                             snapshot_download)
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile
from safetensors.numpy import load_file, save_file

from hub_server import FakeHub

ALICE = "hf_alice_secret_0123456789"
BOB = "hf_bob_secret_9876543210"
WRONG = "hf_wrong_secret_5555555555"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """alice (also in org acme) and bob; bob owns the public bob/taken. huggingface_hub points here."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_XET_LOG_DEST", str(tmp_path / "xet-logs"))  # hf_xet reads it on import
    with FakeHub(tokens={ALICE: "alice", BOB: "bob"}, orgs={"acme": {"alice"}}) as server, server.patched_client():
        server.add_repo("bob/taken", {"README.md": "# bob's\n"})
        yield server


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "export"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    (d / "README.md").write_text("---\nlicense: mit\n---\n# tiny, quantized\n")
    save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float16)},
              str(d / "model.safetensors"))
    return d


def api(hub: FakeHub, token) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=token)


def test_whoami(hub):
    me = api(hub, ALICE).whoami()
    assert me["name"] == "alice" and [o["name"] for o in me["orgs"]] == ["acme"]


def test_publish_download_and_delete(hub, folder, tmp_path):
    alice = api(hub, ALICE)
    url = alice.create_repo("alice/tiny", private=True)
    assert url.repo_id == "alice/tiny"
    assert alice.create_repo("alice/tiny", private=True, exist_ok=True).repo_id == "alice/tiny"  # 409, handled

    first = alice.upload_folder(repo_id="alice/tiny", folder_path=folder, commit_message="publish tiny")
    assert hub.commits["alice/tiny"] == [{"sha": first.oid, "message": "publish tiny", "user": "alice",
                                          "operations": [("add", "README.md"), ("add", "config.json"),
                                                         ("add", "model.safetensors")]}]
    assert alice.model_info("alice/tiny").sha == first.oid and alice.model_info("alice/tiny").private

    # The LFS route: preupload said "lfs", batch API (basic), PUT of the bytes without the token, commit.
    calls = [(r["method"], r["path"]) for r in hub.requests]
    for call in [("POST", "/api/models/alice/tiny/preupload/main"), ("POST", "/alice/tiny.git/info/lfs/objects/batch"),
                 ("POST", "/api/models/alice/tiny/commit/main")]:
        assert call in calls
    puts = [r for r in hub.requests if r["method"] == "PUT"]
    assert len(puts) == 1 and puts[0]["authorization"] is None
    assert not any("xet" in path for _, path in calls)

    tree = {e.path: e for e in alice.list_repo_tree("alice/tiny", recursive=True, expand=True)}
    assert set(tree) == {"config.json", "README.md", "model.safetensors"}
    assert all(isinstance(e, RepoFile) for e in tree.values())
    weights = (folder / "model.safetensors").read_bytes()
    lfs = tree["model.safetensors"].lfs
    assert lfs.sha256 == hashlib.sha256(weights).hexdigest() and lfs.size == len(weights) == tree["model.safetensors"].size
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (lfs.sha256.encode(), len(weights))
    assert tree["model.safetensors"].blob_id == git_sha1(pointer) and lfs.pointer_size == len(pointer)
    for name in ("config.json", "README.md"):
        assert tree[name].lfs is None and tree[name].blob_id == git_sha1((folder / name).read_bytes())

    # Download back what was published.
    snap = snapshot_download("alice/tiny", token=ALICE, cache_dir=tmp_path / "cache")
    for name in tree:
        assert (Path(snap) / name).read_bytes() == (folder / name).read_bytes()
    assert load_file(hf_hub_download("alice/tiny", "model.safetensors", token=ALICE, cache_dir=tmp_path / "c2"))["w"][2, 3] == 11
    assert hub.contents("alice/tiny") == {p.name: p.read_bytes() for p in folder.iterdir()}

    # Unchanged files are not sent again: no commit at all, and no LFS bytes (the batch API says it has them).
    again = alice.upload_folder(repo_id="alice/tiny", folder_path=folder)
    assert len(hub.commits["alice/tiny"]) == 1 and again.oid == first.oid
    assert len([r for r in hub.requests if r["method"] == "PUT"]) == 1

    # A second commit: a delete and an add. The first commit stays readable by its sha.
    second = alice.create_commit("alice/tiny", [CommitOperationDelete("config.json"),
                                               CommitOperationAdd("notes.txt", b"second")], commit_message="trim")
    assert second.oid != first.oid
    assert hub.commits["alice/tiny"][-1] == {"sha": second.oid, "message": "trim", "user": "alice",
                                             "operations": [("delete", "config.json"), ("add", "notes.txt")]}
    assert sorted(alice.list_repo_files("alice/tiny")) == ["README.md", "model.safetensors", "notes.txt"]
    assert hub.contents("alice/tiny")["notes.txt"] == b"second"
    old = hf_hub_download("alice/tiny", "config.json", revision=first.oid, token=ALICE, cache_dir=tmp_path / "c3")
    assert Path(old).read_bytes() == (folder / "config.json").read_bytes()


def test_a_bad_or_missing_token_is_401_and_never_echoed(hub, folder):
    for token in (WRONG, False):
        bad = api(hub, token)
        for attempt in (lambda: bad.create_repo("alice/x", exist_ok=True),
                        lambda: bad.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="bob/taken")):
            with pytest.raises(HfHubHTTPError) as e:
                attempt()
            assert e.value.response.status_code == 401
            assert WRONG not in str(e.value) and WRONG not in repr(e.value)
    with pytest.raises(HfHubHTTPError) as e:
        api(hub, WRONG).whoami()
    assert e.value.response.status_code == 401 and WRONG not in str(e.value)
    assert "alice/x" not in hub.hosted and hub.commits["bob/taken"] == []


def test_writing_to_someone_elses_namespace_is_403(hub, folder):
    alice = api(hub, ALICE)
    with pytest.raises(HfHubHTTPError) as e:
        alice.create_repo("bob/new")
    assert e.value.response.status_code == 403
    assert 'You don\'t have the rights to create a model under the namespace "bob"' in str(e.value)

    alice.create_repo("bob/taken", exist_ok=True)  # as on the hub: 403, but the repo exists, so no error
    for attempt in (lambda: alice.upload_folder(repo_id="bob/taken", folder_path=folder),
                    lambda: alice.create_commit("bob/taken", [CommitOperationDelete("README.md")], commit_message="x")):
        with pytest.raises(HfHubHTTPError) as e:
            attempt()
        assert e.value.response.status_code == 403
    assert hub.contents("bob/taken") == {"README.md": b"# bob's\n"} and hub.commits["bob/taken"] == []

    assert alice.create_repo("acme/shared").repo_id == "acme/shared"  # her org's namespace is hers to write
    alice.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="acme/shared")
    assert hub.contents("acme/shared") == {"config.json": b"{}"}


def test_a_private_repo_is_invisible_to_others(hub, tmp_path):
    bob = api(hub, BOB)
    bob.create_repo("bob/secret", private=True)
    bob.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="bob/secret")
    assert bob.repo_exists("bob/secret")

    for token, status in ((ALICE, 404), (False, 401)):
        other = api(hub, token)
        assert not other.repo_exists("bob/secret")
        for attempt in (lambda: other.model_info("bob/secret"),
                        lambda: list(other.list_repo_tree("bob/secret", recursive=True, expand=True)),
                        lambda: hf_hub_download("bob/secret", "config.json", token=token, cache_dir=tmp_path / "c")):
            with pytest.raises(RepositoryNotFoundError) as e:
                attempt()
            assert e.value.response.status_code == status
    with pytest.raises(RepositoryNotFoundError):  # not 403: alice may not learn that it exists
        api(hub, ALICE).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="bob/secret")


def test_the_client_alone_chooses_xet(hub, folder):
    """Why patched_client turns Xet off: huggingface_hub 2.x uploads LFS content through Xet whenever
    hf_xet is installed, without asking the server. The fake refuses the Xet token, so it fails fast."""
    pytest.importorskip("hf_xet")
    alice = api(hub, ALICE)
    alice.create_repo("alice/xet")
    with mock.patch.object(constants, "HF_HUB_DISABLE_XET", False), pytest.raises(Exception):
        alice.upload_folder(repo_id="alice/xet", folder_path=folder)
    assert any(r["path"] == "/api/models/alice/xet/xet-write-token/main" for r in hub.requests)
    assert hub.commits["alice/xet"] == []
