"""Content-addressed artifact store.

An artifact is a directory of files under `<root>/artifacts/<stage>/<key>/`
with a `manifest.json` that records how it was made (key inputs, tool
versions, timings) and the sha256 of every file. Its *digest* covers the files
only, so downstream keys depend on content, never on when or where it was made.
Writes go to a temporary directory first and are renamed into place, so a
killed process leaves either a whole artifact or none.
"""

import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from storage.keys import canonical_json, stage_key, tool_versions

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ArtifactRef:
    """What stages hand each other: small, hashable, location-free."""

    stage: str
    key: str
    digest: str
    reused: bool = False  # found in the store instead of computed by this call


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_files(files: dict) -> str:
    """One digest for a set of files: sha256 of the sorted (name, sha256) pairs."""
    return hashlib.sha256(canonical_json(sorted((n, f["sha256"]) for n, f in files.items())).encode()).hexdigest()


def scan_files(root: Path) -> dict:
    files = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_file() and name != MANIFEST:
            files[name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    return files


def artifact_key(stage: str, code_version: str, params: dict, inputs: list[ArtifactRef]) -> str:
    return stage_key(stage, code_version, params, [i.digest for i in inputs])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` held by this process (released by the OS if it dies)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class CorruptArtifact(Exception):
    pass


class Store:
    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self._verified: set[str] = set()
        self.metrics_db = self.root / "metrics.duckdb"

    def path(self, ref_or_stage, key: str | None = None) -> Path:
        if isinstance(ref_or_stage, ArtifactRef):
            ref_or_stage, key = ref_or_stage.stage, ref_or_stage.key
        return self.root / "artifacts" / ref_or_stage / key

    def manifest(self, ref: ArtifactRef) -> dict:
        return json.loads((self.path(ref) / MANIFEST).read_text())

    def verify(self, stage: str, key: str) -> ArtifactRef:
        """Check an artifact's files against its manifest; return its ref."""
        where = self.path(stage, key)
        try:
            manifest = json.loads((where / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise CorruptArtifact(f"{where}: unreadable manifest ({e})") from e
        if key not in self._verified:
            found = scan_files(where)
            if found != manifest["files"] or digest_files(found) != manifest["digest"]:
                changed = sorted(n for n in set(found) | set(manifest["files"]) if found.get(n) != manifest["files"].get(n))
                raise CorruptArtifact(f"{where}: files differ from the manifest: {', '.join(changed)}")
            self._verified.add(key)
        return ArtifactRef(stage, key, manifest["digest"], reused=True)

    def get(self, stage: str, key: str) -> ArtifactRef | None:
        """The verified artifact under this key, or None. A corrupt one is moved aside."""
        if not self.path(stage, key).exists():  # a dir without its manifest is corrupt, not absent
            return None
        try:
            return self.verify(stage, key)
        except CorruptArtifact:
            aside = self.path(stage, key).with_name(f".corrupt-{key}-{int(time.time())}")
            os.replace(self.path(stage, key), aside)
            return None

    def produce(
        self,
        stage: str,
        code_version: str,
        params: dict,
        inputs: list[ArtifactRef],
        build: Callable[[Path], dict],
    ) -> ArtifactRef:
        """Return the artifact for this stage, building it only if the store lacks it.

        `build(out_dir)` writes the files and returns an info dict (metric rows
        go under info["metrics"]) that lands in the manifest."""
        key = artifact_key(stage, code_version, params, inputs)
        found = self.get(stage, key)
        if found is not None:
            return found
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Two sweeps on one store wait for each other here instead of building the same key twice.
        with _locked(self.root / "locks" / f"{stage}-{key}"):
            found = self.get(stage, key)
            return found if found is not None else self._build(stage, code_version, params, inputs, key, build)

    def _build(self, stage, code_version, params, inputs, key, build) -> ArtifactRef:
        final = self.path(stage, key)
        for stale in final.parent.glob(f".tmp-{key}-*"):  # left by a killed run; a live one is not ours to touch
            if not _alive(int(stale.name.rsplit("-", 1)[1])):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = final.with_name(f".tmp-{key}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)  # our own pid, from an earlier process that had it
        tmp.mkdir()
        started = time.time()
        try:
            info = build(tmp) or {}
            files = scan_files(tmp)
            manifest = {
                "stage": stage,
                "key": key,
                "code_version": code_version,
                "params": params,
                "inputs": [{"stage": i.stage, "key": i.key, "digest": i.digest} for i in inputs],
                "tools": tool_versions(),
                "files": files,
                "digest": digest_files(files),
                "info": info,
                "host": socket.gethostname(),
                "started": started,
                "seconds": round(time.time() - started, 3),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished the same key first: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
                return self.verify(stage, key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._verified.add(key)
        return ArtifactRef(stage, key, manifest["digest"])
