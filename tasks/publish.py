"""publish: a cell's model card, its local export, and its upload to the Hugging Face Hub.

The card is the stage's artifact, keyed by the digest of the facts it shows (tasks/card.py),
so it changes when a sibling's numbers do and never otherwise. Delivering it (`deliver`) runs
on every publish and returns at once when it holds already: the export folder has this card
and the hub got it if it should have. Else it exports and uploads in one commit per cell:
huggingface_hub's create_commit drops every file whose content the repo already has (its
preupload call returns the remote oid; hf_api.py:5228-5258 in 2.4.0) and makes no commit when
nothing is left, so only what changed is sent. Model files of an earlier upload that this one
lacks (a stale shard) are deleted; files qsweep did not write stay. `--dry-run` prints the same
plan from our side (`plan_upload`: LFS files by sha256, others by git blob id) and sends nothing.

The token is read by huggingface_hub itself (HF_TOKEN or `hf auth login`) and never passes
through our code, logs, artifacts or cards; every message that leaves here is redacted.
"""

import fnmatch
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from storage.artifacts import ArtifactRef, Store, artifact_key
from storage.digests import MANIFEST, file_sha256
from tasks import card as cards
from tasks.download import MODEL_FILES, redact
from tasks.gates import describe, failed

CODE_VERSION = "5"  # 2: cards from tasks/card.py, keyed by their facts; 3: provenance line, short huge values;
# 4: quality gates (a failing cell is held back), score intervals with Holm marks, the author's notes, compare_with;
# 5: sizes in decimal units with one decimal (tasks/tables.human_bytes), '|' escaped in table cells
RECEIPT = ".qsweep-publish.json"  # in the export folder: which card it holds, where it was uploaded


class PublishError(RuntimeError):
    pass


# --- the hub -------------------------------------------------------------------------------------

@dataclass
class Upload:
    """What `--dry-run` says publishing a folder to a hub repo would send: one commit, or nothing."""

    repo_id: str
    private: bool
    message: str
    create: bool = False                                   # the repo does not exist yet (or is not visible)
    add: list[tuple[str, int]] = field(default_factory=list)  # (file, bytes) new or changed
    delete: list[str] = field(default_factory=list)        # model files of an earlier upload that this one lacks
    unchanged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)          # remote files qsweep did not write: left alone
    note: str = ""                                         # e.g. why the remote could not be read

    def operations(self) -> list[str]:
        ops = [f"create_repo {self.repo_id} ({'private' if self.private else 'public'})"] if self.create else []
        ops += [f"upload {name} ({size:,} bytes)" for name, size in self.add]
        ops += [f"delete {name}" for name in self.delete]
        if self.add or self.delete:
            ops.append(f'commit to {self.repo_id}: "{self.message}"')
        return ops or [f"nothing to send: {self.repo_id} already holds these {len(self.unchanged)} files"]


def git_blob_sha1(path: Path) -> str:
    """The id git (and the hub, for non-LFS files) gives a file's content."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def remote_files(api, repo_id: str) -> dict | None:
    """The repo's files with their blob ids and LFS digests; None when the repo does not exist."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:  # one request (a tree listing would page, and retry a down hub for 23 s)
        return {f.rfilename: f for f in api.model_info(repo_id, files_metadata=True).siblings or []}
    except RepositoryNotFoundError:
        return None


def _local(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != RECEIPT)


def _stale(remote_names, local_names) -> tuple[list[str], list[str]]:
    """Remote files this upload lacks: (model files qsweep wrote, to delete; the publisher's own, to keep)."""
    delete, kept = [], []
    for name in sorted(set(remote_names) - set(local_names)):
        ours = "/" not in name and (name == "README.md" or any(fnmatch.fnmatchcase(name, p) for p in MODEL_FILES))
        (delete if ours else kept).append(name)  # e.g. a shard of an earlier, larger upload
    return delete, kept


def plan_upload(folder: Path, repo_id: str, private: bool, message: str, remote: dict | None) -> Upload:
    """For `--dry-run`: compare `folder` with the repo's files (`remote_files`) as create_commit will."""
    plan = Upload(repo_id, private, message, create=remote is None)
    remote = remote or {}
    local = _local(folder)
    for path in local:
        there = remote.get(path.name)
        same = there is not None and (there.lfs.sha256 == file_sha256(path) if there.lfs else there.blob_id == git_blob_sha1(path))
        (plan.unchanged.append(path.name) if same else plan.add.append((path.name, path.stat().st_size)))
    plan.delete, plan.kept = _stale(remote, [p.name for p in local])
    return plan


def upload(api, folder: Path, repo_id: str, private: bool, message: str) -> dict:
    """`folder` to the repo in one commit, created if missing; what it did, for the receipt.
    create_commit leaves out the files the repo already holds, and sends no commit if that is all of them."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import RepositoryNotFoundError

    try:  # one request: the names to find stale files by, and the head a no-op commit returns
        info = api.model_info(repo_id)
        head, names = info.sha, [s.rfilename for s in info.siblings or []]
    except RepositoryNotFoundError:
        api.create_repo(repo_id, private=private, exist_ok=True)
        head, names = None, []
    local = _local(folder)
    delete, kept = _stale(names, [p.name for p in local])
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in local]
    operations += [CommitOperationDelete(path_in_repo=name) for name in delete]
    commit = api.create_commit(repo_id, operations=operations, commit_message=message, parent_commit=head)
    sent = commit.oid != head  # else the repo held every file already: no commit was made
    return {"repo": repo_id, "commit": str(commit.commit_url) if sent else None, "created": head is None,
            "deleted": delete if sent else [], "kept": kept}


def hub_error(e: Exception, repo_id: str) -> PublishError:
    """A hub failure as one clear line; never the hub's own exception, whose text may carry headers."""
    return PublishError(redact(f"publishing to hub repo {repo_id!r} failed: {_why(e)}. Every local result is intact; "
                               "retry the upload alone with `qsweep publish SWEEP_FILE`"))


def _why(e: Exception) -> str:
    from huggingface_hub import constants

    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        why = "the hub refused the token (401): set HF_TOKEN or run `hf auth login` with a token that can write"
    elif status == 403:
        why = ("no write access (403): the repo or its namespace belongs to someone else, "
               "or the token is read-only")
    elif status is None and (isinstance(e, (OSError, ConnectionError)) or "Connect" in type(e).__name__):
        why = f"the hub at {constants.ENDPOINT} is not reachable ({type(e).__name__})"
    else:
        first = (str(e).strip().splitlines() or [""])[0]
        why = f"{type(e).__name__}{f' {status}' if status else ''}: {first}"
    return redact(why)


def hub_api():
    from huggingface_hub import HfApi

    return HfApi()  # the token: huggingface_hub's own lookup (HF_TOKEN, then `hf auth login`)


def wants_upload(params: dict) -> bool:
    from huggingface_hub import get_token

    return bool(params.get("repo_id")) and get_token() is not None


def commit_message(params: dict, card_key: str, quantized: ArtifactRef) -> str:
    return (f"qsweep: {params['model']} with recipe {params['recipe']['name']} "
            f"(quantize artifact {quantized.key[:16]}, card {card_key[:16]})")


# --- the stage ------------------------------------------------------------------------------------

def export(model_dir: Path, card_dir: Path, dest: Path) -> None:
    """Model files plus the card into `dest`, replacing what was there, atomically."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name not in (MANIFEST, "README.md", RECEIPT):
            shutil.copyfile(f, tmp / f.name)
    shutil.copyfile(card_dir / "README.md", tmp / "README.md")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def held_at(store: Store, dest: Path) -> Path:
    """Where the card of a cell held back by its gates goes instead of its export: <store>/gated/<name>/."""
    return store.root / "gated" / dest.name


def _receipt(folder: Path) -> dict:
    try:
        return json.loads((folder / RECEIPT).read_text())
    except (OSError, ValueError):
        return {}


def gated(store: Store, card: ArtifactRef) -> list[dict]:
    """The gates this card's cell failed (the card artifact states them)."""
    return failed(json.loads((store.path(card) / "card.json").read_text()).get("gates", []))


def held(store: Store, card: ArtifactRef, allow_gated: bool) -> bool:
    """Whether this card's cell is held back: it failed a gate, and nobody let it out."""
    return bool(gated(store, card)) and not allow_gated


def delivered(store: Store, card_key: str, params: dict, dest: Path, allow_gated: bool = False) -> bool:
    """The export holds this card and it reached the hub if it should have; or, for a cell held back by
    its gates, the card is under <store>/gated/ and no export of the cell is left."""
    card = store.current("publish", card_key)
    return _holds(store, card_key, params, dest, card is not None and held(store, card, allow_gated))


def _holds(store: Store, card_key: str, params: dict, dest: Path, kept_back: bool) -> bool:
    if kept_back:
        return _receipt(held_at(store, dest)).get("card") == card_key and not (dest / RECEIPT).exists()
    receipt = _receipt(dest)
    return receipt.get("card") == card_key and (receipt.get("uploaded") is not None or not wants_upload(params))


def hold_back(store: Store, card: ArtifactRef, dest: Path) -> dict:
    """A cell that failed a gate: its card goes to <store>/gated/<name>/, and an earlier export of it
    (which the hub could be sent from) is removed, since the model in it is now known to fail."""
    held = held_at(store, dest)
    held.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(store.path(card) / "README.md", held / "README.md")
    earlier = _receipt(dest)
    if (dest / RECEIPT).exists():  # only a folder qsweep exported
        shutil.rmtree(dest)
    receipt = {"card": card.key, "exported_to": None, "uploaded": None, "held_at": str(held),
               "gated": describe(gated(store, card))}
    if (earlier.get("uploaded") or {}).get("repo"):  # qsweep deletes nothing on the hub: say what stays there
        receipt["note"] = (f"an earlier upload of this cell is still on the hub at {earlier['uploaded']['repo']}, "
                           "with a card from before it failed; remove or update it there")
    (held / RECEIPT).write_text(json.dumps(receipt, indent=2))
    return receipt


def deliver(store: Store, card: ArtifactRef, quantized: ArtifactRef, params: dict, dest: Path,
            allow_gated: bool = False) -> dict:
    """Export the model with its card to `dest`, upload it when asked and able; return the receipt.
    A cell that failed a gate is held back instead, unless `allow_gated`. Run on every publish: when
    this card is delivered already, it returns the receipt, copying nothing and asking the hub nothing."""
    kept_back = held(store, card, allow_gated)
    if _holds(store, card.key, params, dest, kept_back):
        return _receipt(held_at(store, dest) if kept_back else dest)
    if kept_back:
        return hold_back(store, card, dest)
    shutil.rmtree(held_at(store, dest), ignore_errors=True)  # let out after all: no longer held
    receipt = {"card": card.key, "exported_to": str(dest), "uploaded": None}
    if _receipt(dest).get("card") != card.key:  # else the export holds this card already: upload from it
        export(store.path(quantized), store.path(card), dest)
        (dest / RECEIPT).write_text(json.dumps(receipt, indent=2))  # so that a failed upload re-exports nothing
    if params.get("repo_id"):
        if wants_upload(params):
            api, repo = hub_api(), params["repo_id"]
            try:
                receipt["uploaded"] = upload(api, dest, repo, params.get("private", True),
                                             commit_message(params, card.key, quantized))
            except Exception as e:
                raise hub_error(e, repo) from None
        else:
            receipt["note"] = "no hub token (HF_TOKEN or `hf auth login`): exported locally only"
    (dest / RECEIPT).write_text(json.dumps(receipt, indent=2))
    return receipt


def card_params(store: Store, params: dict, refs: dict[str, ArtifactRef]) -> tuple[dict, cards.CardFacts]:
    """The publish stage's parameters: the sweep's settings plus the digest of what the card shows."""
    facts = cards.gather(store, params, refs)
    return {**params, "facts": facts.digest()}, facts


def card_inputs(refs: dict[str, ArtifactRef]) -> list[ArtifactRef]:
    return [refs[s] for s in ("quantize", "smoke", "benchmark", "fidelity") if s in refs]


def dry_run(store: Store, params: dict, refs: dict[str, ArtifactRef]) -> tuple[str, Upload | None, list[dict]]:
    """The card this cell would publish, the hub operations it would send, and the gates it fails;
    sends nothing, needs no token."""
    params, facts = card_params(store, params, refs)
    text, repo = cards.render(facts), params.get("repo_id")
    if not repo:
        return text, None, failed(facts.gates)
    message = commit_message(params, artifact_key("publish", CODE_VERSION, params, card_inputs(refs)), refs["quantize"])
    with tempfile.TemporaryDirectory(prefix="qsweep-dry-run-") as staging:  # not in the store: a dry run writes nothing there
        staging = Path(staging)
        for f in store.path(refs["quantize"]).iterdir():  # links: the plan needs names and contents, not copies
            if f.is_file() and f.name not in (MANIFEST, "README.md"):
                (staging / f.name).symlink_to(f)
        (staging / "README.md").write_text(text)
        try:
            remote, note = remote_files(hub_api(), repo), ""
        except Exception as e:  # offline, or a repo we may not read: say so, and plan as for a new repo
            remote, note = None, f"could not read {repo} on the hub ({_why(e)}); planned as for a new repo"
        plan = plan_upload(staging, repo, params.get("private", True), message, remote)
        plan.note = note
    return text, plan, failed(facts.gates)


def build(job) -> dict:
    """The publish stage (tasks/registry.py) builds the card only: `params` already carry the digest of
    job.extra["facts"] (card_params), so the key says what the card shows. Delivering it is the flow's
    next, uncached step (deliver)."""
    return cards.write(cards.CardFacts(**job.extra["facts"]), job.out)
