"""learned: quantize with calibration data, through mlx-lm's GPTQ and AWQ.

We call mlx_lm.quant.gptq.gptq_quantize and mlx_lm.quant.awq.awq_quantize the
way their scripts' main() do, with two differences: the calibration text is a
local file (mlx_lm.quant.utils.load_data downloads one, and we are offline),
and the model comes from a local HF-layout directory. The scripts keep the
weights in the dtype they are stored in; we first cast them as mlx_lm.convert
does (the recipe's dtype, else the config's: tasks.plan.convert_dtype), so a
recipe's dtype means the same for learned and rounded recipes.

Both report progress on the console and we let them: GPTQ draws two tqdm bars
on stderr ("Computing Hessians", "Quantizing"), AWQ one bar over the blocks on
stderr and a "Loss reduction: ..." line per block on stdout (tqdm.write).
Neither takes an argument to silence it, and swapping sys.stdout / sys.stderr
around the call would swallow every other thread's output too.

tasks/data/calibration.txt is the default calibration text: short encyclopedic
paragraphs on everyday science, history and geography, written for this
project and free of third-party text.
"""

import hashlib
from pathlib import Path

import mlx.core as mx

from tasks.recipes import CALIBRATION_KEYS, METHODS
from tasks.remote_code import load_options, trusted


# gptq.quantize packs codes itself and asserts bits in {2, 4, 8}; AWQ quantizes
# through mx.quantize, so it takes whatever affine mode takes.
BITS = METHODS  # one table, in tasks/recipes.py, for the recipe check and this one
GROUP_SIZES = (32, 64, 128)

# What the scripts' main() default to for the layers the method does not learn.
GPTQ_FALLBACK = {"fallback_bits": 6, "fallback_group_size": 64}  # embeddings
AWQ_EMBED = {"embed_bits": 4, "embed_group_size": 32}  # embeddings and lm_head


def calibration_data(tokenizer, text_path: Path, num_samples: int, sequence_length: int, seed: int) -> mx.array:
    """Token windows cut from a local text file, as mlx_lm.quant.utils.load_data cuts its download (same procedure, our file)."""
    text = Path(text_path).read_text(encoding="utf-8")
    # verbose=False: the whole file is longer than model_max_length on purpose.
    tokens = tokenizer.encode(text, return_tensors="mlx", verbose=False)[0]
    if tokens.size < sequence_length:
        raise ValueError(f"calibration.text: {text_path} has {tokens.size} tokens, fewer than sequence_length={sequence_length}")
    # Random non-overlapping windows, drawn as mx.random.seed(seed) then permutation() would draw them
    # (that draw uses the second half of split(key(seed))). The explicit key leaves the process-wide
    # generator alone, so two cells calibrating in threads cannot reseed each other's draw.
    tokens = tokens[: (tokens.size // sequence_length) * sequence_length]
    tokens = tokens.reshape(-1, sequence_length)
    segments = mx.random.permutation(tokens.shape[0], key=mx.random.split(mx.random.key(seed))[1])
    if num_samples > 0:
        segments = segments[:num_samples]
    return tokens[segments]


def _check(method: str, bits: int, group_size: int, calibration: dict) -> Path:
    if method not in BITS:
        raise ValueError(f"method {method!r} is not allowed; allowed: {', '.join(BITS)}")
    if bits not in BITS[method]:
        raise ValueError(f"bits {bits!r} is not supported by {method}; allowed: {', '.join(map(str, BITS[method]))}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size {group_size!r} is not allowed; allowed: {', '.join(map(str, GROUP_SIZES))}")
    missing = set(CALIBRATION_KEYS) - set(calibration)
    if missing:
        raise ValueError(f"calibration is missing field(s): {', '.join(sorted(missing))}")
    text = Path(calibration["text"])
    if not text.is_file():
        raise ValueError(f"calibration.text: no such file: {text}")
    if calibration["sequence_length"] < 1:
        raise ValueError(f"calibration.sequence_length must be positive, got {calibration['sequence_length']!r}")
    return text


def learned_quantize(base_dir: Path, out: Path, method: str, bits: int, group_size: int, calibration: dict,
                     dtype: str | None = None) -> dict:
    """Quantize the HF-layout model in base_dir with GPTQ or AWQ and save it in mlx-lm's layout into `out`.

    calibration = {"text": path, "num_samples": int (-1: all windows), "sequence_length": int, "seed": int}.
    dtype: the float type to cast to first, as mlx_lm.convert's dtype (None: the config's, as convert picks it).
    Returns {"method", "bits", "group_size", "calibration" (with the text's sha256),
    "layers": {module path: {"bits", "group_size", "mode"}}} for every quantized module.
    """
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.quant import awq, gptq
    from mlx_lm.utils import load, load_model, save

    from tasks.plan import cast, convert_dtype

    text = _check(method, bits, group_size, calibration)
    model, tokenizer, config = load(str(base_dir), lazy=True, return_config=True, **load_options())
    if "quantization" in config or "quantization_config" in config:
        raise ValueError(f"base_dir: {base_dir} is already quantized; learned quantization needs a float model")
    if method == "awq" and config["model_type"] not in awq.AWQ_MODEL_CONFIGS:
        raise ValueError(
            f"method 'awq' has no config for model_type {config['model_type']!r}; "
            f"supported: {', '.join(awq.AWQ_MODEL_CONFIGS)}"
        )
    cast(model, dtype or convert_dtype(config))  # as mlx_lm.convert casts before it quantizes

    data = calibration_data(
        tokenizer, text, calibration["num_samples"], calibration["sequence_length"], calibration["seed"]
    )
    if method == "gptq":
        model, config["quantization"] = gptq.gptq_quantize(model, data, bits, group_size, **GPTQ_FALLBACK)
    else:
        awq.awq_quantize(
            model, data, awq.AWQ_MODEL_CONFIGS[config["model_type"]],
            bits=bits, group_size=group_size, **AWQ_EMBED,
        )
        config = awq.update_config(model, config)
    save(out, base_dir, model, tokenizer, config)

    # Read the layers back from what we wrote, so `layers` is what mlx_lm.load will build.
    saved, _ = load_model(Path(out), lazy=True, trust_remote_code=trusted())
    layers = {
        path: {"bits": m.bits, "group_size": m.group_size, "mode": getattr(m, "mode", "affine")}
        for path, m in tree_flatten(saved.leaf_modules(), is_leaf=nn.Module.is_module)
        if hasattr(m, "bits")
    }
    return {
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "calibration": {**calibration, "text": str(text), "sha256": hashlib.sha256(text.read_bytes()).hexdigest()},
        "layers": layers,
    }
