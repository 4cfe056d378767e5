"""Every environment variable qsweep reads, in one place.

Read when asked (not at import), so a test or a worker that sets one sees it at once. Variables
that only pass through to a child process (LD_PRELOAD and the like, flows/blas.py) or that a
library reads itself (HF_TOKEN: huggingface_hub; PREFECT_*: Prefect) are not ours to read.
"""

import os
from dataclasses import dataclass

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    store: str  # QSWEEP_STORE: the store the CLI uses when --store is not given
    mirror: str | None  # QSWEEP_MIRROR: an fsspec URL that shares artifacts between machines (storage/remote.py)
    failpoint: str | None  # QSWEEP_FAILPOINT=<stage>:start|write|push[:hang]: the fault tests' self-kill or stall (storage/artifacts.py, remote.py)
    blas: str | None  # QSWEEP_BLAS: "0" keeps mlx's own CPU matmuls; "applied" marks a re-executed process (flows/blas.py)
    hub_offline: bool  # HF_HUB_OFFLINE or HF_DATASETS_OFFLINE: the benchmark's data comes from the offline copies
    hub_endpoint: str  # HF_ENDPOINT: the hub asked whether it answers (tasks/offline_tasks.py)
    worker_store: str | None  # QSWEEP_WORKER_STORE: this machine's store for the flow runs a worker takes (`qsweep worker --store`)
    zombie_seconds: int  # QSWEEP_ZOMBIE_SECONDS: a flow run silent this long is marked Crashed (flows/stage.py, default 90)


def settings() -> Settings:
    env = os.environ
    return Settings(store=env.get("QSWEEP_STORE") or ".qsweep", mirror=env.get("QSWEEP_MIRROR") or None,
                    failpoint=env.get("QSWEEP_FAILPOINT") or None, blas=env.get("QSWEEP_BLAS") or None,
                    hub_offline=any(env.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
                    hub_endpoint=(env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/"),
                    worker_store=env.get("QSWEEP_WORKER_STORE") or None,
                    zombie_seconds=int(env.get("QSWEEP_ZOMBIE_SECONDS") or 90))
