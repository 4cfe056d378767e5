"""The GPU device check's measurements (bench/gpu_check.sh sets up the venv and runs this).

For one model and each recipe, on one device (mlx's GPU, or --device cpu to try it anywhere):
- quantize: tasks/quantize.quantize timed (after an untimed run of the same recipe, so mlx's kernel
  compilation and the page cache are warm), and the bandwidth it achieved: bytes of the base's weights
  read plus bytes of the quantized weights written, over its seconds, against the device's peak;
- benchmark: qsweep's stage (tasks/benchmark.benchmark, backend native) against mlx_lm.evaluate's
  MLXLM on the very same questions (the stage's sample, chat template off, 0-shot, seed 0), each
  warmed up once on them, then timed inside its loglikelihood (bench/eval_throughput.py's way);
  req/s = requests / those seconds. The answers each chose are compared question by question;
- smoke: tasks/smoke.smoke (backend native, SmokeSpec's prompt) once untimed, then its
  generation tokens/s as mlx-lm reports it.

    .venv/bin/python bench/gpu_check.py --device cpu --model demo://tiny-llama --recipes q4 --limit 4 --peak-gbs 50
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would drown the table
sys.path.insert(0, str(Path(__file__).resolve().parents[0]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmark_stage  # noqa: E402
import eval_throughput  # noqa: E402
import lm_eval  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx_lm.evaluate  # noqa: E402

import tasks.benchmark as stage  # noqa: E402
from tasks.download import download, resolve_source  # noqa: E402
from tasks.loading import describe_device  # noqa: E402
from tasks.offline_tasks import plan_tasks  # noqa: E402
from tasks.quantize import quantize  # noqa: E402
from tasks.recipes import get_recipe  # noqa: E402
from tasks.smoke import smoke  # noqa: E402
from tasks.specs import BenchmarkSpec, SmokeSpec  # noqa: E402

COLUMNS = ["device", "recipe", "quantize s", "GB/s", "of peak", "qsweep req/s", "mlx_lm.evaluate req/s",
           "ratio", "answers identical", "smoke tok/s"]


def say(*parts) -> None:
    print("gpu_check:", *parts, file=sys.stderr, flush=True)


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def timed_quantize(base: Path, recipe: str, root: Path) -> tuple[Path, dict]:
    """The recipe quantized twice, the second run timed: (its model dir, seconds and bytes moved)."""
    for attempt in ("warm-up", "timed"):
        out = root / f"{recipe}-{attempt}"
        out.mkdir(parents=True)
        start = time.perf_counter()
        quantize(base, get_recipe(recipe), out)
        mx.synchronize()
        seconds = time.perf_counter() - start
    shutil.rmtree(root / f"{recipe}-warm-up")
    moved = weight_bytes(base) + weight_bytes(out)
    return out, {"seconds": seconds, "bytes": moved, "gbs": moved / seconds / 1e9}


def chosen(rows) -> dict:
    return {(r["task"], r["doc_id"]): r["chosen"] for r in rows}


def peer_run(model: Path, p, names: dict) -> dict:
    """mlx_lm.evaluate.MLXLM on the stage's questions: a warm-up, then one run timed inside loglikelihood."""
    lm = mlx_lm.evaluate.MLXLM(str(model), use_chat_template=False)

    def evaluate():
        return lm_eval.simple_evaluate(
            model=lm, tasks=p.built, task_manager=p.manager, samples=p.indices, num_fewshot=None,
            apply_chat_template=False, fewshot_as_multiturn=False,
            random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
            log_samples=True, bootstrap_iters=0)

    evaluate()
    log = eval_throughput.record_loglikelihood(lm)
    results = evaluate()
    return {"requests": len(log["scores"]), "loglik_seconds": log["seconds"],
            "chosen": chosen(stage.sample_rows(results["samples"], names))}


def timed_smoke(model: Path, root: Path) -> float:
    params = SmokeSpec().model_dump() | {"backend": "native"}
    for attempt in ("warm-up", "timed"):
        out = root / attempt
        out.mkdir(parents=True)
        rows = smoke(model, params, out)["metrics"]
    return next(r["value"] for r in rows if r["metric"] == "generation_tokens_per_s")


def check(model: Path, recipe: str, params: dict, p, peak_gbs: float, root: Path) -> dict:
    say(f"{recipe}: quantize")
    qdir, q = timed_quantize(model, recipe, root / "quantized")
    say(f"{recipe}: {q['seconds']:.2f} s, {q['bytes'] / 1e6:.1f} MB moved; benchmark stage (warm-up, timed)")
    benchmark_stage.timed_stage(qdir, params, root / "stage-warm-up" / recipe)
    ours = benchmark_stage.timed_stage(qdir, params, root / "stage" / recipe)
    ours_chosen = chosen(json.loads(line) for line in (root / "stage" / recipe / "samples.jsonl").open())
    say(f"{recipe}: mlx_lm.evaluate (warm-up, timed)")
    peer = peer_run(qdir, p, {t["run"]: t["task"] for t in params["plan"]})
    say(f"{recipe}: smoke (warm-up, timed)")
    tps = timed_smoke(qdir, root / "smoke" / recipe)

    ours_rate, peer_rate = ours["requests"] / ours["loglik_seconds"], peer["requests"] / peer["loglik_seconds"]
    questions = ours_chosen.keys() | peer["chosen"].keys()
    differ = sum(ours_chosen.get(k) != peer["chosen"].get(k) for k in questions)
    return {"recipe": recipe, "quantize s": f"{q['seconds']:.3f}", "GB/s": f"{q['gbs']:.2f}",
            "of peak": f"{q['gbs'] / peak_gbs:.2%}", "qsweep req/s": f"{ours_rate:.1f}",
            "mlx_lm.evaluate req/s": f"{peer_rate:.1f}", "ratio": f"{ours_rate / peer_rate:.2f}x",
            "answers identical": f"NO: {differ} of {len(questions)} differ" if differ else f"yes ({len(questions)})",
            "smoke tok/s": f"{tps:.1f}"}


def markdown(rows: list[dict], about: list[str]) -> str:
    lines = [f"- {a}" for a in about] + ["", "| " + " | ".join(COLUMNS) + " |",
                                         "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--model", default="demo://smollm2-135m-instruct", help="a model source, as a sweep names it")
    parser.add_argument("--recipes", default="q4,q8,mxfp4,qx65-hi", help="comma-separated built-in recipes")
    parser.add_argument("--task", default="arc_easy", help="a benchmark task (offline copies where there are)")
    parser.add_argument("--limit", type=int, default=100, help="questions per task")
    parser.add_argument("--peak-gbs", type=float, required=True, help="the device's peak memory bandwidth, GB/s")
    parser.add_argument("--out", type=Path, required=True, help="markdown results")
    args = parser.parse_args()

    device = mx.gpu if args.device == "gpu" else mx.cpu
    if device == mx.gpu and not mx.is_available(mx.gpu):
        sys.exit(f"gpu_check: mlx sees no GPU here ({describe_device()}); --device cpu measures on the CPU")
    mx.set_default_device(device)
    where = describe_device()
    spec = BenchmarkSpec(tasks=[args.task], limit=args.limit, chat_template=False, data="offline")
    params = spec.model_dump(exclude={"data"}) | {"backend": "native", "plan": plan_tasks(spec.tasks, spec.data)}

    about = [f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; device: {where}; peak bandwidth: "
             f"{args.peak_gbs:g} GB/s", f"model: {args.model}; task: {args.task} "
             f"({', '.join(t['data'] for t in params['plan'])}), {args.limit} questions, chat template off, 0-shot",
             "qsweep: tasks/benchmark.benchmark, backend native, batch 16; mlx_lm.evaluate.MLXLM: defaults, "
             "use_chat_template=False; req/s = requests / seconds inside loglikelihood, after a warm-up run",
             "quantize s: tasks/quantize.quantize, second run; GB/s = (base weights read + quantized weights "
             "written) / quantize s (files on disk, through the page cache)",
             "smoke tok/s: mlx-lm's generation tokens/s of tasks/smoke, backend native, second run"]
    start, rows, failed = time.perf_counter(), [], []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        root = Path(tmp)
        say(f"on {where}: {args.model} -> {root / 'base'}")
        download(resolve_source(args.model), root / "base")
        p = stage.prepare(params["plan"], params["limit"], int(params["seed"]), int(params["num_fewshot"]))
        for recipe in args.recipes.split(","):
            try:
                row = check(root / "base", recipe, params, p, args.peak_gbs, root)
            except Exception as e:  # one recipe the device cannot run must not cost the others' rows
                say(f"{recipe}: FAILED")
                traceback.print_exc()
                failed.append(recipe)
                row = {c: "-" for c in COLUMNS} | {"recipe": recipe, "quantize s": f"FAILED: {type(e).__name__}"}
            rows.append({**row, "device": where.split(" (")[0]})
            # written after each recipe: a run cut short by a time limit keeps the rows it finished
            done = f"{len(rows)} of {len(args.recipes.split(','))} recipes in {time.perf_counter() - start:.0f} s"
            args.out.write_text(markdown(rows, about + [f"measured: {done}"]))
    print(args.out.read_text(), end="")
    if failed:
        sys.exit(f"gpu_check: {', '.join(failed)} failed (the tracebacks above)")


if __name__ == "__main__":
    main()
