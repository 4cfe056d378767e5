"""A real BLAS for mlx on Linux CPUs.

mlx's CPU wheel links a bundled reference BLAS: fp32 matmuls run at a few
GFLOP/s. OpenBLAS (PyPI cmeel-openblas, a project dependency on Linux)
interposed with LD_PRELOAD runs the same calls ~20x faster. The preload must be
in place before the process starts, so `qsweep` re-executes itself once with it.
OpenBLAS needs libgfortran.so.5, which mlx's wheel already bundles under a
hashed name; a folder of links in the virtualenv gives it the plain name.
Set QSWEEP_BLAS=0 to run with mlx's own BLAS.

The same re-exec tunes glibc's malloc for mlx on the CPU: mlx allocates every
op's output with malloc, and glibc serves multi-megabyte blocks with fresh
mmaps (or trims the heap back to the OS) unless told otherwise, so each
elementwise op pays its page faults again. Depending on what ran before, that
made SiLU twice as slow and a whole benchmark about 15% slower (bench/RESULTS.md).
"""

import contextlib
import os
import sys
import sysconfig
from pathlib import Path

from storage.settings import settings

MARK = "QSWEEP_BLAS"
# Blocks under 256 MiB come from the heap, and the heap is never trimmed: freed blocks are reused.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def _links(bundled: Path) -> Path:
    links = Path(sys.prefix) / "lib" / "qsweep-blas"
    links.mkdir(parents=True, exist_ok=True)
    for lib in bundled.iterdir():  # keep the hashed names too: libgfortran finds libquadmath by them
        names = [lib.name] + (["libgfortran.so.5"] if lib.name.startswith("libgfortran") else [])
        for name in names:
            link = links / name
            if not link.exists():
                with contextlib.suppress(FileExistsError):  # another qsweep starting at the same time
                    link.symlink_to(lib)
    return links


def blas_env() -> dict | None:
    """The environment that interposes OpenBLAS, or None where it does not apply."""
    if sys.platform != "linux" or settings().blas in ("0", "applied"):
        return None
    site = Path(sysconfig.get_paths()["purelib"])
    openblas, bundled = site / "cmeel.prefix" / "lib" / "libopenblas.so.0", site / "mlx_cpu.libs"
    if not (openblas.exists() and bundled.is_dir()):
        return None
    import mlx.core as mx

    if mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available()):
        return None  # the GPU does the matmuls
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(openblas), env.get("LD_PRELOAD")]))
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(_links(bundled)), env.get("LD_LIBRARY_PATH")]))
    for name, value in MALLOC.items():
        env.setdefault(name, value)
    env[MARK] = "applied"
    return env


def reexec_with_blas(*how: str) -> None:
    """Run this program again under OpenBLAS, when it applies: `how` is ("-m", module) or (script path,)."""
    env = blas_env()
    if env is not None:
        os.execve(sys.executable, [sys.executable, *how, *sys.argv[1:]], env)
