"""Artifacts shared between machines through any fsspec filesystem.

A Mirror holds copies of finished artifacts from local Stores, laid out as
`<url>/<stage>/<key>/` with the artifact's files and its manifest.json. Object
stores have no atomic rename, so push uploads the manifest last: a reader that
sees a manifest sees every file it names. pull checks every downloaded file
against the manifest's sha256 before the caller renames it into its store.
QSWEEP_FAILPOINT=<stage>:push kills the process once a push has uploaded the files and before
the manifest, the widest half-upload there is (object stores write each object whole or not at all).
"""

import contextlib
import json
import shutil
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

import fsspec

from storage.artifacts import failpoint
from storage.digests import MANIFEST, HashCache, digest_files, scan_files

OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss"}


def redact(url: str) -> str:
    """The URL without user and password, nor query (a signed URL's query is a credential too)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment=""))


def _component(name: str) -> str:
    if not isinstance(name, str) or name in ("", ".") or "/" in name or "\\" in name or ".." in name:
        raise ValueError(f"{name!r}: stage names and keys must be plain path components")
    return name


def _inside(name) -> bool:
    """A file name from a remote manifest stays inside the artifact (a bad one could say ../../x)."""
    if not isinstance(name, str) or name in ("", MANIFEST) or name.startswith("/"):
        return False
    return ".." not in PurePosixPath(name).parts


class Mirror:
    """Artifacts shared through any fsspec filesystem: s3://bucket/qsweep, gs://..., file:///nfs/qsweep, memory://..."""

    def __init__(self, url: str, **storage_options):
        # Credentials stay inside the filesystem object; only the redacted URL is kept for display.
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self.url = redact(url)
        # Object stores have no folders; s3fs's makedirs would even create a missing (misspelt) bucket.
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.folders = not protocols & OBJECT_STORES

    def __repr__(self) -> str:
        return f"Mirror({self.url!r})"

    def _path(self, stage: str, key: str, name: str = "") -> str:
        return f"{self.root}/{_component(stage)}/{_component(key)}" + (f"/{name}" if name else "")

    def _manifest(self, stage: str, key: str) -> tuple[bytes, dict] | None:
        """The remote manifest, or None while it is missing or torn (a push killed mid-write on NFS)."""
        where = self._path(stage, key, MANIFEST)
        try:
            raw = self.fs.cat_file(where)
            manifest = json.loads(raw)
            if isinstance(manifest["files"], dict) and isinstance(manifest["digest"], str):
                return raw, manifest
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            pass
        return None

    def has(self, stage: str, key: str) -> bool:
        where = self._path(stage, key, MANIFEST)
        self.fs.invalidate_cache(where)  # other machines write here: a listing this process cached is stale
        return self.fs.exists(where)

    def push(self, local_dir: Path, stage: str, key: str) -> None:
        """Upload a finished local artifact, manifest last. A complete remote copy is left alone."""
        local_dir = Path(local_dir)
        names = list(json.loads((local_dir / MANIFEST).read_text())["files"])
        if self._manifest(stage, key) is not None:
            return  # same key, same content: the first complete copy stays, as in the local store
        remote = [self._path(stage, key, n) for n in names]
        if self.folders:  # file://, NFS: the folders first
            for parent in sorted({r.rsplit("/", 1)[0] for r in remote} | {self._path(stage, key)}):
                self.fs.makedirs(parent, exist_ok=True)
        self.fs.put([str(local_dir / n) for n in names], remote)  # lists: concurrent on s3/gcs
        failpoint(stage, "push")
        self.fs.put_file(str(local_dir / MANIFEST), self._path(stage, key, MANIFEST))

    def discard(self, stage: str, key: str) -> None:
        """Remove a remote copy, manifest first so that no reader takes what remains for whole."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(stage, key, MANIFEST))
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(stage, key), recursive=True)

    def pull(self, stage: str, key: str, dest: Path, cache: HashCache | None = None) -> bool:
        """Download into `dest` (absent or empty) and verify it (remembering the hashes in `cache`). False,
        with nothing left in dest, when the remote copy is missing, incomplete or differs from its manifest."""
        dest = Path(dest)
        if dest.exists() and any(dest.iterdir()):
            raise ValueError(f"{dest}: pull needs an absent or empty directory")
        self._path(stage, key)  # refuse a bad stage or key before touching dest
        created = not dest.exists()
        dest.mkdir(parents=True, exist_ok=True)
        try:
            ok = self._download(stage, key, dest, cache)
        except BaseException:
            _clear(dest, created)
            raise
        if not ok:
            _clear(dest, created)
        return ok

    def _download(self, stage: str, key: str, dest: Path, cache: HashCache | None) -> bool:
        found = self._manifest(stage, key)
        if found is None or not all(_inside(n) for n in found[1]["files"]):
            return False
        raw, manifest = found
        names = list(manifest["files"])
        for n in names:
            (dest / n).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fs.get([self._path(stage, key, n) for n in names], [str(dest / n) for n in names])
        except FileNotFoundError:  # a file the manifest names is gone remotely
            return False
        (dest / MANIFEST).write_bytes(raw)
        files = scan_files(dest, cache)
        return files == manifest["files"] and digest_files(files) == manifest["digest"]


def _clear(dest: Path, created: bool) -> None:
    if created:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for child in dest.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
