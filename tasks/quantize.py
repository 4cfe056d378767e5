"""quantize: base model (HF layout) + recipe -> a model in mlx-lm's layout.

mlx_lm.convert does the work, with the recipe's resolved plan (tasks/plan.py) as
its quant_predicate, so what we write is exactly what mlx-lm writes and what
mlx_lm.load opens. Learned recipes (GPTQ, AWQ) go through mlx-lm's own
implementations instead (tasks/learned.py).
"""

import logging
import shutil
from pathlib import Path

from prefect import task

from storage.artifacts import ArtifactRef, Store
from tasks.plan import plan_for
from tasks.recipes import Recipe
from tasks.remote_code import trusted
from tasks.stage import artifact_cache, quiet

# 2: plans with layer selectors and fallbacks; learned recipes; layer entries carry a mode
# 3: learned recipes honour the recipe's dtype (and otherwise cast as mlx_lm.convert does); info says the dtype written
CODE_VERSION = "3"
log = logging.getLogger(__name__)


def quantize(base_dir: Path, recipe: Recipe, out: Path) -> dict:
    from mlx_lm.utils import compute_bits_per_weight, load_model

    plan = plan_for(recipe, base_dir)
    for warning in plan.warnings():
        log.warning(warning)
    for note in plan.notes():
        log.info(note)
    if recipe.method:
        from tasks.learned import learned_quantize
        from tasks.recipes import calibration_path

        calibration = {**recipe.calibration, "text": calibration_path(recipe.calibration["text"])}
        want = calibration.pop("sha256", None)
        learned = learned_quantize(base_dir, out, recipe.method, recipe.bits, recipe.group_size, calibration,
                                   dtype=recipe.dtype)
        if want and learned["calibration"]["sha256"] != want:
            raise ValueError(f"recipe {recipe.name!r}: calibration.text {recipe.calibration['text']} changed "
                             "since the recipe was read (its digest is part of the key)")
    else:
        learned = None
        _convert(base_dir, recipe, plan, out)

    model, config = load_model(out, lazy=True, trust_remote_code=trusted())
    weight_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    quantization = config.get("quantization", {})
    # mlx-lm's GPTQ writes layer entries without a mode: affine is what mlx_lm.load assumes then
    layers = {k: {"mode": "affine", **v} for k, v in quantization.items() if isinstance(v, dict)}
    rows = [
        {"task": "model", "metric": "bits_per_weight", "value": round(float(compute_bits_per_weight(model)), 4)},
        {"task": "model", "metric": "weight_bytes", "value": weight_bytes},
        {"task": "model", "metric": "disk_bytes", "value": sum(f.stat().st_size for f in out.iterdir() if f.is_file())},
    ]
    stored = stored_dtypes(out)
    return {
        "metrics": rows,
        "recipe": recipe.name,
        "defaults": {k: v for k, v in quantization.items() if not isinstance(v, dict)},
        "layers": layers,
        # What each module got, from the config mlx_lm.load reads and the dtypes in the files: the plan as realised.
        "plan": _realised(plan.rows(), quantization, stored),
        "dtype": float_dtype(stored),
        "warnings": plan.warnings(),
        "notes": plan.notes(),
        **({"learned": {k: v for k, v in learned.items() if k != "layers"}} if learned else {}),
    }


def _convert(base_dir: Path, recipe: Recipe, plan, out: Path) -> None:
    from mlx_lm import convert

    chosen = {p.path: p for p in plan.layers}

    def predicate(path, module):
        p = chosen.get(path)
        if p is None or p.quant is None:
            return False
        # The default stays implicit in config.json, as mlx_lm.convert writes it for a uniform recipe.
        return True if p.source == "default" else dict(p.quant)

    # convert refuses an existing directory, and `out` already exists.
    staging = out / ".convert"
    with quiet():  # convert narrates on stdout
        convert(
            str(base_dir),
            mlx_path=str(staging),
            quantize=recipe.quantizes_any,
            q_bits=recipe.bits,
            q_group_size=recipe.group_size if recipe.quantizes_any else None,
            q_mode=recipe.mode,
            dtype=recipe.dtype,
            trust_remote_code=trusted(),
            quant_predicate=predicate if recipe.quantizes_any else None,
        )
    for f in staging.iterdir():
        shutil.move(str(f), out / f.name)
    staging.rmdir()


def _realised(rows: list[dict], quantization: dict, stored: dict) -> list[dict]:
    """The plan's rows with bits / group size / mode as config.json says each module was stored;
    a module left in float gets the dtype its weight was written in as its mode."""
    defaults = {k: v for k, v in quantization.items() if not isinstance(v, dict)}
    out = []
    for row in rows:
        q = quantization.get(row["path"], defaults if row["bits"] is not None else None)
        if q:
            row = {**row, "bits": q["bits"], "group_size": q["group_size"], "mode": q.get("mode", "affine")}
        elif row["path"] + ".weight" in stored:
            row = {**row, "mode": stored[row["path"] + ".weight"]}
        out.append(row)
    return out


SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def stored_dtypes(model_dir: Path) -> dict:
    """tensor name -> dtype ("bfloat16", "uint32", ...) as written, from the safetensors headers alone."""
    from safetensors import safe_open

    found = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                t = st.get_slice(k).get_dtype()
                found[k] = SAFETENSORS_DTYPES.get(t, t.lower())
    return found


def float_dtype(stored: dict) -> str | None:
    """The float type the model was written in: the most common among its float tensors (scales included)."""
    floats = [d for d in stored.values() if d in SAFETENSORS_DTYPES.values()]
    return max(sorted(set(floats)), key=floats.count) if floats else None


@task(name="quantize", cache_policy=artifact_cache("quantize", CODE_VERSION, loads_model=True), persist_result=True)
def quantize_task(store: str, params: dict, inputs: list[ArtifactRef]) -> ArtifactRef:
    s = Store(store)
    base_dir = s.path(inputs[0])
    return s.produce("quantize", CODE_VERSION, params, inputs, lambda out: quantize(base_dir, Recipe.from_params(params), out))
