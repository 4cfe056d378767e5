"""The one function that says whether a stage is up to date.

A stage's key is the sha256 of: the stage name, the stage's explicit code
version, its parameters as canonical JSON, the *content* digests of its input
artifacts, and the versions of the tools that shape its output. Same inputs,
same key; change any one of them and the key changes, and the stage runs again.
"""

import hashlib
import json
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version

# What shapes stage outputs: mlx-lm saves tokenizers through transformers, lm-eval records its versions.
TOOLS = ("mlx", "mlx-lm", "lm-eval", "transformers", "tokenizers")


@lru_cache(maxsize=1)
def tool_versions() -> dict:
    found = {}
    for name in TOOLS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def canonical_json(value) -> str:
    """JSON with sorted keys and no whitespace: one text for one value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def stage_key(stage: str, code_version: str, params: dict, input_digests: list[str], tools: dict | None = None) -> str:
    material = {
        "stage": stage,
        "code_version": code_version,
        "params": params,
        "inputs": list(input_digests),
        "tools": tool_versions() if tools is None else tools,
    }
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()
