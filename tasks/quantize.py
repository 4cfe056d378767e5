"""quantize: base model (HF layout) + recipe -> a model in mlx-lm's layout.

mlx_lm.convert does the work, with the recipe's rules as its quant_predicate,
so what we write is exactly what mlx-lm writes and what mlx_lm.load opens.
"""

import contextlib
import io
import json
import shutil
from pathlib import Path

from prefect import task

from storage.artifacts import ArtifactRef, Store
from tasks.recipes import Recipe
from tasks.stage import artifact_cache

CODE_VERSION = "1"


def quantize(base_dir: Path, recipe: Recipe, out: Path) -> dict:
    from mlx_lm import convert
    from mlx_lm.utils import compute_bits_per_weight, load_model

    predicate = None
    if recipe.rules and recipe.quantizes_any:
        # A predicate we pass replaces the model's own; keep its choices for what no rule matches.
        model, _ = load_model(base_dir, lazy=True)
        predicate = recipe.quant_predicate(getattr(model, "quant_predicate", None))
    # convert refuses an existing directory, and `out` already exists.
    staging = out / ".convert"
    with contextlib.redirect_stdout(io.StringIO()):  # convert narrates on stdout
        convert(
            str(base_dir),
            mlx_path=str(staging),
            quantize=recipe.quantizes_any,
            q_bits=recipe.bits,
            q_group_size=recipe.group_size if recipe.quantizes_any else None,
            q_mode=recipe.mode,
            dtype=recipe.dtype,
            quant_predicate=predicate,
        )
    for f in staging.iterdir():
        shutil.move(str(f), out / f.name)
    staging.rmdir()

    model, config = load_model(out, lazy=True)
    weight_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    quantization = config.get("quantization", {})
    layers = {k: v for k, v in quantization.items() if isinstance(v, dict)}
    rows = [
        {"task": "model", "metric": "bits_per_weight", "value": round(float(compute_bits_per_weight(model)), 4)},
        {"task": "model", "metric": "weight_bytes", "value": weight_bytes},
        {"task": "model", "metric": "disk_bytes", "value": sum(f.stat().st_size for f in out.iterdir() if f.is_file())},
    ]
    return {
        "metrics": rows,
        "recipe": recipe.name,
        "defaults": {k: v for k, v in quantization.items() if not isinstance(v, dict)},
        "layers": layers,
    }


@task(name="quantize", cache_policy=artifact_cache("quantize", CODE_VERSION), persist_result=True)
def quantize_task(store: str, params: dict, inputs: list[ArtifactRef]) -> ArtifactRef:
    s = Store(store)
    base_dir = s.path(inputs[0])
    return s.produce("quantize", CODE_VERSION, params, inputs, lambda out: quantize(base_dir, Recipe.from_params(params), out))
