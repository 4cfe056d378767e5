"""What every stage's Prefect task shares: its cache key is the artifact key, and a stage
that loads a model holds one of the machine's model slots while it runs.

Prefect sees the same key that storage/keys.py computes, so a re-run shows
finished stages as Cached in the UI. The artifact store stays the source of
truth: when it lacks a stage's artifact (deleted, or corrupt and moved aside),
or a stage's effects outside the store no longer hold (publish: `done`),
`run_stage` makes Prefect run the task whatever its own cache says.
"""

import contextlib
import io
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from prefect.cache_policies import CachePolicy
from prefect.concurrency.sync import concurrency

from storage.artifacts import Store, artifact_key


@dataclass
class ArtifactCache(CachePolicy):
    stage: str = ""
    code_version: str = ""
    done: Optional[Callable[[str, dict], bool]] = None
    loads_model: bool = False

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        return artifact_key(self.stage, self.code_version, inputs["params"], inputs["inputs"])

    def holds(self, parameters: dict) -> bool:
        """The store has this stage's artifact, and its outside effects are in place."""
        key = self.compute_key(None, parameters, {})
        if Store(parameters["store"]).get(self.stage, key) is None:
            return False
        return self.done is None or self.done(key, parameters)


def artifact_cache(stage: str, code_version: str, done=None, loads_model: bool = False) -> ArtifactCache:
    return ArtifactCache(stage=stage, code_version=code_version, done=done, loads_model=loads_model)


_quiet = threading.Lock()


@contextlib.contextmanager
def quiet():
    """The stdout and stderr of the libraries a stage calls (mlx_lm.convert's narration, tqdm), swallowed.
    The swap is process-wide, so cells in threads take turns: interleaved, one could leave it swapped."""
    with _quiet, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def model_slots() -> str:
    """The Prefect global concurrency limit that counts models in memory on this machine."""
    return f"qsweep-models-{socket.gethostname()}"


def ensure_model_slots(count: int, reclaim: bool = False) -> None:
    """Create or resize this machine's model-slot limit (`prefect gcl ls` shows it).

    `reclaim` frees the slots in use when no other sweep on this Prefect home runs. A sweep
    without a Prefect server asks for it: its temporary server keeps slot leases in memory, so
    slots a killed sweep held would stay taken for good (a real server's lease expiry frees them)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(model_slots(), count)
        except ObjectAlreadyExists:  # another cell created it a moment ago
            client.upsert_global_concurrency_limit_by_name(model_slots(), count)
        if reclaim and _alone_on_this_home():
            client.update_global_concurrency_limit(model_slots(), GlobalConcurrencyLimitUpdate(active_slots=0))


_running: list = []  # this process's hold on <prefect home>/qsweep-sweeps.lock, while it runs a sweep


def _alone_on_this_home() -> bool:
    """Whether no other sweep runs on this Prefect home; from now on this process counts as one that does."""
    import fcntl

    from prefect.settings import get_current_settings

    lock = open(Path(get_current_settings().home) / "qsweep-sweeps.lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except BlockingIOError:
        alone = False
    fcntl.flock(lock, fcntl.LOCK_SH)  # shared while this sweep runs: the next one will not reclaim
    _running[:] = [lock]
    return alone


def run_stage(task_fn, **parameters):
    """Call a stage's task and return its final state; Prefect's cache is trusted only where the store agrees.

    A stage that will load a model first takes a slot of `model_slots()` (the sweep sets its
    size), so many cells never hold more models at once than the machine has room for;
    a stage found in the store takes none."""
    policy = task_fn.cache_policy
    if policy.holds(parameters):
        return task_fn(**parameters, return_state=True)
    slot = concurrency(model_slots(), occupy=1, lease_duration=60) if policy.loads_model else contextlib.nullcontext()
    with slot:
        return task_fn.with_options(refresh_cache=True)(**parameters, return_state=True)
