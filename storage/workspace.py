"""The store as a run uses it: its artifacts, the mirror the settings name, and the metric history
that hears the store's events. The one place these three are wired together."""

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
