"""logsumexp over a vocabulary on the CPU: tasks/cpu.logsumexp_now (numpy, row chunks on a thread per core)
against mlx's own mx.logsumexp, in time and in error against float64, for SmolLM2's and Gemma 3's vocabularies.

    .venv/bin/python bench/logsumexp.py [--positions 2048]
"""

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import cpu  # noqa: E402


def best(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", type=int, default=2048, help="scored positions x 49,152 logits, spread over the rows")
    args = p.parse_args()
    print(f"{'vocabulary':>10} {'rows':>5} {'mlx s':>7} {'numpy s':>8} {'speed-up':>8} {'mlx err':>9} {'numpy err':>9}")
    for vocab, name in ((49152, "SmolLM2"), (262144, "Gemma 3")):
        rows = args.positions * 49152 // vocab
        x = (np.random.default_rng(0).standard_normal((rows, vocab)) * 5).astype(np.float32)  # logits-like spread
        logits = mx.array(x)
        mx.eval(logits)
        exact = np.log(np.exp(x.astype(np.float64)).sum(axis=-1))
        t_mlx, ours_mlx = best(lambda: np.array(mx.logsumexp(logits, axis=-1)))
        t_np, ours_np = best(lambda: cpu.logsumexp_now(logits))
        print(f"{vocab:>10} {rows:>5} {t_mlx:>7.3f} {t_np:>8.3f} {t_mlx / t_np:>7.1f}x {np.abs(ours_mlx - exact).max():>9.1e} "
              f"{np.abs(ours_np - exact).max():>9.1e}   ({name})")


if __name__ == "__main__":
    main()
