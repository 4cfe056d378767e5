"""The one Prefect task that runs any stage, and how Prefect's cache sees the store.

Prefect's cache is a view of the artifact store, never a second opinion: a stage task's
cache key is `<stage>/<artifact key>`, and its records are read through `ArtifactView`,
which answers Prefect's "do you hold this?" with `Store.current`, the one function that
decides whether a stage's artifact is here and intact. A deleted or corrupted artifact is
therefore rebuilt, and a finished one shows as Cached in the UI, whatever Prefect's own
database holds. A stage that loads a model holds one of the machine's model slots while it builds.
"""

import contextlib
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.concurrency.sync import concurrency
from prefect.filesystems import WritableFileSystem

from storage.artifacts import ArtifactRef, Store
from storage.settings import settings
from storage.workspace import open_store
from tasks.registry import STAGES, Stage


class ArtifactView(WritableFileSystem):
    """Prefect's record store for stage tasks (the cache policy's key storage): a record exists exactly
    when Store.current finds the artifact, and its payload is that artifact's ref, written by this view
    under <store>/prefect-results/ for Prefect to read back. Prefect's own writes of records (metadata
    here, dropped; payloads beside the view's) are never read: the artifact is the record. Prefect internals relied on (checked against prefect 3.9.1): ResultStore
    calls read_path/write_path with `_sync=True`; with key storage set, it reads the record's metadata
    there and the payload from the task's result storage at the metadata's storage_key."""

    _block_type_name = "qsweep artifact view"
    root: str

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        from prefect._internal.result_records import ResultRecordMetadata
        from prefect.serializers import PickleSerializer

        stage, key = path.split("/")[-2:]
        ref = open_store(self.root).current(stage, key)
        if ref is None:
            raise FileNotFoundError(path)
        serializer = PickleSerializer()
        payload = results_dir(self.root) / stage / f"{key}.ref"  # beside, not over, what Prefect writes itself
        payload.parent.mkdir(parents=True, exist_ok=True)
        tmp = payload.with_name(f".{key}-{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(serializer.dumps(ref))
        os.replace(tmp, payload)
        return ResultRecordMetadata(serializer=serializer, expiration=None, storage_key=str(payload),
                                    storage_block_id=None).dump_bytes()

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> None:
        pass


def results_dir(root: str | Path) -> Path:
    """Where Prefect reads stage results back from: refs that ArtifactView writes, derived from the store."""
    return Path(root) / "prefect-results"


@dataclass
class ArtifactCache(CachePolicy):
    """The cache key of a stage's task: `<stage>/<artifact key>`."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        stage = STAGES[inputs["stage"]]
        return f"{stage.name}/{stage.key(inputs['params'], inputs['inputs'])}"


@task(name="stage", cache_policy=ArtifactCache(), persist_result=True)
def stage_task(stage: str, store: str, params: dict, inputs: list[ArtifactRef], extra: dict) -> ArtifactRef:
    return STAGES[stage].produce(open_store(store), params, inputs, extra)


def run_stage(stage: Stage, store: Store, params: dict, inputs: list[ArtifactRef], extra: dict | None = None,
              run_name: str = ""):
    """Run one stage as a Prefect task; return its final state (Cached when the store holds the artifact).

    A stage that will load a model first takes a slot of `model_slots()` (the sweep sets its size),
    so many cells never hold more models at once than the machine has room for; one found in the
    store takes none."""
    task_fn = stage_task.with_options(name=stage.name, task_run_name=run_name or stage.name,
                                      retries=stage.retries, retry_delay_seconds=10, retry_condition_fn=_transient,
                                      cache_policy=ArtifactCache(key_storage=ArtifactView(root=str(store.root))),
                                      result_storage=results_dir(store.root))
    found = store.current(stage.name, stage.key(params, inputs)) is not None
    slot = concurrency(model_slots(), occupy=1, lease_duration=60) if stage.loads_model and not found \
        else contextlib.nullcontext()
    with slot:
        return task_fn(stage=stage.name, store=str(store.root), params=params, inputs=inputs, extra=extra or {},
                       return_state=True)


def _transient(task, task_run, state) -> bool:
    """Retry a hub hiccup, not a source that cannot work (the only stage with retries is download)."""
    from tasks.download import SourceError

    return not isinstance(state.result(raise_on_failure=False), SourceError)


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


ZOMBIE_RULE = "qsweep: crash flow runs without heartbeats"


def ensure_zombie_rule() -> None:
    """The server's automation that marks a cell's flow run Crashed when its heartbeats stop for QSWEEP_ZOMBIE_SECONDS
    (Prefect's "detect zombie flows" recipe): a cell whose machine died is then run again by its sweep.
    Heartbeats come every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (`qsweep worker` sets 30, Prefect's
    least); the window should hold about three."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    rule = Automation(name=ZOMBIE_RULE, trigger=EventTrigger(
        after={"prefect.flow-run.heartbeat"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
        # cell runs only (named "cell:<model>/<recipe>"): the ones a sweep runs again; other flows on the server
        # may send heartbeats every 180 s (Prefect's default), and must not be crashed by this rule
        match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"], "prefect.resource.name": ["cell:*"]}),
        for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
        within=timedelta(seconds=settings().zombie_seconds)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="no heartbeat for "
                                    f"{settings().zombie_seconds} s: its machine or process died")])
    try:
        found = Automation.read(name=ZOMBIE_RULE)
    except ValueError:  # none by that name yet
        rule.create()
        return
    if found.trigger != rule.trigger or found.actions != rule.actions:
        rule.id = found.id
        rule.update()


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
