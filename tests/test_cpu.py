import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

from flows.blas import blas_env
from tasks import cpu
from tasks.loading import load_as

on_cpu = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU-only kernels")


@on_cpu
def test_fast_swiglu_gives_the_models_own_outputs(tiny_model):
    model, _ = load_as(tiny_model, "fp32")
    tokens = mx.array([[1, 17, 42, 99, 3, 250, 7, 8]])
    before = model(tokens)
    assert cpu.fast_swiglu(model) == len(model.model.layers)
    assert all(isinstance(layer.mlp, cpu.FastSwiGLU) for layer in model.model.layers)
    after = model(tokens)
    assert mx.allclose(after, before, rtol=1e-5, atol=1e-5).item()
    assert cpu.fast_swiglu(model) == 0  # already swapped: nothing to do


@on_cpu
def test_fast_swiglu_leaves_other_dtypes_alone(tiny_model):
    model, _ = load_as(tiny_model, "native")  # bf16: mlx's SiLU rounds between steps, keep it
    assert cpu.fast_swiglu(model) == 0


@on_cpu
def test_swiglu_and_logsumexp_agree_with_mlx():
    x = 8 * mx.random.normal((4, 3000), key=mx.random.key(1))
    x = mx.concatenate([x, mx.array([[-200.0, -88.5, 88.5, 0.0] * 750])])
    assert mx.allclose(cpu.swiglu(x, x), nn.silu(x) * x, rtol=1e-6, atol=1e-30).item()
    assert cpu._fast_logsumexp_agrees()  # the probe lets the fast path in on this CPU
    assert mx.allclose(cpu.logsumexp(x), mx.logsumexp(x, axis=-1), rtol=1e-6).item()


@pytest.mark.skipif(blas_env() is None, reason="no OpenBLAS to interpose here")
def test_blas_threads_sets_and_restores_openblas():
    probe = ("import ctypes; from tasks import cpu; get = ctypes.CDLL(None).openblas_get_num_threads; b = get()\n"
             "with cpu.blas_threads(1): inside = get()\n"
             "print(b, inside, get())")
    out = subprocess.run([sys.executable, "-c", probe], env=blas_env(), capture_output=True, text=True, check=True)
    before, inside, after = map(int, out.stdout.split())
    assert inside == 1 and after == before >= 1
