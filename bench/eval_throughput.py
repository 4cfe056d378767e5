"""Evaluation throughput: qsweep's benchmark adapter vs mlx_lm.evaluate, same model, same requests.

Both adapters run through `lm_eval.simple_evaluate` on the same requests: chat
template off, 0-shot, same seeds, same limit. Models load and each adapter is
warmed up once before anything is timed. Two times are reported per adapter:
the whole `simple_evaluate` call, and the time spent inside the adapter's
`loglikelihood` (the scoring itself, which is what the adapters differ in).
The per-request log-likelihoods of the two timed runs are then compared one by one.
qsweep's adapter runs with the backend a sweep would use (--backend, default auto:
dequantized fp32 on a CPU, under the OpenBLAS that `qsweep` interposes, as this
script does too). Its tokens/s is set against the hardware limit: the measured fp32
GEMM rate / (2 x matmul parameters).

    .venv/bin/python bench/eval_throughput.py                  # embedded tiny model
    .venv/bin/python bench/eval_throughput.py --wide           # a wider tiny model
    .venv/bin/python bench/eval_throughput.py --model PATH --task NAME --limit 100
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would drown the table
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.blas import reexec_with_blas  # noqa: E402

if __name__ == "__main__":
    reexec_with_blas(__file__)

import lm_eval  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx_lm.evaluate  # noqa: E402

from tasks.benchmark import task_manager_for  # noqa: E402
from tasks.demo_model import make_demo_model  # noqa: E402
from tasks.lm_adapter import MLXLM  # noqa: E402
from tasks.loading import resolve_backend  # noqa: E402

SEED = 0
WIDE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, head_dim=32)


def gemm_gflops(n: int = 1024, repeats: int = 10, tries: int = 5) -> float:
    """This machine's fp32 matmul rate through mlx, in GFLOP/s: the best of several tries, so the limit is not understated."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(repeats):
            mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best / 1e9


def matmul_params(model) -> int:
    """Weights a token multiplies through: every Linear, plus the embedding when it doubles as the head."""
    n = sum(m.weight.size for _, m in model.named_modules() if isinstance(m, nn.Linear))
    if not any(name.endswith("lm_head") for name, _ in model.named_modules()):
        n += model.model.embed_tokens.weight.size
    return n


def record_loglikelihood(lm):
    """Wrap lm.loglikelihood (on the instance) to time it and keep {(context, continuation): logprob}."""
    inner, log = lm.loglikelihood, {"seconds": 0.0, "scores": {}}

    def loglikelihood(requests, *args, **kwargs):
        start = time.perf_counter()
        out = inner(requests, *args, **kwargs)
        log["seconds"] += time.perf_counter() - start
        log["scores"].update({req.args: float(lp) for req, (lp, _) in zip(requests, out)})
        return out

    lm.loglikelihood = loglikelihood
    return log


def count_tokens(scorer) -> dict:
    """Wrap scorer.score (on the instance) to add up the positions a request list needs: each distinct
    context once, plus every continuation but its last token (what a packed row feeds the model)."""
    inner, count = scorer.score, {"tokens": 0}

    def score(requests):
        contexts = {}
        for ctx, cont in requests:
            if cont:
                contexts.setdefault(tuple(ctx), []).append(len(cont) - 1)
        count["tokens"] += sum(len(ctx) + sum(extra) for ctx, extra in contexts.items())
        return inner(requests)

    scorer.score = score
    return count


def evaluate(lm, task: str, limit: int | None) -> dict:
    return lm_eval.simple_evaluate(
        model=lm, tasks=[task], task_manager=task_manager_for([task]), limit=limit,
        num_fewshot=0, apply_chat_template=False, fewshot_as_multiturn=False,
        random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED, fewshot_random_seed=SEED,
        log_samples=False, bootstrap_iters=0, verbosity="ERROR")


def run(name: str, lm, task: str, limit: int | None, repeats: int) -> dict:
    # Warm-up on the same requests (dataset and task build, mlx's first-call costs): with
    # a two-question warm-up, one peer run took 1.6 s where warm ones take ~0.9 s.
    evaluate(lm, task, limit)
    best = None
    for _ in range(repeats):
        log = record_loglikelihood(lm)
        start = time.perf_counter()
        results = evaluate(lm, task, limit)
        seconds = time.perf_counter() - start
        del lm.loglikelihood  # drop the wrapper: back to the class method
        if best is None or seconds < best["seconds"]:
            metrics = results["results"][task]
            best = {"adapter": name, "seconds": seconds, "loglik_seconds": log["seconds"],
                    "scores": log["scores"], "acc": metrics.get("acc,none"),
                    "acc_norm": metrics.get("acc_norm,none")}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="an mlx-lm model dir (default: the embedded tiny model)")
    parser.add_argument("--wide", action="store_true", help="with no --model: a wider tiny model (%s)" % WIDE)
    parser.add_argument("--task", default="qsweep_demo_mc")
    parser.add_argument("--limit", type=int, default=None, help="questions (default: the whole task)")
    parser.add_argument("--batch-size", type=int, default=16, help="qsweep adapter's batch size")
    parser.add_argument("--backend", default="auto", choices=("auto", "native", "fp32"), help="qsweep adapter's backend")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per adapter; the fastest is kept")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_demo_model(Path(tmp) / "demo", seed=SEED, **(WIDE if args.wide else {}))
        ours = MLXLM(model_dir, batch_size=args.batch_size, backend=resolve_backend(args.backend))
        fed = count_tokens(ours.scorer)
        peer = mlx_lm.evaluate.MLXLM(str(model_dir), use_chat_template=False)
        rows = [run("qsweep tasks.lm_adapter.MLXLM", ours, args.task, args.limit, args.repeats),
                run("mlx_lm.evaluate.MLXLM", peer, args.task, args.limit, args.repeats)]
        tokens = fed["tokens"] // (args.repeats + 1)  # every run feeds the same requests
        params, gflops = matmul_params(ours.model), gemm_gflops()

    print(f"\nmodel: {args.model or ('tiny demo model' + (' (wide)' if args.wide else ''))}  "
          f"task: {args.task}  limit: {args.limit}  best of {args.repeats}  "
          f"qsweep backend: {ours.weights}  BLAS: {'OpenBLAS' if os.environ.get('QSWEEP_BLAS') == 'applied' else 'mlx bundled'}")
    print(f"{'adapter':<30} {'eval s':>8} {'loglik s':>9} {'requests':>9} {'req/s':>9} {'acc':>7} {'acc_norm':>9}")
    for r in rows:
        n = len(r["scores"])
        print(f"{r['adapter']:<30} {r['seconds']:>8.3f} {r['loglik_seconds']:>9.3f} {n:>9} "
              f"{n / r['loglik_seconds']:>9.1f} {r['acc']:>7.4f} {r['acc_norm']:>9.4f}")
    ours_r, peer_r = rows
    print(f"\nspeed ratio (ours / peer, req/s): {peer_r['loglik_seconds'] / ours_r['loglik_seconds']:.2f}x "
          f"scoring, {peer_r['seconds'] / ours_r['seconds']:.2f}x whole simple_evaluate")
    limit = gflops * 1e9 / (2 * params)
    rate = tokens / ours_r["loglik_seconds"]
    print(f"qsweep tokens/s: {rate:.0f} ({tokens} tokens); hardware limit {limit:.0f} tokens/s "
          f"(fp32 GEMM {gflops:.1f} GFLOP/s, {params / 1e6:.1f}M matmul parameters): {rate / limit:.0%} of it")
    d_acc = max(abs(ours_r[m] - peer_r[m]) for m in ("acc", "acc_norm"))
    print(f"max |acc diff| over acc, acc_norm: {d_acc:.4f} ({'agree' if d_acc < 1e-9 else 'DIFFER'})")

    common = ours_r["scores"].keys() & peer_r["scores"].keys()
    diffs = sorted((abs(ours_r["scores"][k] - peer_r["scores"][k]), k) for k in common)
    if diffs:
        worst, (ctx, cont) = diffs[-1]
        mean = sum(d for d, _ in diffs) / len(diffs)
        print(f"per-request loglikelihood, {len(common)} requests in both runs: "
              f"max |diff| {worst:.4g}, mean |diff| {mean:.4g}  (worst: {ctx[-40:]!r} + {cont!r})")


if __name__ == "__main__":
    main()
