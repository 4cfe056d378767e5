"""Making mlx use the whole CPU when a model is scored there.

On a CPU, mlx runs each stream's ops on one thread: only the matmuls (through the
BLAS) use more than one core. Three things close most of that gap:

- `streams()`: one mlx stream per core; a batch split across them runs its
  elementwise work (SiLU, softmax, norms) on every core at once.
- `blas_threads(1)` while the streams run, so the BLAS does not oversubscribe them.
- `fast_swiglu(model)`: mlx's CPU SiLU evaluates its exp one element at a time
  (mlx's SIMD type is one lane wide on x86). The same Cephes polynomial that mlx
  uses, written as array ops and fused by `mx.compile`, runs about twice as fast
  and agrees with mlx to float rounding (checked on a probe before it is used).
  `logsumexp` uses the same exp, after the same kind of probe, inside a lazy graph.
- `logsumexp_now`: where the logits are evaluated anyway (the benchmark's scored positions,
  the fidelity windows), numpy's SIMD exp over row chunks on a thread per core. Over a
  262,144-token vocabulary (gemma3), 384 rows: 0.06 s against mlx's 1.5 s, and within
  1e-6 nats of float64 where mlx's float32 reduction is off by up to 3e-4.

The polynomial is mlx's internal, so it lives in tasks/compat.py with the version it was read in.
"""

import contextlib
import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tasks.compat import EXP_POLYNOMIAL


_local = threading.local()  # mlx streams belong to the thread that made them; cells may run in threads


def streams() -> list:
    """The streams to split a batch over: one per core on a CPU (at most 8), the default one elsewhere."""
    if getattr(_local, "streams", None) is None:
        if mx.default_device() != mx.cpu:
            _local.streams = [mx.default_stream(mx.default_device())]
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            _local.streams = [mx.default_stream(mx.cpu)] + [mx.new_stream(mx.cpu) for _ in range(min(cores, 8) - 1)]
    return _local.streams


_blas = {"users": 0, "before": None, "lock": threading.Lock()}


@contextlib.contextmanager
def blas_threads(n: int | None):
    """OpenBLAS's thread count for a while, where OpenBLAS is interposed (flows/blas.py); else nothing.
    The count is process-wide: with cells in threads, the first to enter sets it, the last to leave restores it."""
    try:
        lib = ctypes.CDLL(None)
        get, set_ = lib.openblas_get_num_threads, lib.openblas_set_num_threads
    except (AttributeError, OSError):
        get = set_ = None
    if n is None or get is None:
        yield
        return
    with _blas["lock"]:
        if _blas["users"] == 0:
            _blas["before"] = get()
            set_(n)
        _blas["users"] += 1
    try:
        yield
    finally:
        with _blas["lock"]:
            _blas["users"] -= 1
            if _blas["users"] == 0:
                set_(_blas["before"])


def _exp(x: mx.array) -> mx.array:
    """exp as mlx's CPU kernel computes it (compat.EXP_POLYNOMIAL), for x <= 88."""
    x = x * 1.442695  # log2(e): exp(x) = 2**x'
    whole = mx.floor(x + 0.5)
    frac = x - whole
    p = EXP_POLYNOMIAL[0]
    for c in EXP_POLYNOMIAL[1:]:
        p = p * frac + c
    return p * ((whole.astype(mx.int32) + 127) << 23).view(mx.float32)  # 2**whole from its exponent bits


@mx.compile
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, with sigmoid as mlx's CPU kernel writes it: 1 / (1 + exp(|g|)), mirrored."""
    y = 1.0 / (1.0 + _exp(mx.minimum(mx.abs(gate), 88.0)))
    return (gate * mx.where(gate < 0, y, 1.0 - y) * x).astype(x.dtype)


@mx.compile
def _shifted_exp_sum(x: mx.array, top: mx.array) -> mx.array:
    return mx.sum(_exp(mx.maximum(x - top, -88.0)), axis=-1)


def logsumexp(x: mx.array) -> mx.array:
    """logsumexp over the last axis; on a CPU in float32, with `_exp` (mlx's own reduces with its scalar exp)."""
    if mx.default_device() != mx.cpu or x.dtype != mx.float32 or not _fast_logsumexp_agrees():
        return mx.logsumexp(x, axis=-1)
    return _fast_logsumexp(x)


LSE_ROWS = 8  # rows per numpy chunk: a 262,144-token row is 1 MB, so a chunk's temporaries stay in cache


@functools.cache
def _pool() -> ThreadPoolExecutor:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return ThreadPoolExecutor(min(cores, 8), thread_name_prefix="qsweep-lse")


def logsumexp_now(x: mx.array, exclude: np.ndarray | None = None) -> np.ndarray:
    """logsumexp over the last axis, evaluated now, as float32 numpy; leaving out, per row, the token ids in
    `exclude` (same leading shape, ids on the last axis) when given. numpy releases the GIL in its loops,
    so the chunks run on every core."""
    x = np.asarray(x.astype(mx.float32))  # evaluates; no copy for a float32 array on the CPU
    lead, vocab = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, vocab)
    skip = None if exclude is None else np.asarray(exclude).reshape(len(rows), -1)
    out = np.empty(len(rows), dtype=np.float32)

    def chunk(start: int) -> None:
        c = rows[start:start + LSE_ROWS]
        if skip is not None:
            c = c.copy()
            np.put_along_axis(c, skip[start:start + LSE_ROWS], -np.inf, axis=-1)
        top = c.max(axis=-1, keepdims=True)
        finite = np.where(np.isfinite(top), top, 0.0)  # a row of -inf only: its logsumexp is -inf
        with np.errstate(divide="ignore"):
            out[start:start + LSE_ROWS] = finite[:, 0] + np.log(np.exp(c - finite).sum(axis=-1))

    list(_pool().map(chunk, range(0, len(rows), LSE_ROWS)))
    return out.reshape(lead)


def _fast_logsumexp(x: mx.array) -> mx.array:
    top = mx.stop_gradient(mx.max(x, axis=-1, keepdims=True))
    return top[..., 0] + mx.log(_shifted_exp_sum(x, top))


@functools.cache
def _fast_logsumexp_agrees() -> bool:
    """The probe before logsumexp's swap: the same numbers as mlx's on a spread of logits, once per process."""
    probe = 8 * mx.random.normal((4, 3000), key=mx.random.key(1))
    try:  # mx.compile on a CPU builds C++ at run time: no compiler, no swap
        return mx.allclose(_fast_logsumexp(probe), mx.logsumexp(probe, axis=-1), rtol=1e-6).item()
    except Exception:
        return False


class FastSwiGLU(nn.Module):
    """A gated MLP (down(silu(gate(x)) * up(x))) with `swiglu` above; same weights, same projections."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.inner = mlp

    def __call__(self, x: mx.array) -> mx.array:
        m = self.inner
        return m.down_proj(swiglu(m.gate_proj(x), m.up_proj(x)))


def fast_swiglu(model: nn.Module) -> int:
    """On a CPU, swap each float32 layer's gated MLP for FastSwiGLU where a probe gives the same output.

    Returns how many were swapped. Other dtypes keep mlx's SiLU: it rounds between its steps.
    """
    if mx.default_device() != mx.cpu:
        return 0
    swapped, checked = 0, {}
    for layer in getattr(getattr(model, "model", model), "layers", []):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or isinstance(mlp, FastSwiGLU) or not all(
                getattr(getattr(mlp, p, None), "weight", None) is not None and getattr(mlp, p).weight.dtype == mx.float32
                for p in ("gate_proj", "up_proj", "down_proj")):
            continue
        kind = type(mlp)
        if kind not in checked:  # one probe per MLP class: a different activation fails it
            probe = 3 * mx.random.normal((1, 8, mlp.down_proj.weight.shape[0]), key=mx.random.key(0))
            try:  # mx.compile on a CPU builds C++ at run time: no compiler, no swap
                checked[kind] = mx.allclose(FastSwiGLU(mlp)(probe), mlp(probe), rtol=1e-4, atol=1e-5).item()
            except Exception:
                checked[kind] = False
        if checked[kind]:
            layer.mlp = FastSwiGLU(mlp)
            swapped += 1
    return swapped
