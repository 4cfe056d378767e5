import subprocess
import sys

import numpy as np
import pytest

from flows.blas import blas_env

PROBE = """
import numpy as np, mlx.core as mx
a = mx.array(np.random.default_rng(0).standard_normal((256, 192), dtype=np.float32))
b = mx.array(np.random.default_rng(1).standard_normal((192, 128), dtype=np.float32))
np.save(__import__("sys").argv[1], np.array(a @ b))
print(any("libopenblas.so" in line for line in open("/proc/self/maps")))  # numpy bundles its own, renamed
"""


def run_probe(tmp_path, env=None):
    out = tmp_path / f"product-{env is not None}.npy"
    printed = subprocess.run([sys.executable, "-c", PROBE, str(out)], env=env, capture_output=True, text=True, check=True)
    return printed.stdout.strip() == "True", np.load(out)


@pytest.mark.skipif(blas_env() is None, reason="no OpenBLAS to interpose here (not a Linux CPU build of mlx)")
def test_openblas_is_interposed_and_computes_the_same_product(tmp_path):
    interposed, fast = run_probe(tmp_path, blas_env())
    plain, reference = run_probe(tmp_path)
    assert interposed and not plain
    np.testing.assert_allclose(fast, reference, rtol=1e-4, atol=1e-4)


def test_qsweep_blas_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("QSWEEP_BLAS", "0")
    assert blas_env() is None


@pytest.mark.skipif(blas_env() is None, reason="no OpenBLAS to interpose here (not a Linux CPU build of mlx)")
def test_malloc_keeps_freed_blocks_unless_the_user_says_otherwise(monkeypatch):
    env = blas_env()
    assert int(env["MALLOC_MMAP_THRESHOLD_"]) >= 64 << 20 and int(env["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 30
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    assert blas_env()["MALLOC_TRIM_THRESHOLD_"] == "12345"
