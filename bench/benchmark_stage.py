"""The benchmark stage's requests/s against bench/eval_throughput.py's scoring rate, same model, same machine.

The stage (tasks/benchmark.benchmark) runs for two recipes of the demo's base in one process, as a
sweep's cells do: the first builds lm-eval's tasks, samples and tokens (cold), the second reuses them
(tasks/benchmark.Prepared). Each is timed whole, from loading the model to writing its files, and
inside the adapter's loglikelihood (the scoring). The peer is eval_throughput.py's measurement (a warm-up,
then the time inside loglikelihood of a timed simple_evaluate: its record_loglikelihood) on the second
recipe's model, for the very documents the stage evaluated. The second recipe's samples.jsonl and metric rows are compared with the store's artifact
of the same cell, computed earlier in another process. lm-eval's warnings in the stages are counted.

    make demo   # once: the store with the demo's quantized models
    .venv/bin/python bench/benchmark_stage.py [--store .qsweep] [--recipes q4 q8]
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would drown the table
sys.path.insert(0, str(Path(__file__).resolve().parents[0]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.blas import reexec_with_blas  # noqa: E402

if __name__ == "__main__":
    reexec_with_blas(__file__)

import eval_throughput  # noqa: E402
import lm_eval  # noqa: E402

import tasks.benchmark as stage  # noqa: E402
from tasks.lm_adapter import MLXLM  # noqa: E402


class Warnings(logging.Handler):
    """Counts lm-eval's warnings by their first line, numbers and task names left in."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = Counter()

    def emit(self, record):
        self.seen[record.getMessage().splitlines()[0][:110]] += 1


def cells(store: Path, recipes: list[str]) -> list[tuple[str, Path, Path]]:
    """(recipe, quantized model dir, its benchmark artifact) for each recipe, from the store's manifests."""
    quantized = {}
    for manifest in (store / "artifacts" / "quantize").glob("*/manifest.json"):
        quantized.setdefault(json.loads(manifest.read_text())["params"]["name"], manifest.parent)
    benchmarks = {}
    for manifest in (store / "artifacts" / "benchmark").glob("*/manifest.json"):
        m = json.loads(manifest.read_text())
        if m["code_version"] == stage.CODE_VERSION:
            benchmarks.setdefault(m["inputs"][0]["key"], manifest.parent)
    missing = [r for r in recipes if r not in quantized or quantized[r].name not in benchmarks]
    if missing:
        sys.exit(f"no quantized model with a benchmark for {', '.join(missing)} in {store}: run `make demo` first")
    return [(r, quantized[r], benchmarks[quantized[r].name]) for r in recipes]


def timed_stage(model: Path, params: dict, out: Path) -> dict:
    """benchmark() once, timed whole and inside MLXLM.loglikelihood (the requests it scored)."""
    inner, log = MLXLM.loglikelihood, {"seconds": 0.0, "requests": 0}

    def loglikelihood(self, requests, *args, **kwargs):
        start = time.perf_counter()
        result = inner(self, requests, *args, **kwargs)
        log["seconds"] += time.perf_counter() - start
        log["requests"] += len(requests)
        return result

    MLXLM.loglikelihood = loglikelihood
    try:
        start = time.perf_counter()
        rows = stage.benchmark(model, params, out)
        seconds = time.perf_counter() - start
    finally:
        MLXLM.loglikelihood = inner
    return {"seconds": seconds, "loglik_seconds": log["seconds"], "requests": log["requests"], "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path(os.environ.get("QSWEEP_STORE", ".qsweep")))
    parser.add_argument("--recipes", nargs=2, default=["q4", "q8"], help="two recipes of the demo (cold, warm)")
    args = parser.parse_args()

    warnings = Warnings()
    logging.getLogger("lm_eval").addHandler(warnings)
    logging.getLogger("lm_eval").propagate = False
    (cold_recipe, cold_model, cold_art), (warm_recipe, warm_model, warm_art) = cells(args.store, args.recipes)
    params = json.loads((warm_art / "manifest.json").read_text())["params"]  # what the sweep handed the stage

    stage.clear_prepared()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for recipe, model in ((cold_recipe, cold_model), (warm_recipe, warm_model)):
            before = sum(warnings.seen.values())
            runs[recipe] = timed_stage(model, params, Path(tmp) / recipe)
            runs[recipe]["warnings"] = sum(warnings.seen.values()) - before
        samples_same = (Path(tmp) / warm_recipe / "samples.jsonl").read_bytes() == (warm_art / "samples.jsonl").read_bytes()
    seen_in_stage = Counter(warnings.seen)
    stored_rows = json.loads((warm_art / "manifest.json").read_text())["info"]["metrics"]
    rows_same = runs[warm_recipe]["rows"] == stored_rows

    # The peer: eval_throughput.py's measurement (warm-up, then the time inside loglikelihood of a timed
    # simple_evaluate) on the warm model, for the very documents the stage evaluated.
    lm = MLXLM(warm_model, batch_size=int(params["batch_size"]), backend=params["backend"])
    p = stage.prepare(params["plan"], params["limit"], int(params["seed"]), int(params["num_fewshot"]))

    def evaluate():
        return lm_eval.simple_evaluate(model=lm, tasks=p.built, task_manager=p.manager, samples=p.indices,
                                       num_fewshot=None, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                       fewshot_random_seed=0, log_samples=False, bootstrap_iters=0)

    evaluate()
    log = eval_throughput.record_loglikelihood(lm)
    start = time.perf_counter()
    evaluate()
    peer = {"seconds": time.perf_counter() - start, "loglik_seconds": log["seconds"], "requests": len(log["scores"])}

    print(f"\nstore: {args.store}  tasks: {', '.join(t['task'] for t in params['plan'])}  limit: {params['limit']}  "
          f"backend: {params['backend']}  BLAS: {'OpenBLAS' if os.environ.get('QSWEEP_BLAS') == 'applied' else 'mlx bundled'}")
    print(f"{'run':<34} {'wall s':>7} {'loglik s':>9} {'requests':>9} {'req/s':>7} {'scoring req/s':>14} {'warnings':>9}")
    for label, recipe in ((f"stage {cold_recipe} (cold)", cold_recipe), (f"stage {warm_recipe} (tasks reused)", warm_recipe)):
        r = runs[recipe]
        print(f"{label:<34} {r['seconds']:>7.1f} {r['loglik_seconds']:>9.1f} {r['requests']:>9} "
              f"{r['requests'] / r['seconds']:>7.1f} {r['requests'] / r['loglik_seconds']:>14.1f} {r['warnings']:>9}")
    print(f"{'eval_throughput.py on ' + warm_recipe:<34} {peer['seconds']:>7.1f} {peer['loglik_seconds']:>9.1f} "
          f"{peer['requests']:>9} {'':>7} {peer['requests'] / peer['loglik_seconds']:>14.1f}")
    peer_rate = peer["requests"] / peer["loglik_seconds"]
    for label, recipe in (("cold", cold_recipe), ("warm", warm_recipe)):
        r = runs[recipe]
        print(f"stage {label} req/s / eval_throughput req/s: {r['requests'] / r['seconds'] / peer_rate:.2f}  "
              f"(its own scoring is {r['loglik_seconds'] / r['seconds']:.0%} of its wall time)")
    print(f"fixed cost per stage (wall - scoring): cold {runs[cold_recipe]['seconds'] - runs[cold_recipe]['loglik_seconds']:.1f} s, "
          f"warm {runs[warm_recipe]['seconds'] - runs[warm_recipe]['loglik_seconds']:.1f} s; prepared: {dict(stage.prepared_stats)}")
    print(f"{warm_recipe} with tasks reused vs the store's artifact ({warm_art.name[:12]}): "
          f"samples.jsonl {'identical' if samples_same else 'DIFFERS'}, metric rows {'identical' if rows_same else 'DIFFER'}")
    print("lm-eval warnings in the two stages:")
    for message, n in seen_in_stage.most_common():
        print(f"  {n:>3} x {message}")


if __name__ == "__main__":
    main()
