"""Content digests of files, and the state database that spares re-hashing unchanged ones.

An artifact's digest is the sha256 of its sorted (file name, file sha256) pairs. Checking
that an artifact is intact means knowing each file's sha256 now; reading 260 MB of weights
for that on every reuse made a cached rerun of the demo spend most of its 49 s hashing.
`HashCache` remembers each file's sha256 under what `stat` says of it (device, inode, size,
mtime and ctime in ns), as DVC's state database does: a file whose stat is unchanged is not
read again, and any later write (even one that restores the mtime: ctime then moves) is caught.
As with git's "racily clean" files, a write within the same filesystem clock tick as the
hashing (a few ms) and of the same size would go unseen; nothing qsweep does writes there.
"""

import hashlib
import os
import sqlite3
from pathlib import Path

from storage.keys import canonical_json

MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest_files(files: dict) -> str:
    """One digest for a set of files: sha256 of the sorted (name, sha256) pairs."""
    return hashlib.sha256(canonical_json(sorted((n, f["sha256"]) for n, f in files.items())).encode()).hexdigest()


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class HashCache:
    """sha256 by stat stamp, in a SQLite file beside the store (one row per file ever hashed).
    `read_only` (a dry run, which writes nothing) looks hashes up but remembers none."""

    def __init__(self, path: Path, read_only: bool = False):
        self.path, self.read_only = Path(path), read_only

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            if not self.path.exists():
                return sqlite3.connect(":memory:")  # nothing remembered yet: every file is read
            return sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=60)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=60)
        con.execute("CREATE TABLE IF NOT EXISTS hashes (stamp TEXT PRIMARY KEY, sha256 TEXT NOT NULL)")
        return con

    def scan(self, root: Path) -> dict:
        """{name: {sha256, bytes}} of every file under root but the manifest; unchanged files are not read."""
        found = {}
        paths = [(p.relative_to(root).as_posix(), p) for p in sorted(Path(root).rglob("*"))]
        paths = [(n, p) for n, p in paths if n != MANIFEST and p.is_file()]
        with self._connect() as con:
            for name, path in paths:
                st = path.stat()
                row = self._lookup(con, _stamp(st))
                if row is None:
                    row = (file_sha256(path),)
                    if not self.read_only and _stamp(path.stat()) == _stamp(st):  # not written to while it was read
                        con.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?)", [_stamp(st), row[0]])
                found[name] = {"sha256": row[0], "bytes": st.st_size}
        con.close()
        return found


    @staticmethod
    def _lookup(con: sqlite3.Connection, stamp: str):
        try:
            return con.execute("SELECT sha256 FROM hashes WHERE stamp = ?", [stamp]).fetchone()
        except sqlite3.OperationalError:  # an empty in-memory stand-in: no such table
            return None


def scan_files(root: Path, cache: HashCache | None = None) -> dict:
    """{name: {sha256, bytes}} of every file under root but the manifest."""
    if cache is not None:
        return cache.scan(root)
    files = {}
    for path in sorted(Path(root).rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_file() and name != MANIFEST:
            files[name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    return files
