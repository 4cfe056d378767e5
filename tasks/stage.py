"""What every stage's Prefect task shares: its cache key is the artifact key.

Prefect sees the same key that storage/keys.py computes, so a re-run shows
finished stages as Cached in the UI. The artifact store stays the source of
truth: when it lacks a stage's artifact (deleted, or corrupt and moved aside),
or a stage's effects outside the store no longer hold (publish: `done`),
`run_stage` makes Prefect run the task whatever its own cache says.
"""

from dataclasses import dataclass
from typing import Any, Callable, Optional

from prefect.cache_policies import CachePolicy

from storage.artifacts import Store, artifact_key


@dataclass
class ArtifactCache(CachePolicy):
    stage: str = ""
    code_version: str = ""
    done: Optional[Callable[[str, dict], bool]] = None

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        return artifact_key(self.stage, self.code_version, inputs["params"], inputs["inputs"])

    def holds(self, parameters: dict) -> bool:
        """The store has this stage's artifact, and its outside effects are in place."""
        key = self.compute_key(None, parameters, {})
        if Store(parameters["store"]).get(self.stage, key) is None:
            return False
        return self.done is None or self.done(key, parameters)


def artifact_cache(stage: str, code_version: str, done=None) -> ArtifactCache:
    return ArtifactCache(stage=stage, code_version=code_version, done=done)


def run_stage(task_fn, **parameters):
    """Call a stage's task and return its final state; Prefect's cache is trusted only where the store agrees."""
    if not task_fn.cache_policy.holds(parameters):
        task_fn = task_fn.with_options(refresh_cache=True)
    return task_fn(**parameters, return_state=True)
