"""Content-addressed artifact store.

An artifact is a directory of files under `<root>/artifacts/<stage>/<key>/`
with a `manifest.json` that records how it was made (key inputs, tool
versions, timings) and the sha256 of every file. Its *digest* covers the files
only, so downstream keys depend on content, never on when or where it was made.
Writes go to a temporary directory first and are renamed into place, so a
killed process leaves either a whole artifact or none.

`Store.current(stage, key)` is the one answer to "is this stage's artifact here and
intact?": the Prefect cache (flows/stage.py), `produce`, and publishing from the store
all ask it. An artifact whose files no longer match its manifest is moved aside, told to
the store's `events` sink (the `events` table), and built again. Files are hashed through
a state database (storage/digests.py), so an unchanged artifact is not read again.

QSWEEP_FAILPOINT=<stage>:start|write (push: storage/remote.py) makes the process SIGKILL itself as that
stage's build starts, or once its files are written but before its manifest: the
fault tests crash a sweep there to show that a rerun loses nothing. With `:hang` after it,
the process stops there instead, as a frozen machine would, for a test to kill.
"""

import errno
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

from storage.digests import MANIFEST, HashCache, digest_files, scan_files
from storage.keys import stage_key, tool_versions
from storage.settings import settings


@dataclass(frozen=True)
class ArtifactRef:
    """What stages hand each other: small, hashable, location-free."""

    stage: str
    key: str
    digest: str
    reused: bool = False  # found in the store instead of computed by this call


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


def scrub(error: BaseException) -> str:
    """An error's text without credentials a URL in it may carry (user:password@)."""
    import re

    return re.sub(r"(//)[^/@\s]*@", r"\1", f"{type(error).__name__}: {error}")


def _clean_stale(folder: Path, prefix: str) -> None:
    """Remove what a killed run left half made: `<prefix><pid>[-...]`; a live process's is not ours to touch."""
    for stale in folder.glob(f"{prefix}*"):
        pid = stale.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


class CorruptArtifact(Exception):
    pass


class NoRoom(OSError):
    """The store's disk (or the process's file size limit) ran out while writing an artifact."""


def failpoint(stage: str, point: str) -> None:
    """QSWEEP_FAILPOINT (above): at `point` of `stage` (start, write; push in storage/remote.py)."""
    if settings().failpoint == f"{stage}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)
    while settings().failpoint == f"{stage}:{point}:hang":  # a machine that stops here, for a test to kill
        time.sleep(1)


def _no_room(error: BaseException, where: Path) -> str | None:
    """Why a failed write most likely failed for lack of room, or None. mlx's writers raise
    RuntimeError without an errno, so the disk's free space decides as well."""
    import resource

    code, limit = getattr(error, "errno", None), resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code == errno.EFBIG or (code is None and limit != resource.RLIM_INFINITY and "write" in str(error).lower()):
        return f"this process may write files of at most {limit} bytes (ulimit -f)"
    usage = shutil.disk_usage(where)
    if code in (errno.ENOSPC, errno.EDQUOT) or usage.free < min(64 << 20, usage.total // 100):
        return f"the disk holding {where} is full ({usage.free / 1e6:.1f} MB free of {usage.total / 1e6:.1f} MB)"
    return None


class Store:
    """`mirror` (storage/remote.py) shares finished artifacts between machines: one missing here is
    pulled from it, verified, and used instead of being built; one built here is pushed to it.
    `events(kind, stage, key, detail)` hears what the store noticed and did (a corrupt artifact
    moved aside); storage/workspace.py wires both from the settings."""

    def __init__(self, root: Path | str, mirror=None, events: Callable[[str, str, str, str], None] | None = None,
                 read_only: bool = False):
        self.root = Path(root).resolve()
        self.metrics_db = self.root / "metrics.duckdb"  # the same file as storage/workspace.history(root)
        self.mirror = mirror
        self.events = events
        self.hashes = HashCache(self.root / "hashes.sqlite", read_only=read_only)

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
        found = scan_files(where, self.hashes)
        if found != manifest["files"] or digest_files(found) != manifest["digest"]:
            changed = sorted(n for n in set(found) | set(manifest["files"]) if found.get(n) != manifest["files"].get(n))
            raise CorruptArtifact(f"{where}: files differ from the manifest: {', '.join(changed)}")
        return ArtifactRef(stage, key, manifest["digest"], reused=True)

    def current(self, stage: str, key: str) -> ArtifactRef | None:
        """Is this stage's artifact here and intact? Its ref if so (pulled from the mirror when only
        the mirror has it), else None; a corrupt one is moved aside first, so that it is built again."""
        if not self.path(stage, key).exists():  # a dir without its manifest is corrupt, not absent
            return self._pull(stage, key) if self.mirror is not None else None
        try:
            return self.verify(stage, key)
        except CorruptArtifact as e:
            aside = self.path(stage, key).with_name(f".corrupt-{key}-{time.time_ns()}-{os.getpid()}")
            try:
                os.replace(self.path(stage, key), aside)
            except FileNotFoundError:  # another cell of this sweep found it first and moved it
                return None
            self._record("corrupt", stage, key, f"{e}; moved aside to {aside.name}")
            return None

    def _record(self, kind: str, stage: str, key: str, detail: str) -> None:
        """What the store noticed and did about it: a warning, and the events sink (a row in `events`)."""
        logging.getLogger("qsweep").warning("%s %s/%s: %s", kind, stage, key, detail)
        if self.events is not None:
            self.events(kind, stage, key, detail)

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
        ref = self.current(stage, key)
        if ref is None:
            self.path(stage, key).parent.mkdir(parents=True, exist_ok=True)
            # Two sweeps on one store wait for each other here instead of building the same key twice.
            (self.root / "locks").mkdir(parents=True, exist_ok=True)
            with FileLock(self.root / "locks" / f"{stage}-{key}"):
                ref = self.current(stage, key) or self._build(stage, code_version, params, inputs, key, build)
        if self.mirror is not None:  # outside the lock: others waiting for this key need not wait for the upload
            try:  # also an artifact found here: its push may have died with the process that built it
                self.mirror.push(self.path(stage, key), stage, key)  # (one request when the mirror has it)
            except Exception as e:  # the local artifact stands; other machines build it themselves
                logging.getLogger("qsweep").warning("%s/%s not pushed to %r: %s", stage, key, self.mirror, scrub(e))
        return ref

    def _pull(self, stage: str, key: str) -> ArtifactRef | None:
        """The artifact from the mirror, verified and renamed into place; None if it has none whole."""
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(final.parent, f".pull-{key}-")
        tmp = final.with_name(f".pull-{key}-{os.getpid()}-{threading.get_ident()}")
        try:
            pulled = self.mirror.pull(stage, key, tmp, self.hashes)
            wrong = not pulled and self.mirror.has(stage, key)  # whole but wrong
            if wrong:  # gone, so that the push after our build repairs it
                self.mirror.discard(stage, key)
        except Exception as e:  # an unreachable mirror: build here, as without one
            logging.getLogger("qsweep").warning("%s/%s not pulled from %r: %s", stage, key, self.mirror, scrub(e))
            return None
        if not pulled:
            if wrong:
                self._record("corrupt", stage, key, f"the copy on {self.mirror.url} differs from its manifest; removed there")
            return None
        try:
            os.rename(tmp, final)
        except OSError:  # another process put it there first
            shutil.rmtree(tmp, ignore_errors=True)
        return self.verify(stage, key)

    def _build(self, stage, code_version, params, inputs, key, build) -> ArtifactRef:
        final = self.path(stage, key)
        _clean_stale(final.parent, f".tmp-{key}-")
        tmp = final.with_name(f".tmp-{key}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)  # our own pid, from an earlier process that had it
        tmp.mkdir()
        started = time.time()
        try:
            failpoint(stage, "start")
            try:
                info = build(tmp) or {}
            except Exception as e:
                if (why := _no_room(e, tmp)) is not None:
                    raise NoRoom(f"{stage}: could not write its artifact: {type(e).__name__}: {e}; {why}. Nothing of "
                                 "this stage was kept: free some space (or use --store on a larger disk) and run the "
                                 "sweep again; finished stages are not redone") from e
                raise
            failpoint(stage, "write")
            files = scan_files(tmp, self.hashes)  # remembered: the rename keeps each file's stat
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
        return ArtifactRef(stage, key, manifest["digest"])
