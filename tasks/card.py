"""card: the model card of one published cell, from the store's artifacts and DuckDB alone.

`gather` collects what a card shows into `CardFacts`: this cell's own numbers from its
stage artifacts, its siblings' (the same model through the other recipes) and the author's
`compare_with` cells from the metric history, the paired comparisons against the base recipe
(computed from the per-question rows, Holm-adjusted across the card's table), and the quality
gates. `render` turns the facts into README.md: Hugging Face front matter with a model-index,
then a banner if a gate failed, the provenance line, the author's notes, the quantization plan,
the accuracy table beside the siblings, the differences from the base, fidelity and speed, and
the mlx-lm usage snippet that publishers write by hand today.

Every number says how it was made (sample, split, data source, backend, device) and carries its
interval. Rendering is a pure function of the facts, so the publish stage keys its card by their
digest: a sibling finishing later changes the facts, hence the card (`qsweep cards`).
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from storage.artifacts import ArtifactRef, Store
from storage.keys import canonical_json
from storage.metrics import MetricStore
from tasks import gates as quality
from tasks.compare import BASE_RECIPE, INTERVAL_METHOD, compare
from tasks.quantize import float_dtype, stored_dtypes
from tasks.tables import human_bytes, markdown_table

# What the hub's model-index says of each benchmark: (dataset id, config, display name, short name).
DATASETS = {
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "ARC-Challenge", "ARC-C"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "ARC-Easy", "ARC-E"),
    "boolq": ("aps/super_glue", "boolq", "BoolQ", "BoolQ"),
    "hellaswag": ("Rowan/hellaswag", None, "HellaSwag", "HellaSwag"),
    "openbookqa": ("allenai/openbookqa", "main", "OpenBookQA", "OBQA"),
    "piqa": ("baber/piqa", None, "PIQA", "PIQA"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "WinoGrande", "Winogrande"),
}
ALPHA = 0.05  # the cards' significance level, after Holm's adjustment
MEASURED = ("download", "quantize", "smoke", "benchmark", "reference", "fidelity")  # the stages a card draws on
FIDELITY_COLUMNS = (("ppl", "ppl", "{:.3f}"), ("ppl_ratio", "ppl ratio", "{:.4f}"), ("kl_mean", "KL mean", "{:.4f}"),
                    ("kl_p99", "KL p99", "{:.3f}"), ("same_top", "same top token", "{:.3f}"))
RUNTIME_COLUMNS = (("generation_tokens_per_s", "tokens/s", "{:.1f}"), ("peak_memory_gb", "peak memory (GB)", "{:.3f}"))
RUNTIME = {c[0] for c in RUNTIME_COLUMNS}


def short_name(task: str) -> str:
    """ARC-C, BoolQ, ... as publishers write them; other tasks by their lm-eval name."""
    return DATASETS[task][3] if task in DATASETS else task


@dataclass
class CardFacts:
    """Everything a card shows; JSON-able, so that its digest can key the card."""

    name: str                  # the published model's name, e.g. SmolLM2-135M-Instruct-qx86-hi-mlx
    repo_id: str | None        # where it is published, if anywhere
    model: str
    recipe: str
    description: str
    base: dict                 # the source: kind, repo/revision or file digest, base_model, license, dtype
    license: str | None
    plan: list[str]            # "which layers at which bits", one line per group of modules
    plan_notes: list[str]      # facts of the plan worth saying, e.g. lm_head tied to the embedding
    warnings: list[str]
    bits_per_weight: float
    disk_bytes: int
    tools: dict                # versions that made the artifacts (mlx, mlx-lm, lm-eval, ...)
    evaluation: dict           # lm-eval version, shots, chat template, backend; per task: data, split, sample
    tasks: list[str]
    table: list[dict]          # per recipe: recipe, bits_per_weight, disk_bytes, acc {task: value}, stderr
    diffs: list[dict]          # per (recipe, task) against the base: diff, low, high, p_value, p_holm, significant
    fidelity: dict             # corpus, tokens, reference (what the base ran as), per recipe its ppl / KL / same-top
    runtime: dict              # how speed was measured (backend, device), per recipe tokens/s and peak memory
    smoke: dict                # prompt, answer, verdict
    gates: list[dict] = field(default_factory=list)   # tasks/gates.py: each gate, measured, passed
    notes: list[str] = field(default_factory=list)    # the author's Markdown, from the sweep file's card.notes
    others: list[dict] = field(default_factory=list)  # card.compare_with: other models' cells on the same questions
    keys: dict = field(default_factory=dict)  # stage -> artifact key of this cell

    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(canonical_json(asdict(self)).encode()).hexdigest()


def published_name(model: str, recipe: str) -> str:
    return f"{model}-{recipe}-mlx"


# --- gathering -----------------------------------------------------------------------------------

def gather(store: Store, params: dict, refs: dict[str, ArtifactRef]) -> CardFacts:
    """The facts of one cell's card. `params` are the publish settings (model, recipe, repo_id,
    license, gates, notes, compare_with...), `refs` this cell's artifacts by stage (download,
    quantize, smoke, benchmark and, when the sweep measured them, reference and fidelity)."""
    model, recipe = params["model"], params["recipe"]["name"]
    manifests = {stage: store.manifest(ref) for stage, ref in refs.items()}
    quantize = manifests["quantize"]
    qm = _metrics(quantize)
    bench = json.loads((store.path(refs["benchmark"]) / "results.json").read_text())
    own_bench = [r for r in manifests["benchmark"]["info"]["metrics"] if r["metric"] == "acc"]
    own_samples = _samples(store, refs["benchmark"], recipe)
    tasks = [r["task"] for r in own_bench]
    about = manifests.get("download", {}).get("info", {}).get("about", {})
    source = params["source"]
    base = {**source, "base_model": about.get("base_model") or (source.get("repo") if source.get("kind") == "hf" else None),
            "dtype": float_dtype(stored_dtypes(store.path(refs["download"])))}  # as written, from the headers

    # Siblings: the same model through other recipes, measured the same way (same data and sample, backend and n).
    same_way = {(r["task"], r.get("data"), r.get("backend"), r.get("n")) for r in own_bench}
    rows = _latest_rows(store, model)
    table = {recipe: {"recipe": recipe, "bits_per_weight": qm[("model", "bits_per_weight")]["value"],
                      "disk_bytes": int(qm[("model", "disk_bytes")]["value"]),
                      "acc": {r["task"]: r["value"] for r in own_bench},
                      "stderr": {r["task"]: r.get("stderr") for r in own_bench}}}
    for (other, stage, task, metric), r in sorted(rows.items()):
        if other == recipe:
            continue
        entry = table.setdefault(other, {"recipe": other, "bits_per_weight": None, "disk_bytes": None, "acc": {}, "stderr": {}})
        if stage == "quantize" and metric in ("bits_per_weight", "disk_bytes"):
            entry[metric] = r["value"] if metric == "bits_per_weight" else int(r["value"])
        elif stage == "benchmark" and metric == "acc" and (task, r["data"], r["backend"], r["n"]) in same_way:
            entry["acc"][task], entry["stderr"][task] = r["value"], r["stderr"]
    table = [t for t in table.values() if t["acc"]]
    table.sort(key=lambda t: (t["recipe"] != BASE_RECIPE, -(t["bits_per_weight"] or 0), t["recipe"]))

    fm = _metrics(manifests["fidelity"]) if "fidelity" in refs else {}
    fidelity = {"corpus": None, "recipes": {}}
    if fm:
        corpus = next(r.get("data") for r in fm.values())
        fidelity.update(corpus=manifests["fidelity"]["params"].get("corpus"),
                        tokens=next((r.get("n") for r in fm.values() if r["metric"] == "kl_mean"), None),
                        reference=reference_label(base, manifests["fidelity"]["params"].get("backend")),
                        base_ppl=fm[("fidelity", "ppl")]["value"] / fm[("fidelity", "ppl_ratio")]["value"])
        fidelity["recipes"][recipe] = {m: r["value"] for (t, m), r in fm.items()}
        for (other, stage, task, metric), r in rows.items():
            if stage == "fidelity" and other != recipe and r["data"] == corpus:
                fidelity["recipes"].setdefault(other, {})[metric] = r["value"]
    shown = {t["recipe"] for t in table}
    fidelity["recipes"] = {r: v for r, v in fidelity["recipes"].items() if r in shown}

    smoke = json.loads((store.path(refs["smoke"]) / "smoke.json").read_text())
    sm = _metrics(manifests["smoke"])
    runtime = {"recipes": {}, "how": {}}
    for (other, stage, task, metric), r in rows.items():
        if stage == "smoke" and metric in RUNTIME and other != recipe and other in shown:
            runtime["recipes"].setdefault(other, {})[metric] = r["value"]
            runtime["how"][other] = _how(r)
    for (task, metric), r in sm.items():
        if metric in RUNTIME:
            runtime["recipes"].setdefault(recipe, {})[metric] = r["value"]
            runtime["how"][recipe] = _how(r)

    run = bench["config"]["params"]
    evaluation = {"lm_eval": bench.get("lm_eval_version"), "num_fewshot": run.get("num_fewshot"),
                  "limit": run.get("limit"), "seed": run.get("seed"),
                  "chat_template": bool(bench["config"].get("apply_chat_template")), "backend": run.get("backend"),
                  "tasks": {r["task"]: _task_facts(bench, r) for r in own_bench}}
    plan_info = quantize["info"]
    return CardFacts(
        name=published_name(model, recipe), repo_id=params.get("repo_id"), model=model, recipe=recipe,
        description=params.get("recipe_description") or "", base=base,
        license=params.get("license") or about.get("license"),
        plan=plan_summary(plan_info.get("plan", []), plan_info.get("dtype") or params["recipe"].get("dtype") or "float"),
        plan_notes=plan_info.get("notes", []), warnings=plan_info.get("warnings", []),
        bits_per_weight=qm[("model", "bits_per_weight")]["value"], disk_bytes=int(qm[("model", "disk_bytes")]["value"]),
        tools=quantize.get("tools", {}), evaluation=evaluation, tasks=tasks, table=table,
        diffs=_diffs(store, model, recipe, own_samples, table), fidelity=fidelity, runtime=runtime,
        smoke={"prompt": smoke.get("prompt"), "answer": smoke.get("text", ""), "verdict": smoke.get("verdict"),
               **{k: smoke[k] for k in ("answer_nll", "base_answer_nll", "language_margin", "base_text")
                  if smoke.get(k) is not None}},
        gates=quality.check(params.get("gates") or {}, smoke.get("verdict"), {m: r["value"] for (_, m), r in fm.items()}),
        notes=list(params.get("notes") or []),
        others=[_other(store, c, own_samples, same_way) for c in params.get("compare_with") or []],
        keys={stage: refs[stage].key for stage in MEASURED if stage in refs},
    )


def _metrics(manifest: dict) -> dict:
    return {(r["task"], r["metric"]): r for r in manifest["info"].get("metrics", [])}


def _samples(store: Store, benchmark: ArtifactRef, label: str) -> list[dict]:
    """A benchmark artifact's per-question outcomes, as tasks.compare reads them."""
    lines = (store.path(benchmark) / "samples.jsonl").read_text().splitlines()
    return [{"recipe": label, "task": r["task"], "doc_id": r["doc_id"], "correct": r["correct"]}
            for r in map(json.loads, lines) if r.get("correct") is not None]


def _latest_rows(store: Store, model: str) -> dict:
    """(recipe, stage, task, metric) -> row, as last measured, for every recipe of `model`."""
    db = MetricStore(store.metrics_db)
    if not db.path.exists():
        return {}
    # every column: a store last written by an older qsweep has no `device` yet (read-only: no schema update)
    cols, rows = db.query("SELECT * FROM latest_metrics WHERE model = ? AND stage IN ('quantize', 'benchmark', "
                          "'fidelity', 'smoke')", [model])
    return {(r["recipe"], r["stage"], r["task"], r["metric"]): r for r in (dict(zip(cols, row)) for row in rows)}


def _diffs(store: Store, model: str, recipe: str, own: list[dict], table: list[dict]) -> list[dict]:
    """Each recipe of the table against the base, on the questions both answered, for the tasks where both
    are in the table; Holm's adjustment runs over exactly these comparisons, as the card shows them."""
    shown = {t["recipe"]: set(t["acc"]) for t in table}
    if BASE_RECIPE not in shown or len(shown) < 2:
        return []
    db = MetricStore(store.metrics_db)
    others = [s for s in (db.latest_samples(model) if db.path.exists() else []) if s["recipe"] != recipe]
    samples = [s for s in own + others
               if s["recipe"] in shown and s["task"] in shown[s["recipe"]] and s["task"] in shown[BASE_RECIPE]]
    return [asdict(c) for c in compare(samples, BASE_RECIPE, alpha=ALPHA)]


def _other(store: Store, cell: dict, own: list[dict], same_way: set) -> dict:
    """A compare_with cell: its accuracies where measured the same way, and this cell's paired difference."""
    db = MetricStore(store.metrics_db)
    label = f"{cell['model']}/{cell['recipe']}"
    _, rows = db.query("SELECT task, value, data, backend, n FROM latest_metrics WHERE model = ? AND recipe = ? "
                       "AND stage = 'benchmark' AND metric = 'acc'", [cell["model"], cell["recipe"]])
    acc = {task: v for task, v, data, backend, n in rows if (task, data, backend, n) in same_way}
    theirs = [{**s, "recipe": label} for s in db.latest_samples(cell["model"])
              if s["recipe"] == cell["recipe"] and s["task"] in acc]
    mine = [s for s in own if s["task"] in acc]
    diffs = {c.task: asdict(c) for c in compare(theirs + mine, label, alpha=ALPHA)} if theirs and mine else {}
    return {"model": cell["model"], "recipe": cell["recipe"], "acc": acc, "diffs": diffs}


def reference_label(base: dict, backend: str | None) -> str:
    """What the fidelity reference is: the base model's own weights, as the reference stage ran them."""
    stored = (f"the GGUF's {base['quantization']} weights, dequantized" if base.get("kind") == "gguf" and base.get("quantization")
              else f"{base.get('dtype') or 'its'} weights as stored")
    return (f"the base model ({stored}) run in float32" if backend == "fp32"
            else f"the base model ({stored}) run with mlx's native kernels")


def _how(row: dict) -> str:
    """How a speed row was measured: which weights, on which device."""
    weights = {"native": "mlx's native quantized kernels", "fp32": "the weights dequantized to float32"}
    how = weights.get(row.get("backend"), row.get("backend") or "")
    return how + (f" on {row['device']}" if row.get("device") else "")


def _task_facts(bench: dict, row: dict) -> dict:
    """What a benchmark row was measured on: its data source, the split lm-eval scored, and the sample."""
    plan = {t["task"]: t for t in bench["config"]["params"].get("plan") or []}
    run = plan.get(row["task"], {}).get("run", row["task"])
    config = bench.get("configs", {}).get(run, {})
    sample = (bench["config"].get("sample") or {}).get(run) or {}  # with a limit: the split's size, seed, doc ids
    return {"data": plan.get(row["task"], {}).get("data"), "split": config.get("test_split") or config.get("validation_split"),
            "n": row.get("n"), "of": sample.get("n_docs"), "seed": sample.get("seed"),
            "sampled": len(sample.get("doc_ids", [])) < sample.get("n_docs", 0)}


def plan_summary(rows: list[dict], dtype: str) -> list[str]:
    """Which layers got which bits: modules with the same setting over the same layers share a line."""
    def what(r):
        return (r.get("mode") or dtype) if r.get("bits") is None else f"{r['bits']}-bit {r['mode']}, group size {r['group_size']}"

    by_module: dict[tuple, list] = {}
    for r in rows:
        name = r["path"] if r.get("layer") is None else r["path"].split(f".{r['layer']}.", 1)[-1]
        by_module.setdefault((name, what(r)), []).append(r["layer"])
    grouped: dict[tuple, list[str]] = {}
    for (name, setting), layers in by_module.items():
        grouped.setdefault((_ranges(layers), setting), []).append(name)
    lines = []
    for (layers, setting), names in sorted(grouped.items(), key=lambda kv: (kv[0][0] != "", kv[1])):
        where = ", ".join(f"`{n}`" for n in sorted(names)) + (f" in layers {layers}" if layers else "")
        lines.append(f"{where}: {setting}")
    return lines


def _ranges(layers: list) -> str:
    found = sorted(i for i in layers if i is not None)
    if not found:
        return ""
    parts, start = [], found[0]
    for a, b in zip(found, found[1:] + [None]):
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(parts)


# --- rendering -----------------------------------------------------------------------------------

def front_matter(f: CardFacts):
    """The card's metadata through huggingface_hub's own ModelCardData, model-index included. The hub shows
    a model-index entry as the dataset's score, so a sample says so in the name the hub shows."""
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    for task in f.tasks:
        acc = next(t["acc"][task] for t in f.table if t["recipe"] == f.recipe)
        dataset, config, pretty, _ = DATASETS.get(task, (task, None, task, task))
        t = f.evaluation["tasks"][task]
        if _is_sample(t):
            pretty = f"{pretty} ({t['n']}-question random sample of {t['split'] or 'the split'}, seed {t['seed']})"
        results.append(EvalResult(
            task_type="text-generation", task_name="Text Generation", dataset_type=dataset, dataset_name=pretty,
            dataset_config=config, dataset_split=t["split"], dataset_args={"data": t["data"]} if t["data"] else None,
            metric_type="acc", metric_name="accuracy", metric_value=round(float(acc), 4),
            metric_args={"num_fewshot": f.evaluation["num_fewshot"], "questions": t["n"]}))
    tags = ["mlx", "qsweep", "quantized" if f.recipe != "bf16" else "bf16", f.recipe]
    base = f.base.get("base_model")
    return ModelCardData(
        library_name="mlx", pipeline_tag="text-generation", license=f.license, tags=tags,
        base_model=base, base_model_relation="quantized" if base else None,
        model_name=f.name, eval_results=results or None)


def _is_sample(t: dict) -> bool:
    return bool(t.get("sampled")) and t.get("of") is not None and t["n"] < t["of"]


def _fmt(value, spec="{:.3f}") -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if abs(value) >= 1e4 else spec.format(value)  # a broken recipe's ppl of 8e7


def _label(f: CardFacts, recipe: str) -> str:
    return f"**{recipe} (this model)**" if recipe == f.recipe else recipe


def _relative(acc, base) -> str:
    """Relative change from the base, as publishers write it: +3.1%."""
    return "" if acc is None or not base else f" ({round(100 * (acc - base) / base, 1) + 0.0:+.1f}%)"  # + 0.0: no -0.0%


def _provenance(f: CardFacts) -> str:
    b, note = f.base, ""
    if b.get("kind") == "hf":
        where = f"[{b['repo']}](https://huggingface.co/{b['repo']}) at revision `{b['revision']}`"
    elif b.get("kind") == "gguf":
        where = (f"[{b['base_model']}](https://huggingface.co/{b['base_model']})" if b.get("base_model") else f"`{f.model}`")
        note = (f" The base was a GGUF file at **{b['quantization']}** (sha256 `{b['content'][:12]}`) whose weights were "
                "dequantized first, so every variant, bf16 included, carries that rounding.")
    elif b.get("kind") == "demo":
        where = f"`{f.model}`, qsweep's embedded random-init demo model (seed {b.get('seed')})"
    else:
        where = f"`{f.model}` (a local model, content digest `{b.get('content', '')[:12]}`)"
    return (f"This model was converted to MLX format from {where} using mlx-lm version {f.tools.get('mlx-lm')}, "
            f"with the qsweep recipe **{f.recipe}**" + (f": {f.description}." if f.description else ".") + note)


def _banner(f: CardFacts) -> list[str]:
    failed = quality.failed(f.gates)
    if not failed:
        return []
    return ["> **This variant failed qsweep's quality gates.** qsweep holds back a variant that fails a gate unless "
            "its author lets it out; this card records what was measured.", ">",
            *[f"> - {g['what']}: **{g['measured']}** (required: {g['requirement']})" for g in failed], ""]


def _benchmark_how(f: CardFacts) -> list[str]:
    ev, tasks = f.evaluation, f.evaluation["tasks"]
    sampled = [t for t in tasks.values() if _is_sample(t)]
    if sampled and len({t["n"] for t in sampled}) == 1 and len(sampled) == len(tasks):
        which = f"{sampled[0]['n']} random questions of each task (seed {ev['seed']})"
    elif sampled:
        which = f"a random sample of each task (seed {ev['seed']}; sizes below)"
    else:
        which = "every question of each task"
    backend = ("scored through the quantized weights dequantized to float32 (the same values, at dense speed)"
               if ev["backend"] == "fp32" else "scored with mlx's native quantized kernels")
    lines = [f"Accuracy (lm-eval {ev['lm_eval']} `acc`, {ev['num_fewshot']}-shot, chat template "
             f"{'on' if ev['chat_template'] else 'off'}) on {which}, {backend}; this variant beside the other "
             f"recipes of {f.model} measured on the same questions. Data:", ""]
    for task in f.tasks:
        t = tasks[task]
        size = f"{t['n']} of {t['of']} questions" if t.get("of") else f"{t['n']} questions"
        lines.append(f"- {short_name(task)}: {t['data'] or 'as lm-eval defines it'}; split `{t['split']}`, {size}")
    return lines + [""]


def render(f: CardFacts) -> str:
    from huggingface_hub import ModelCard

    lines = [f"# {f.name}", "", *_banner(f), _provenance(f), ""]
    lines += [*(note.strip() + "\n" for note in f.notes)]
    lines += ["## Quantization", "", *markdown_table(["", ""], [
        ["bits per weight", f"{f.bits_per_weight:.3f}"], ["size on disk", human_bytes(f.disk_bytes)],
        ["recipe", f"`{f.recipe}`"]]), "", "Which layers got which bits:", ""]
    lines += [f"- {line}" for line in f.plan] + [""]
    lines += [f"Note: {n}" for n in f.plan_notes] + ([""] if f.plan_notes else [])
    lines += [f"Warning: {w}" for w in f.warnings] + ([""] if f.warnings else [])

    lines += ["## Benchmarks", "", *_benchmark_how(f)]
    base = next((t["acc"] for t in f.table if t["recipe"] == BASE_RECIPE), {})
    header = ["recipe", "bits/weight", "size", *map(short_name, f.tasks), "mean"]
    rows = []
    for t in f.table:
        accs = [t["acc"].get(task) for task in f.tasks]
        mean = sum(accs) / len(accs) if accs and None not in accs else None
        base_mean = sum(base[k] for k in f.tasks) / len(f.tasks) if base and all(k in base for k in f.tasks) else None
        rel = t["recipe"] != BASE_RECIPE
        rows.append([_label(f, t["recipe"]), _fmt(t["bits_per_weight"], "{:.2f}"), human_bytes(t["disk_bytes"]),
                     *[_fmt(a) + (_relative(a, base.get(k)) if rel else "") for a, k in zip(accs, f.tasks)],
                     _fmt(mean) + (_relative(mean, base_mean) if rel else "")])
    lines += markdown_table(header, rows) + [""]
    if base and len(f.table) > 1:
        lines += [f"In parentheses: the relative change from {BASE_RECIPE}.", ""]
    stderr = next(t["stderr"] for t in f.table if t["recipe"] == f.recipe)
    if any(v is not None for v in stderr.values()):
        lines += ["Standard error of this variant's accuracy: "
                  + ", ".join(f"{short_name(task)} ±{stderr[task]:.3f}" for task in f.tasks if stderr.get(task) is not None)
                  + ". With this many questions, differences smaller than about twice that are noise.", ""]
    if f.diffs:
        lines += _diff_table(f)
    if any(o["acc"] for o in f.others):
        lines += _others_table(f)
    lines += _fidelity_table(f)

    answer = " ".join(f.smoke["answer"].split())
    lines += ["## Smoke test", "", f"Prompt: {f.smoke['prompt']}", "",
              f"Answer ({f.smoke['verdict']}, greedy): {answer[:400]}", ""]
    if f.smoke["verdict"] == "repetitive_as_base":
        lines += ["It loops, and so does the base model's own greedy answer to the same prompt, so the loop is the "
                  f"model's, not the quantization's: {' '.join(f.smoke.get('base_text', '').split())[:400]}", ""]
    if "answer_nll" in f.smoke and "language_margin" in f.smoke:
        lines += [f"The base model finds this answer {f.smoke['answer_nll']:.2f} nats per token unlikely, and its "
                  f"own answer {f.smoke['base_answer_nll']:.2f} (more than {f.smoke['language_margin']:g} above is "
                  "judged not language).", ""]
    lines += ["## Use with mlx", "", "```bash", "pip install mlx-lm", "```", "", "```python",
              "from mlx_lm import load, generate", "",
              f'model, tokenizer = load("{f.repo_id or f.name}")', "",
              'prompt = "hello"', "",
              "if tokenizer.chat_template is not None:",
              '    messages = [{"role": "user", "content": prompt}]',
              "    prompt = tokenizer.apply_chat_template(",
              "        messages, add_generation_prompt=True",
              "    )", "",
              "response = generate(model, tokenizer, prompt=prompt, verbose=True)", "```", ""]
    lines += ["## How it was made", "",
              "Made with qsweep from content-hashed artifacts: the same inputs give the same keys.", "",
              *markdown_table(["", ""], [[k, f"`{v}`"] for k, v in f.tools.items() if v]
                      + [[f"{stage} artifact", f"`{key[:16]}`"] for stage, key in f.keys.items()]), ""]
    # Parsing it back through huggingface_hub refuses metadata the hub would not read.
    return str(ModelCard(f"---\n{front_matter(f).to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n"))


def _interval(d: dict) -> str:
    return f"{d['diff']:+.3f}{'*' if d['significant'] else ''} ({d['low']:+.3f}, {d['high']:+.3f})"


def _diff_table(f: CardFacts) -> list[str]:
    by = {(d["recipe"], d["task"]): d for d in f.diffs}
    marked = sum(1 for d in f.diffs if d["significant"])
    rows = []
    for t in f.table:
        r = t["recipe"]
        if r != BASE_RECIPE and any((r, task) in by for task in f.tasks):
            rows.append([_label(f, r), *["" if (r, task) not in by else _interval(by[r, task]) for task in f.tasks]])
    return [f"Difference from {BASE_RECIPE} ({_bf16_is(f)}) on the same questions, with its 95% paired interval "
            f"({INTERVAL_METHOD}); an interval that holds 0 means these questions cannot tell the two apart. `*` marks "
            f"McNemar's exact p < {ALPHA:g} after Holm's adjustment across the {len(f.diffs)} differences in this table: "
            f"{marked} marked.", "",
            *markdown_table(["recipe", *map(short_name, f.tasks)], rows), ""]


def _bf16_is(f: CardFacts) -> str:
    dtype = f.base.get("dtype")
    return ("the base's own bfloat16 weights" if dtype == "bfloat16" else
            f"the base's {dtype} weights cast to bfloat16" if dtype else "the base's weights in bfloat16")


def _others_table(f: CardFacts) -> list[str]:
    """The author's compare_with cells: other models on the same questions, this model's paired difference."""
    others = [o for o in f.others if o["acc"]]
    mine = next(t["acc"] for t in f.table if t["recipe"] == f.recipe)
    header = ["task", _label(f, f.recipe)] + [f"{o['model']} {o['recipe']}" for o in others]
    rows = [[short_name(task), _fmt(mine.get(task)),
             *[_fmt(o["acc"].get(task)) + (f" (this model {_interval(o['diffs'][task])})" if task in o["diffs"] else "")
               for o in others]]
            for task in f.tasks if any(task in o["acc"] for o in others)]
    return ["Beside other models, on the same questions: their accuracy, and in parentheses this model's difference "
            f"from theirs with its 95% paired interval ({INTERVAL_METHOD}); `*`: Holm-adjusted McNemar p < {ALPHA:g} "
            "across that model's tasks.", "", *markdown_table(header, rows), ""]


def _fidelity_table(f: CardFacts) -> list[str]:
    fid, run = f.fidelity["recipes"], f.runtime["recipes"]
    order = [t["recipe"] for t in f.table if t["recipe"] in fid or t["recipe"] in run]
    if not order:
        return []
    cols = [c for c in FIDELITY_COLUMNS if any(c[0] in v for v in fid.values())]
    speed = [c for c in RUNTIME_COLUMNS if any(c[0] in v for v in run.values())]
    hows = sorted({h for r, h in f.runtime["how"].items() if r in order and h})
    lines = ["## Fidelity and speed", ""]
    if f.fidelity.get("corpus"):
        lines += [f"Perplexity and KL divergence of each variant's next-token distribution from the reference, "
                  f"{f.fidelity['reference']}, on {f.fidelity['corpus']}"
                  + (f" ({f.fidelity['tokens']} scored tokens)" if f.fidelity.get("tokens") else "")
                  + f"; lower is closer. The reference's own perplexity there is {_fmt(f.fidelity['base_ppl'])}."
                  + (f" `{BASE_RECIPE}` is {_bf16_is(f)}." if BASE_RECIPE in order else ""), ""]
    how = hows[0] if len(hows) == 1 else None
    lines += ["Tokens/s and peak memory: the smoke test's greedy generation"
              + (f" ({how})" if how else ", measured as the last column says")
              + ", one model at a time, on the machine that ran the sweep."
              + (" Dequantized, the weights take 4 bytes each: peak memory counts those, not the quantized weights "
                 "(their size is the size on disk above), and tokens/s is not what mlx's quantized kernels give."
                 if any("float32" in h for h in hows) else ""), ""]
    header = ["recipe", *[c[1] for c in cols], *[c[1] for c in speed]] + ([] if how or not hows else ["measured with"])
    rows = [[_label(f, r), *[_fmt(fid.get(r, {}).get(c[0]), c[2]) for c in cols],
             *[_fmt(run.get(r, {}).get(c[0]), c[2]) for c in speed]]
            + ([] if how or not hows else [f.runtime["how"].get(r, "")]) for r in order]
    if f.fidelity.get("corpus"):  # the row every other is measured against, named for what it is
        reference = {"ppl": f.fidelity["base_ppl"], "ppl_ratio": 1.0}
        rows.insert(0, [f"reference: {f.fidelity['reference']}", *[_fmt(reference.get(c[0]), c[2]) for c in cols],
                        *["" for _ in speed]] + ([] if how or not hows else [""]))
    return lines + markdown_table(header, rows) + [""]


def write(facts: CardFacts, out: Path) -> dict:
    """README.md and the facts it was rendered from (card.json, for tools); the gates go to the manifest."""
    (out / "README.md").write_text(render(facts))
    (out / "card.json").write_text(json.dumps(asdict(facts), indent=2, sort_keys=True) + "\n")
    return {"gates": facts.gates}
