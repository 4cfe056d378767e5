"""Benchmark stage: run lm-eval tasks on an MLX model directory.

This module is the stage: which documents each task evaluates (a seeded sample, drawn the same
for every recipe), lm-eval's simple_evaluate, and what is kept (results.json, one samples.jsonl
row per question, metric rows). What does not depend on the weights (lm-eval's tasks, the samples,
the tokens) is built once per process for every recipe of a model (Prepared). The model side is
elsewhere: tasks/lm_adapter.py (lm-eval's LM), tasks/scoring.py (packed, batched scoring),
tasks/checkpoint.py (resume after a kill), and tasks/loading.py. Importing it imports neither mlx
nor lm-eval: the sweep reads LOCAL_TASKS and task_manager_for while it validates a sweep file.
"""

import contextlib
import functools
import hashlib
import json
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np

from tasks import compat

CODE_VERSION = "8"  # 5: per-question samples.jsonl; 6: scored in checkpointed chunks (resume);
# 7: `limit` evaluates a seeded random sample of each task's documents, not the first ones;
# 8: log-probs normalized in numpy (cpu.logsumexp_now: closer to float64); sliding-window models packed
LOCAL_TASKS = Path(__file__).parent / "data" / "lm_eval"

# Mean metrics (acc, acc_norm) get a closed-form stderr; this only drives the
# bootstrapped ones (perplexity, f1, ...), whose resampling is seeded by lm-eval.
BOOTSTRAP_ITERS = 1000
# Top-level fields of lm-eval's results that change with the clock, machine or
# checkout, not with the inputs.
VOLATILE_KEYS = {"date", "start_time", "end_time", "total_evaluation_time_seconds",
                 "git_hash", "upper_git_hash", "pretty_env_info"}
# What a model's tokenizer is read from: two recipes of one base share these files byte for byte.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")
# Prepared tasks kept per process: a sweep benchmarks one model's recipes one after another.
PREPARED_KEEP = 2


@functools.cache
def _task_manager(include_defaults: bool):
    # Indexing lm-eval's ~10k built-in task YAMLs takes seconds; skip it when the
    # local tasks suffice, and build each kind once per process.
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(LOCAL_TASKS), include_defaults=include_defaults)


def local_task_names() -> set[str]:
    """The task names qsweep's own YAMLs declare, read without importing lm-eval (~0.9 s, for datasets):
    a sweep of qsweep's tasks is checked before it starts without that cost. tests/test_benchmark.py
    checks it against lm-eval's own index of the same folder."""
    import re

    return {m.group(1) for f in LOCAL_TASKS.rglob("*.yaml")
            for m in re.finditer(r"^task:\s*['\"]?([\w.-]+)", f.read_text(), re.MULTILINE)}


def task_manager_for(tasks: list[str]):
    local = _task_manager(False)
    return local if all(t in local.all_tasks for t in tasks) else _task_manager(True)


@dataclass
class Prepared:
    """What a benchmark builds before any model scores, shared by every recipe of a model in a process.

    The lm-eval tasks (built, their documents processed once), the sample drawn from each, and the
    tokens of every string tok_encode has seen. On the demo (7 tasks, hellaswag's 10,042 documents
    mapped three times a build) this is seconds a cell (bench/benchmark_stage.py). Used by one
    benchmark at a time (`lock`): lm-eval keeps a run's requests on the task objects.
    """
    manager: object
    built: list  # lm-eval Tasks and Groups, as simple_evaluate takes them
    drawn: dict  # lm-eval task -> its sample, recorded in results.json
    notes: dict  # lm-eval task or group -> how its documents were chosen
    indices: dict | None  # lm-eval task -> the doc ids to evaluate; None without a limit
    encoded: dict = field(default_factory=dict)  # tok_encode's memo (tasks/lm_adapter.py)
    lock: threading.Lock = field(default_factory=threading.Lock)


_prepared: OrderedDict = OrderedDict()
_prepared_lock = threading.Lock()
prepared_stats = Counter()  # "built" (a miss), "reused" (a hit), "private" (the entry was busy)


def clear_prepared() -> None:
    with _prepared_lock:
        _prepared.clear()
        prepared_stats.clear()


def tokenizer_digest(model_dir: Path) -> str:
    """sha256 over the tokenizer files' names and contents: a base's recipes share it, another base does not."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            h.update(f"{name}\0{path.stat().st_size}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def prepare(plan: list[dict], limit: int | None, seed: int, num_fewshot: int) -> Prepared:
    """The plan's lm-eval tasks, built, few-shot count set, a seeded sample of each drawn."""
    tasks = [t["run"] for t in plan]
    manager = task_manager_for(tasks)
    # Built once and handed to lm-eval built (building maps every document: hellaswag's 10,042).
    # A group stays a group; with a limit each of its tasks is sampled on its own.
    built, leaves, groups = [], {}, {}  # leaves: lm-eval task -> (Task, the name its sample is drawn for)
    for t in plan:
        loaded = manager.load(t["run"])
        group = loaded["groups"].get(t["run"])
        built += [group] if group is not None else list(loaded["tasks"].values())
        groups.update(loaded["groups"])
        for obj in loaded["tasks"].values():
            compat.pin_eval_docs(obj)  # its documents processed once, not on every read
            # As simple_evaluate(num_fewshot=n) sets it (a task whose YAML says 0 keeps 0), but
            # without its warning for every task; simple_evaluate is then given None.
            if obj.get_config("num_fewshot") != 0:
                obj.set_config(key="num_fewshot", value=num_fewshot)
        # Drawn for the requested name: the offline copy and the hub task pick the same documents.
        leaves.update({name: (obj, t["task"] if name == t["run"] else name) for name, obj in loaded["tasks"].items()})
    drawn = {}
    if limit is not None:
        for name, (obj, drawn_for) in leaves.items():
            n = len(obj.eval_docs)
            drawn[name] = {"task": drawn_for, "n_docs": n, "seed": seed,
                           "doc_ids": draw_docs(seed, drawn_for, n, min(int(limit), n))}
    notes = {name: sample_note([d]) for name, d in drawn.items()}
    if drawn:
        notes.update({name: sample_note([drawn[t.task_name] for t in g.get_all_tasks()]) for name, g in groups.items()})
    # lm-eval takes either a limit (the first documents) or the indices to evaluate; a task whose
    # whole split was drawn is left out of `samples` and runs whole.
    indices = None if limit is None else {
        name: d["doc_ids"] for name, d in drawn.items() if len(d["doc_ids"]) < d["n_docs"]}
    return Prepared(manager, built, drawn, notes, indices)


@contextlib.contextmanager
def prepared(key: tuple, build):
    """The Prepared for key, built by build() on a miss; held (its lock) while the caller evaluates.

    Kept for the last PREPARED_KEEP keys. A sweep's cells are threads of one process: when another
    is evaluating with the entry, this one builds a private copy rather than wait for it.
    """
    with _prepared_lock:
        entry = _prepared.get(key)
        if entry is not None:
            _prepared.move_to_end(key)
    if entry is not None and entry.lock.acquire(blocking=False):
        outcome = "reused"
    else:
        outcome, entry = "built" if entry is None else "private", build()
        entry.lock.acquire()
    with _prepared_lock:
        prepared_stats[outcome] += 1
        if outcome == "built":
            _prepared.setdefault(key, entry)  # another thread's, if it got there first
            while len(_prepared) > PREPARED_KEEP:
                _prepared.popitem(last=False)
    try:
        yield entry
    finally:
        entry.lock.release()


def benchmark(model_dir: Path, params: dict, out: Path, checkpoint: Path | None = None) -> list[dict]:
    """Run lm-eval on the model in model_dir; write out/results.json and samples.jsonl; return metric rows.

    params: BenchmarkSpec's fields (tasks/specs.py) with the backend resolved (native or fp32) and the
    sweep's task plan (tasks/offline_tasks.plan_tasks), all given: nothing is filled in here.
    """
    import lm_eval

    from tasks.lm_adapter import MLXLM

    # The plan says which lm-eval task runs for each requested name (an offline copy or the
    # official task) and where its data came from; rows carry the requested name and that source.
    plan = params["plan"]
    seed, chat, limit, shots = (int(params["seed"]), bool(params["chat_template"]), params["limit"],
                                int(params["num_fewshot"]))
    lm = MLXLM(Path(model_dir), batch_size=int(params["batch_size"]), backend=params["backend"], checkpoint=checkpoint)
    if chat and not lm.tokenizer.has_chat_template:
        raise ValueError(f"chat_template=True but the tokenizer in {model_dir} has no chat template")
    # Everything the tasks, samples and tokens depend on; the weights are not among them.
    key = (tokenizer_digest(model_dir), lm.prefix_token_id, json.dumps(plan, sort_keys=True), limit, seed, shots, chat)
    with prepared(key, lambda: prepare(plan, limit, seed, shots)) as p:
        lm.encoded = p.encoded
        results = lm_eval.simple_evaluate(
            model=lm, tasks=p.built, task_manager=p.manager,
            samples=p.indices, num_fewshot=None,
            apply_chat_template=chat, fewshot_as_multiturn=chat,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS)
    drawn, notes = p.drawn, p.notes
    named = {t["run"]: t for t in plan}
    samples = sample_rows(results.pop("samples", {}), {run: t["task"] for run, t in named.items()})

    quantization = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization")
    results["config"].update({
        "model": "MLXLM", "code_version": CODE_VERSION, "params": params, "batch_size": lm.batch_size,
        "apply_chat_template": chat,
        "chat_template": lm.chat_template(True) if chat else None,
        "quantization": quantization,
        # With a limit: per lm-eval task, the split's size, the seed and the doc ids evaluated.
        **({"sample": drawn} if drawn else {}),
        "library_versions": {name: version(name) for name in ("mlx", "mlx-lm", "lm_eval", "transformers")},
    })
    for config in results.get("configs", {}).values():
        meta = config.get("metadata") or {}
        if "config_source" in meta:  # a copy: the dict may be the (reused) task's own
            config["metadata"] = {**meta, "config_source": _portable_path(meta["config_source"])}
    results = {k: v for k, v in results.items() if k not in VOLATILE_KEYS}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=_json_default) + "\n")
    (out / "samples.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in samples))
    return [{**row, "task": named.get(row["task"], row)["task"],
             "data": _join(named.get(row["task"], {}).get("data"), notes.get(row["task"])),
             "backend": lm.weights} for row in metric_rows(results)]


def draw_docs(seed: int, name: str, n: int, k: int) -> list[int]:
    """k of a split's n document indices: a uniform random sample without replacement, sorted.

    Each index i is ranked by sha256(f"{seed}:{name}:{i}") and the k lowest are taken. Written out
    rather than left to a numpy generator, whose methods may change between versions: the same
    (seed, task name, n) gives the same documents anywhere, so every recipe answers the same questions.
    """
    return sorted(sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{name}:{i}".encode()).digest())[:k])


def sample_note(parts: list[dict]) -> str | None:
    """How a row's documents were chosen (parts: the drawn samples under it); None when all were evaluated."""
    k, n = sum(len(d["doc_ids"]) for d in parts), sum(d["n_docs"] for d in parts)
    if k == n:
        return None
    tasks = f" in {len(parts)} tasks" if len(parts) > 1 else ""
    return f"{k} random documents of {n}{tasks} (seed {parts[0]['seed']})"


def _join(data: str | None, note: str | None) -> str | None:
    return f"{data}; {note}" if data and note else note or data


def sample_rows(samples: dict, names: dict) -> list[dict]:
    """One row per question: lm-eval's logged sample reduced to what comparisons need.

    names maps the lm-eval task that ran to the name the sweep asked for. Multiple-choice
    rows keep every choice's log-likelihood; `chosen` is the argmax, as acc scores it.
    """
    rows = []
    for run, task_samples in sorted(samples.items()):
        for sample in sorted(task_samples, key=lambda x: x["doc_id"]):
            logliks = [float(r[0]) for r in sample.get("filtered_resps", []) if isinstance(r, (list, tuple))]
            target = sample.get("target")
            rows.append({
                "task": names.get(run, run), "doc_id": int(sample["doc_id"]),
                "target": target if isinstance(target, int) else None,
                "chosen": int(np.argmax(logliks)) if logliks else None,
                "correct": bool(sample["acc"]) if "acc" in sample else None,
                "correct_norm": bool(sample["acc_norm"]) if "acc_norm" in sample else None,
                "logliks": logliks,
            })
    return rows


def metric_rows(results: dict) -> list[dict]:
    """One row per (task, metric) for each numeric metric; lm-eval keys them 'metric,filter'."""
    samples, subtasks = results.get("n-samples", {}), results.get("group_subtasks", {})

    def size(task: str) -> int:  # a group's size is that of its (nested) subtasks
        if task in samples:
            return samples[task]["effective"]
        return sum(size(t) for t in subtasks.get(task, []))

    rows = []
    for task, metrics in results["results"].items():
        n = size(task)
        for key, value in metrics.items():
            name, sep, flt = key.partition(",")
            if not sep or "_stderr" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{name}_stderr,{flt}")
            rows.append({
                "task": task,
                "metric": name if flt == "none" else key,
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "n": int(n),
            })
    return sorted(rows, key=lambda r: (r["task"], r["metric"]))


def _portable_path(path: str) -> str:
    """A task YAML's path relative to its task root, so results.json does not depend on the checkout."""
    import lm_eval.tasks

    for prefix, root in (("qsweep", LOCAL_TASKS), ("lm_eval", Path(lm_eval.tasks.__file__).parent)):
        try:
            return f"{prefix}:{Path(path).resolve().relative_to(root.resolve()).as_posix()}"
        except ValueError:
            continue
    return path


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if callable(obj):  # a task's process_docs and the like: its name, not its address
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    raise TypeError(f"{type(obj).__name__} in lm-eval results is not JSON-serialisable")


def build(job) -> dict:
    """The benchmark stage (tasks/registry.py); its checkpoint is job.scratch, which outlives a crash
    (the artifact's temporary folder does not) and goes once the artifact is whole."""
    return {"metrics": benchmark(job.inputs[0], job.params, job.out, job.scratch)}
