"""The store as a run uses it: its artifacts, the mirror the settings name, and the metric history
that hears the store's events. The one place these three are wired together."""

import os
from pathlib import Path

from storage.artifacts import Store
from storage.metrics import MetricStore
from storage.settings import settings


def open_store(root: Path | str | None = None, mirror: str | None = None, read_only: bool = False) -> Store:
    """The store at `root` (default: QSWEEP_STORE or .qsweep), sharing through `mirror` (default: QSWEEP_MIRROR).
    `read_only`: a dry run's, which remembers no hashes."""
    s = settings()
    root = Path(root or s.store)
    mirror = mirror or s.mirror
    if mirror:
        from storage.remote import Mirror  # fsspec, only when a mirror is used

        mirror = Mirror(mirror)
    return Store(root, mirror=mirror, events=history(root).record_event,
                 read_only=read_only)


def history(root: Path | str | None = None) -> MetricStore:
    """The metric history of the store at `root` (default: QSWEEP_STORE or .qsweep)."""
    return MetricStore(Path(root or settings().store).resolve() / "metrics.duckdb")


def local_store(given: str) -> str:
    """The store a flow run works on: the one it was given, unless the worker that took the run keeps its own
    (`qsweep worker --store`, on a machine that shares artifacts through a mirror)."""
    return settings().worker_store or given


class StoreNotWritable(OSError):
    """A store (or output folder) a command must write and cannot: one line that names it and why."""


def check_writable(root: Path | str, what: str = "store") -> None:
    """StoreNotWritable unless `root` can be written, or made where it does not exist yet (nothing is made
    here). Reading a store needs none of this: DuckDB opens it read-only, as `qsweep status` and `sql` do."""
    root = Path(root)
    place = root
    while not place.exists() and place != place.parent:  # where it would be made
        place = place.parent
    history = root / "metrics.duckdb"
    for path in (place, history):
        if path.exists() and not os.access(path, os.W_OK):  # access(2) also says EROFS, even to root
            break
    else:
        return
    why = "is on a read-only filesystem" if os.statvfs(path).f_flag & os.ST_RDONLY else "is not writable by this user"
    if path == root:
        raise StoreNotWritable(f"{what} {root} {why}")
    if path == history:
        raise StoreNotWritable(f"{what} {root}: its metric history {history} {why}")
    raise StoreNotWritable(f"{what} {root} cannot be made: {path} {why}")
