"""What the KL divergence costs: qsweep's fidelity stage vs a plain perplexity pass, same model, same windows.

The plain pass is what any perplexity tool does: forward each window, log-softmax,
read the actual next token's log-prob. The fidelity stage does that and compares with
the stored reference of the base (top-k log-probs plus the rest's mass). The base's
reference pass is paid once per sweep, so it is timed separately. Also prints how
close the top-k KL comes to the full-vocabulary KL for several k.

    .venv/bin/python bench/kl_cost.py --base /tmp/smol --recipe q4
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.blas import reexec_with_blas  # noqa: E402

if __name__ == "__main__":
    reexec_with_blas(__file__)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from tasks import cpu  # noqa: E402
from tasks.fidelity import _load, _passes, fidelity, reference, targets, windows  # noqa: E402
from tasks.loading import resolve_backend  # noqa: E402
from tasks.quantize import quantize  # noqa: E402
from tasks.recipes import get_recipe  # noqa: E402
from tasks.specs import FidelitySpec  # noqa: E402

# The fidelity stages' parameters as a sweep resolves them from the spec's defaults.
DEFAULTS = FidelitySpec().model_dump(exclude={"enabled"}) | {"backend": resolve_backend("auto")}


def plain_perplexity(model_dir: Path, params: dict) -> float:
    """A perplexity stage without the comparison: load, forward every window (the same passes), average the NLL."""
    model, tokenizer = _load(model_dir, params["backend"])
    tokens = windows(tokenizer, params)
    scored = targets(tokens)

    nll = [cpu.logsumexp_now(logits) - np.take_along_axis(np.asarray(logits), scored[first:first + len(logits)][..., None],
                                                          axis=-1)[..., 0]
           for first, logits in _passes(model, tokens)]
    return float(np.exp(np.concatenate(nll).mean()))


def best_of(repeats: int, fn):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def full_kl(base, quant, tokens: np.ndarray) -> float:
    """KL over the whole vocabulary, position by position: what the top-k reference approximates."""
    total, count = 0.0, 0
    for (_, b), (_, q) in zip(_passes(base, tokens), _passes(quant, tokens)):
        lb, lq = b - mx.array(cpu.logsumexp_now(b))[..., None], q - mx.array(cpu.logsumexp_now(q))[..., None]
        total += (mx.exp(lb) * (lb - lq)).sum().item()
        count += lb.shape[0] * lb.shape[1]
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="a float model directory (HF or mlx-lm layout)")
    parser.add_argument("--recipe", default="q4")
    parser.add_argument("--windows", type=int, default=DEFAULTS["windows"])
    parser.add_argument("--window", type=int, default=DEFAULTS["window"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    params = {**DEFAULTS, "windows": args.windows, "window": args.window}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        quantized = tmp / args.recipe
        quantized.mkdir()
        quantize(args.base, get_recipe(args.recipe), quantized)
        (tmp / "ref").mkdir()
        ref_s, _ = best_of(1, lambda: reference(args.base, params, tmp / "ref"))
        plain_perplexity(quantized, params)  # warm-up
        plain_s, ppl = best_of(args.repeats, lambda: plain_perplexity(quantized, params))
        (tmp / "f").mkdir()
        kl_s, rows = best_of(args.repeats, lambda: fidelity(quantized, tmp / "ref", params, tmp / "f")["metrics"])
        stats = {r["metric"]: r["value"] for r in rows}

        n = int(rows[0]["n"])
        print(f"base: {args.base}  recipe: {args.recipe}  {args.windows} windows of {args.window} tokens "
              f"({n} scored)  top_k {params['top_k']}  backend {params['backend']}  best of {args.repeats}")
        print(f"reference pass (base, once per sweep): {ref_s:.2f} s")
        print(f"plain perplexity (load + pass):        {plain_s:.2f} s  (ppl {ppl:.3f})")
        print(f"fidelity stage (load + pass + KL):     {kl_s:.2f} s  (ppl {stats['ppl']:.3f}, KL mean "
              f"{stats['kl_mean']:.5f}, same top {stats['same_top']:.3f})")
        print(f"cost ratio (fidelity / plain): {kl_s / plain_s:.2f}x")

        base, tokenizer = _load(args.base, params["backend"])
        model, _ = _load(quantized, params["backend"])
        full = full_kl(base, model, windows(tokenizer, params))
        for k in (64, 256, 1024, params["top_k"]):
            (tmp / f"r{k}").mkdir()
            (tmp / f"f{k}").mkdir()
            reference(args.base, {**params, "top_k": k}, tmp / f"r{k}")
            got = {r["metric"]: r["value"] for r in fidelity(quantized, tmp / f"r{k}", {**params, "top_k": k},
                                                           tmp / f"f{k}")["metrics"]}["kl_mean"]
            print(f"top_k {k:>5}: KL mean {got:.5f} vs full vocabulary {full:.5f}: {(got - full) / full:+.2%}")


if __name__ == "__main__":
    main()
