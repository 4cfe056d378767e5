"""quantize: base model (HF layout) + recipe -> a model in mlx-lm's layout.

Rounded recipes take the steps mlx_lm.convert takes, called one by one from
mlx_lm.utils: load, the dtype cast, quantize_model with the recipe's resolved
plan (tasks/plan.py) as its quant_predicate, save. The files are byte for byte
what mlx_lm.convert writes for the same recipe (tests/test_quantize.py compares
every file's sha256), and mlx_lm.load opens them. Calling the steps ourselves
writes straight into the stage's directory (convert refuses an existing one)
and needs no stdout swap to hide convert's narration: such a swap is
process-wide, so cells in threads had to quantize one at a time. What is left
on the console is quantize_model's one "[INFO] Quantized model with ... bits
per weight." line. Learned recipes (GPTQ, AWQ) go through mlx-lm's own
implementations instead (tasks/learned.py).
"""

import logging
from pathlib import Path

from tasks.plan import plan_for
from tasks.recipes import Recipe
from tasks.remote_code import load_options, trusted

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
        from tasks.specs import shipped_path

        calibration = {**recipe.calibration, "text": shipped_path(recipe.calibration["text"])}
        want = calibration.pop("sha256", None)
        learned = learned_quantize(base_dir, out, recipe.method, recipe.bits, recipe.group_size, calibration,
                                   dtype=recipe.dtype)
        if want and learned["calibration"]["sha256"] != want:
            raise ValueError(f"recipe {recipe.name!r}: calibration.text {recipe.calibration['text']} changed "
                             "since the recipe was read (its digest is part of the key)")
    else:
        learned = None
        _round(base_dir, recipe, plan, out)

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


def _round(base_dir: Path, recipe: Recipe, plan, out: Path) -> None:
    """Round to nearest as mlx_lm.convert(quantize=..., q_bits, q_group_size, q_mode, dtype, quant_predicate)
    does (mlx_lm/convert.py, checked against mlx-lm 0.32.2), step by step."""
    from mlx_lm.utils import load, quantize_model, save

    from tasks.plan import cast, convert_dtype

    model, tokenizer, config = load(str(base_dir), lazy=True, return_config=True, **load_options())
    cast(model, recipe.dtype or convert_dtype(config))
    if recipe.quantizes_any:
        model, config = quantize_model(model, config, recipe.group_size, recipe.bits, mode=recipe.mode,
                                       quant_predicate=quant_predicate(plan))
    save(out, base_dir, model, tokenizer, config)


def quant_predicate(plan):
    """The plan as mlx-lm's quant_predicate(path, module): False keeps a module in float, True gives it
    the defaults, a dict its own bits / group size / mode."""
    chosen = {p.path: p for p in plan.layers}

    def predicate(path, module):
        p = chosen.get(path)
        if p is None or p.quant is None:
            return False
        # The default stays implicit in config.json, as mlx_lm.convert writes it for a uniform recipe.
        return True if p.source == "default" else dict(p.quant)

    return predicate


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


def build(job) -> dict:
    """The quantize stage (tasks/registry.py): the base as downloaded, through the recipe in job.params;
    or, for a searched recipe ({"name", "search"}), through the recipe found from the sensitivity artifact."""
    if "search" not in job.params:
        return quantize(job.inputs[0], Recipe.from_params(job.params), job.out)
    from tasks.search import find_recipe, recipe_yaml
    from tasks.sensitivity import load_table

    recipe, header, found = find_recipe(load_table(job.inputs[1]), job.inputs[0], job.params["name"], job.params["search"])
    (job.out / "recipe.yaml").write_text(recipe_yaml(recipe, header))
    return {**quantize(job.inputs[0], recipe, job.out), "search": found}
