"""publish: the card as an artifact, the local export, and the upload, against tests/hub_server.py.

The real huggingface_hub client talks HTTP to FakeHub on 127.0.0.1, as it would to the hub.
"""

import shutil
import socket

import pytest
from huggingface_hub import constants, get_token
from mlx_lm import load

from conftest import publish_params
from hub_server import FakeHub
from storage.artifacts import Store
from storage.digests import MANIFEST
from storage.metrics import MetricStore
from tasks import card as cards
from tasks import publish
from tasks.publish import PublishError
from tasks.recipes import BUILTINS

TOKEN = "hf_SECRETtoken123alice"
BOB = "hf_SECRETtoken456bob"


@pytest.fixture
def store(measured, tmp_path):
    """This test's own copy of the measured store, so that no publish carries over between tests."""
    return Store(shutil.copytree(measured[0].root, tmp_path / "store"))


def card_and_delivery(store, params, refs, dest, allow_gated=False):
    """What a sweep's publish step does: the card as a stored artifact, then its delivery."""
    params, facts = publish.card_params(store, params, refs)
    card = store.produce("publish", publish.CODE_VERSION, params, publish.card_inputs(refs),
                         lambda out: cards.write(facts, out))
    return card, publish.deliver(store, card, refs["quantize"], params, dest, allow_gated)


def run_publish(store, measured, dest, recipe="qx86-hi", **change):
    """The publish step for one cell; returns (card text, receipt)."""
    _, refs, resolved = measured
    card, receipt = card_and_delivery(store, publish_params("tiny", resolved, BUILTINS[recipe], **change), refs[recipe], dest)
    return (store.path(card) / "README.md").read_text(), receipt


@pytest.fixture
def no_stored_token(tmp_path, monkeypatch):
    """No token from the environment nor from a `hf auth login` on this machine."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))


@pytest.fixture
def hub(no_stored_token, monkeypatch, tmp_path):
    """A hub where the token TOKEN is alice's and bob owns bob/taken; huggingface_hub points at it."""
    monkeypatch.setenv("HF_XET_LOG_DEST", str(tmp_path / "xet-logs"))
    with FakeHub(tokens={TOKEN: "alice", BOB: "bob"}) as server, server.patched_client():
        server.add_repo("bob/taken", {"README.md": "# bob's\n"})
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def leaked(token: str, *roots) -> list:
    return [p for root in roots for p in root.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]


# --- the export -----------------------------------------------------------------------------------

def test_export_holds_model_and_card_and_loads(measured, store, tmp_path):
    q = measured[1]["qx86-hi"]["quantize"]
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "stale.bin").write_bytes(b"from an earlier export")
    card, receipt = run_publish(store, measured, dest)

    assert receipt["exported_to"] == str(dest) and receipt["uploaded"] is None
    model_files = {p.name for p in store.path(q).iterdir() if p.name not in (MANIFEST, "README.md")}
    assert {p.name for p in dest.iterdir()} == model_files | {"README.md", publish.RECEIPT}
    for name in model_files:
        assert (dest / name).read_bytes() == (store.path(q) / name).read_bytes(), name
    assert (dest / "README.md").read_text() == card
    model, tokenizer = load(str(dest))
    assert tokenizer.chat_template is not None


def test_the_card_is_keyed_by_what_it_shows(measured, store, tmp_path):
    run_publish(store, measured, tmp_path / "a")
    run_publish(store, measured, tmp_path / "b")  # the same facts: the same card artifact
    assert len(list((store.root / "artifacts" / "publish").iterdir())) == 1
    with MetricStore(store.metrics_db).connect() as con:  # a sibling's numbers change
        con.execute("UPDATE metrics SET value = 1 - value WHERE recipe = 'q4' AND metric = 'acc'")
    run_publish(store, measured, tmp_path / "a")
    assert len(list((store.root / "artifacts" / "publish").iterdir())) == 2


def test_repo_without_token_exports_locally(measured, store, tmp_path, no_stored_token):
    assert get_token() is None
    dest = tmp_path / "export"
    card, receipt = run_publish(store, measured, dest, repo_id="me/tiny-qx86-hi-mlx")
    assert receipt["uploaded"] is None and "token" in receipt["note"]
    assert (dest / "README.md").read_text() == card
    assert 'load("me/tiny-qx86-hi-mlx")' in card


def test_delivering_a_delivered_card_again_touches_nothing(measured, store, tmp_path, hub):
    dest, repo = tmp_path / "export", "alice/tiny-qx86-hi-mlx"
    _, first = run_publish(store, measured, dest, repo_id=repo)
    mtimes = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    requests = len(hub.requests)
    _, again = run_publish(store, measured, dest, repo_id=repo)
    assert again == first and len(hub.requests) == requests  # not one request to the hub
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == mtimes  # nor one file rewritten

    _, held = run_publish(store, measured, dest, repo_id=repo, gates=STRICT)  # held back, then the same again
    mtimes = {p.name: p.stat().st_mtime_ns for p in publish.held_at(store, dest).iterdir()}
    assert run_publish(store, measured, dest, repo_id=repo, gates=STRICT)[1] == held
    assert {p.name: p.stat().st_mtime_ns for p in publish.held_at(store, dest).iterdir()} == mtimes
    assert len(hub.requests) == requests and len(hub.commits[repo]) == 1


def test_a_deleted_export_is_not_delivered(measured, store, tmp_path):
    run_publish(store, measured, tmp_path / "export")
    key = next((store.root / "artifacts" / "publish").iterdir()).name
    params = publish_params("tiny", measured[2], BUILTINS["qx86-hi"])
    assert publish.delivered(store, key, params, tmp_path / "export")
    shutil.rmtree(tmp_path / "export")
    assert not publish.delivered(store, key, params, tmp_path / "export")
    assert not publish.delivered(store, key, params, tmp_path / "elsewhere")


# --- quality gates ----------------------------------------------------------------------------------

STRICT = {"max_kl_mean": 1e-9}  # a gate no quantized variant passes: this cell fails it


def test_a_cell_that_fails_a_gate_is_carded_but_not_exported(measured, store, tmp_path):
    dest = tmp_path / "export"
    run_publish(store, measured, dest)  # exported while it passed its gates
    assert (dest / publish.RECEIPT).exists()
    card, receipt = run_publish(store, measured, dest, gates=STRICT)  # then the gate tightens
    assert not dest.exists()  # the earlier export, which `hf upload` could have sent, is gone
    held = store.root / "gated" / "export"
    assert receipt["exported_to"] is None and receipt["held_at"] == str(held)
    assert (held / "README.md").read_text() == card and "failed qsweep's quality gates" in card
    assert "max_kl_mean" in receipt["gated"] and not list(held.glob("*.safetensors"))
    key = receipt["card"]
    params = publish_params("tiny", measured[2], BUILTINS["qx86-hi"], gates=STRICT)
    assert publish.delivered(store, key, params, dest)  # held back is its delivery: done, nothing to redo
    assert not publish.delivered(store, key, params, dest, allow_gated=True)


def test_a_gated_cell_goes_out_only_when_allowed_with_its_banner(measured, store, tmp_path, hub):
    dest = tmp_path / "export"
    card, receipt = run_publish(store, measured, dest, gates=STRICT, repo_id="alice/tiny-qx86-hi-mlx")
    assert "alice/tiny-qx86-hi-mlx" not in hub.hosted and receipt["uploaded"] is None  # never uploaded
    _, refs, resolved = measured
    params = publish_params("tiny", resolved, BUILTINS["qx86-hi"], gates=STRICT, repo_id="alice/tiny-qx86-hi-mlx")
    card_ref, receipt = card_and_delivery(store, params, refs["qx86-hi"], dest, allow_gated=True)
    assert receipt["uploaded"]["repo"] == "alice/tiny-qx86-hi-mlx" and not (store.root / "gated" / "export").exists()
    assert "failed qsweep's quality gates" in hub.contents("alice/tiny-qx86-hi-mlx")["README.md"].decode()
    text, plan, failed = publish.dry_run(store, params, refs["qx86-hi"])
    assert [g["gate"] for g in failed] == ["max_kl_mean"]


# --- the hub --------------------------------------------------------------------------------------

def test_upload_creates_a_private_repo_in_one_commit_naming_recipe_and_key(measured, store, tmp_path, hub):
    card, receipt = run_publish(store, measured, tmp_path / "export", repo_id="alice/tiny-qx86-hi-mlx")
    [commit] = hub.commits["alice/tiny-qx86-hi-mlx"]
    quantized = measured[1]["qx86-hi"]["quantize"].key
    assert "qx86-hi" in commit["message"] and quantized[:16] in commit["message"]
    assert hub.hosted["alice/tiny-qx86-hi-mlx"].private
    remote = hub.contents("alice/tiny-qx86-hi-mlx")
    local = {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir() if p.name != publish.RECEIPT}
    assert remote == local and remote["README.md"].decode() == card
    assert receipt["uploaded"]["repo"] == "alice/tiny-qx86-hi-mlx" and receipt["uploaded"]["created"]
    assert receipt["uploaded"]["commit"].endswith(commit["sha"])
    assert leaked(TOKEN, store.root, tmp_path) == []


def test_republishing_sends_nothing_and_a_new_sibling_sends_only_the_card(measured, store, tmp_path, hub):
    repo = "alice/tiny-qx86-hi-mlx"
    run_publish(store, measured, tmp_path / "export", repo_id=repo)
    shutil.rmtree(tmp_path / "export")  # delivered again, but the hub already holds every file
    requests = len(hub.requests)
    _, receipt = run_publish(store, measured, tmp_path / "export", repo_id=repo)
    assert len(hub.commits[repo]) == 1 and receipt["uploaded"]["commit"] is None
    assert not receipt["uploaded"]["created"] and receipt["uploaded"]["deleted"] == []
    assert not [r for r in hub.requests[requests:] if r["method"] == "PUT"]  # no weights sent again either

    with MetricStore(store.metrics_db).connect() as con:  # as if a sibling had finished since
        con.execute("UPDATE metrics SET value = 1 - value WHERE recipe = 'q4' AND metric = 'acc'")
    run_publish(store, measured, tmp_path / "export", repo_id=repo)
    assert len(hub.commits[repo]) == 2
    assert hub.commits[repo][1]["operations"] == [("add", "README.md")]


def test_stale_model_files_go_and_the_publishers_own_files_stay(measured, store, tmp_path, hub):
    repo = "alice/tiny-qx86-hi-mlx"
    run_publish(store, measured, tmp_path / "export", repo_id=repo)
    from huggingface_hub import CommitOperationAdd, HfApi

    HfApi().create_commit(repo, operations=[
        CommitOperationAdd(path_in_repo="model-00002-of-00002.safetensors", path_or_fileobj=b"an old shard"),
        CommitOperationAdd(path_in_repo="images/chart.png", path_or_fileobj=b"the publisher's own")],
        commit_message="by hand")
    _, refs, resolved = measured
    params = publish_params("tiny", resolved, BUILTINS["qx86-hi"], repo_id=repo)
    _, plan, _ = publish.dry_run(store, params, refs["qx86-hi"])  # what --dry-run says
    assert plan.delete == ["model-00002-of-00002.safetensors"] and plan.kept == ["images/chart.png"]
    assert plan.add == [] and not plan.create

    shutil.rmtree(tmp_path / "export")  # delivered again: what it does
    _, receipt = run_publish(store, measured, tmp_path / "export", repo_id=repo)
    assert hub.commits[repo][-1]["operations"] == [("delete", "model-00002-of-00002.safetensors")]
    assert receipt["uploaded"]["deleted"] == plan.delete and receipt["uploaded"]["kept"] == plan.kept
    assert hub.contents(repo)["images/chart.png"] == b"the publisher's own"


def test_hub_errors_are_clear_and_keep_every_local_result(measured, store, tmp_path, hub, monkeypatch):
    dest = tmp_path / "export"
    with pytest.raises(PublishError) as err:  # someone else's repo
        run_publish(store, measured, dest, repo_id="bob/taken")
    assert "403" in str(err.value) and "belongs to someone else" in str(err.value)
    assert "qsweep publish" in str(err.value) and err.value.__cause__ is None
    assert (dest / "README.md").exists() and len(list((store.root / "artifacts" / "publish").iterdir())) == 1

    monkeypatch.setenv("HF_TOKEN", "hf_SECRETnotAtokenAnyoneHas")
    with pytest.raises(PublishError) as err:
        run_publish(store, measured, dest, repo_id="alice/tiny-qx86-hi-mlx")
    assert "401" in str(err.value) and "hf auth login" in str(err.value)
    assert "hf_SECRETnotAtokenAnyoneHas" not in str(err.value)

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # fixed: the retry publishes, nothing measured again
    _, receipt = run_publish(store, measured, dest, repo_id="alice/tiny-qx86-hi-mlx")
    assert receipt["uploaded"]["repo"] == "alice/tiny-qx86-hi-mlx" and len(hub.commits["alice/tiny-qx86-hi-mlx"]) == 1


def test_an_unreachable_hub_fails_clearly_and_publish_tries_again(measured, store, tmp_path, no_stored_token, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    dest = store.root / "published" / "tiny-qx86-hi-mlx"
    with pytest.raises(PublishError) as err:
        run_publish(store, measured, dest, repo_id="me/tiny-qx86-hi-mlx")
    assert "not reachable" in str(err.value) and TOKEN not in str(err.value) and err.value.__cause__ is None
    key = next((store.root / "artifacts" / "publish").iterdir()).name  # the card itself is fine
    params = publish_params("tiny", measured[2], BUILTINS["qx86-hi"], repo_id="me/tiny-qx86-hi-mlx")
    assert not publish.delivered(store, key, params, dest)  # so the next run tries again
    assert leaked(TOKEN, store.root, tmp_path) == []


def test_dry_run_lists_the_operations_without_a_token_and_sends_nothing(measured, store, tmp_path, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    requests_before = len(hub.requests)
    _, refs, resolved = measured
    params = publish_params("tiny", resolved, BUILTINS["qx86-hi"], repo_id="alice/new-repo")
    text, plan, failed = publish.dry_run(store, params, refs["qx86-hi"])
    assert failed == []
    ops = plan.operations()
    assert ops[0] == "create_repo alice/new-repo (private)"
    files = {p.name for p in store.path(refs["qx86-hi"]["quantize"]).iterdir() if p.name != MANIFEST} | {"README.md"}
    assert {op.split()[1] for op in ops if op.startswith("upload ")} == files
    assert ops[-1].startswith('commit to alice/new-repo: "qsweep: tiny with recipe qx86-hi')
    assert "alice/new-repo" not in hub.hosted
    assert all(r["method"] == "GET" and r["authorization"] is None for r in hub.requests[requests_before:])
    assert not (store.root / "artifacts" / "publish").exists()  # nothing stored either
    assert text.startswith("---\n")

    hub.add_repo("alice/new-repo", {"README.md": text})  # a repo holding this very card
    _, plan, _ = publish.dry_run(store, params, refs["qx86-hi"])
    assert "README.md" in plan.unchanged and not plan.create


def test_dry_run_with_the_hub_unreachable_plans_for_a_new_repo_and_says_so(measured, store, no_stored_token, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _, refs, resolved = measured
    _, plan, _ = publish.dry_run(store, publish_params("tiny", resolved, BUILTINS["q4"], repo_id="me/q4"), refs["q4"])
    assert plan.create and "not reachable" in plan.note and plan.operations()[0] == "create_repo me/q4 (private)"
