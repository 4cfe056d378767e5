"""What every stage's Prefect task shares: its cache key is the artifact key.

Prefect sees the same key that storage/keys.py computes, so a re-run shows
finished stages as Cached in the UI. The artifact store stays the source of
truth: when it lacks the artifact (deleted, or corrupt and moved aside),
Prefect's record under that key is dropped and the stage runs again. A stage
with effects outside the store (publish) says with `done` whether they hold.
"""

from prefect.cache_policies import CachePolicy

from storage.artifacts import Store, artifact_key


def artifact_cache(stage: str, code_version: str, done=None) -> CachePolicy:
    def cache_key(context, parameters: dict) -> str:
        store = Store(parameters["store"])
        key = artifact_key(stage, code_version, parameters["params"], parameters["inputs"])
        if store.get(stage, key) is None or (done is not None and not done(key, parameters)):
            (store.prefect_results / key).unlink(missing_ok=True)
        return key

    return CachePolicy.from_cache_key_fn(cache_key)
