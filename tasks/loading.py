"""Loading a model the way a stage runs it: smoke, benchmark and fidelity share this.

Kept apart from the benchmark's lm-eval adapter so that loading a model imports no lm-eval
(about 1.5 s of imports for the evaluator, measured on the 2-core dev VM). mlx is imported
when a model is loaded, not with this module: the sweep resolves backends while it plans cells.
"""

import json
from pathlib import Path

from tasks.remote_code import load_options
from tasks.specs import BACKENDS

# native: mlx's quantized kernels, as the model runs for users (fast on Metal/CUDA).
# fp32: dequantized weights, the same numbers at dense speed (fast on a CPU with a real BLAS).
RUNNABLE = ("native", "fp32")


def resolve_backend(backend: str) -> str:
    """'auto' is native on a GPU and fp32 on a CPU; resolved before keying, since results differ slightly."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not allowed; allowed: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    import mlx.core as mx

    return "native" if mx.default_device() == mx.gpu else "fp32"


def load_as(model_dir: Path, backend: str):
    """mlx_lm.load, with the weights as the backend runs them."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    if backend not in RUNNABLE:
        raise ValueError(f"backend {backend!r} is not allowed; allowed: {', '.join(BACKENDS)}"
                         + (" ('auto' resolved first: resolve_backend)" if backend == "auto" else ""))
    model, tokenizer = load(str(model_dir), **load_options())
    if backend == "fp32":
        # The same quantized weights, expanded: a CPU runs dense fp32 matmuls
        # through BLAS far faster than quantized_matmul or bf16.
        model = dequantize_model(model)
        model.set_dtype(mx.float32)
    return model, tokenizer


def trunk_and_head(model, token: int = 0):
    """(trunk, head) with model(x) == head(trunk(x)), checked on a probe; else (model, identity).

    The vocabulary projection (and the log-softmax after it) then runs only at the
    positions whose log-probs are read, not at every context token.
    """
    import mlx.core as mx

    trunk, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if head is None and trunk is not None and hasattr(getattr(trunk, "embed_tokens", None), "as_linear"):
        head = trunk.embed_tokens.as_linear
    if trunk is not None and head is not None:
        probe = mx.array([[token, 0, 1, 2]])
        try:
            if mx.array_equal(model(probe), head(trunk(probe))).item():
                return trunk, head
        except Exception:  # a model built another way: score it whole
            pass
    return model, lambda h: h


def context_length(model_dir: Path) -> int:
    """The model's context length as its config.json states it (2048 when it does not)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if value:
            return int(value)
    return 2048


# mlx's builds, by package: each ships mlx's library for one kind of device (a venv holds one).
BUILDS = ("mlx-metal", "mlx-cuda-12", "mlx-cuda-13", "mlx-cpu")


def mlx_builds() -> list[str]:
    """The mlx builds installed, read from package metadata (mlx is not imported: a CUDA build fails to import
    where there is no NVIDIA driver)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in BUILDS:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return found


def unrunnable_mlx() -> str | None:
    """Why mlx cannot run models here, as one line that says what to install; None when it can."""
    import sys

    builds = mlx_builds()
    if sys.platform == "linux" and not builds:
        return ("mlx has no build installed: pip install -e '.[cpu]' (what `make setup` does), or '.[cuda]' on a "
                "machine with an NVIDIA GPU (`make setup-cuda`)")
    try:
        import mlx.core  # noqa: F401
    except ImportError as e:
        return (f"mlx ({', '.join(builds) or 'no build'}) cannot load here: {e}. "
                + ("mlx's CUDA build needs an NVIDIA driver; without a GPU install the CPU build: "
                   "`make -B setup MLX=cpu`, or pip install -e '.[cpu]'" if "cuda" in str(e).lower() or
                   any("cuda" in b for b in builds) else "reinstall: `make -B setup`"))
    return None


def describe_device() -> str:
    """Where mlx runs models in this process, for manifests and metric rows: "gpu: NVIDIA H200 (mlx-cuda-12 0.32.4)",
    "cpu: AMD EPYC (mlx-cpu 0.32.4)"."""
    import mlx.core as mx

    info = mx.device_info(mx.default_device())
    name = info.get("device_name") or info.get("architecture") or "unknown"
    builds = mlx_builds()
    return f"{mx.default_device().type.name}: {name}" + (f" ({', '.join(builds)})" if builds else "")


def gpu_build_without_gpu() -> str | None:
    """A line for the console when a GPU build of mlx runs on the CPU (it found no GPU); None otherwise."""
    import mlx.core as mx

    builds = [b for b in mlx_builds() if not b.startswith("mlx-cpu")]
    if not builds or mx.default_device() == mx.gpu:
        return None
    return (f"mlx's GPU build ({', '.join(builds)}) finds no GPU here: models run on the CPU, with mlx's own BLAS "
            "(slow; `make -B setup MLX=cpu` installs the CPU build with OpenBLAS)")
