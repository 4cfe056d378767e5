"""card: the model card of one published cell, from the store's artifacts and DuckDB alone.

`gather` collects what a card shows into `CardFacts`: this cell's own numbers from its
stage artifacts, its siblings' (the same model through the other recipes) from the metric
history, and the paired comparisons against the base recipe. `render` turns the facts into
README.md: Hugging Face front matter with a model-index, then the provenance line, the
quantization plan, the accuracy table beside the siblings, the differences from the base,
fidelity and speed, and the mlx-lm usage snippet that publishers write by hand today.

Rendering is a pure function of the facts, so the publish stage keys its card by their
digest: a sibling finishing later changes the facts, hence the card (`qsweep cards`).
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from storage.artifacts import ArtifactRef, Store
from storage.keys import canonical_json
from storage.metrics import MetricStore
from tasks.compare import BASE_RECIPE
from tasks.offline_tasks import OFFLINE

# What the hub's model-index says of each benchmark: (dataset id, config, split, display name).
DATASETS = {
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", "ARC-Challenge"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", "ARC-Easy"),
    "boolq": ("aps/super_glue", "boolq", "validation", "BoolQ"),
    "hellaswag": ("Rowan/hellaswag", None, "validation", "HellaSwag"),
    "openbookqa": ("allenai/openbookqa", "main", "test", "OpenBookQA"),
    "piqa": ("baber/piqa", None, "validation", "PIQA"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", "WinoGrande"),
}
assert set(DATASETS) == set(OFFLINE), "every benchmark qsweep knows offline has a model-index entry"
MEASURED = ("download", "quantize", "smoke", "benchmark", "reference", "fidelity")  # the stages a card draws on
FIDELITY_COLUMNS = (("ppl", "ppl", "{:.3f}"), ("ppl_ratio", "ppl ratio", "{:.4f}"), ("kl_mean", "KL mean", "{:.4f}"),
                    ("kl_p99", "KL p99", "{:.3f}"), ("same_top", "same top token", "{:.3f}"))
RUNTIME_COLUMNS = (("generation_tokens_per_s", "tokens/s", "{:.1f}"), ("peak_memory_gb", "peak memory (GB)", "{:.3f}"))


@dataclass
class CardFacts:
    """Everything a card shows; JSON-able, so that its digest can key the card."""

    name: str                  # the published model's name, e.g. SmolLM2-135M-Instruct-qx86-hi-mlx
    repo_id: str | None        # where it is published, if anywhere
    model: str
    recipe: str
    description: str
    base: dict                 # the source: kind, repo/revision or file digest, base_model, license
    license: str | None
    plan: list[str]            # "which layers at which bits", one line per group of modules
    warnings: list[str]
    bits_per_weight: float
    disk_bytes: int
    tools: dict                # versions that made the artifacts (mlx, mlx-lm, lm-eval, ...)
    evaluation: dict           # lm-eval version, shots, limit, chat template, backend, data per task
    tasks: list[str]
    table: list[dict]          # per recipe: recipe, bits_per_weight, disk_bytes, acc {task: value}, stderr
    diffs: list[dict]          # per (recipe, task) against the base: diff, low, high, p_value, significant
    fidelity: dict             # corpus, tokens, and per recipe its ppl / KL / same-top / tokens/s / memory
    smoke: dict                # prompt, answer, verdict
    keys: dict = field(default_factory=dict)  # stage -> artifact key of this cell

    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(canonical_json(asdict(self)).encode()).hexdigest()


def published_name(model: str, recipe: str) -> str:
    return f"{model}-{recipe}-mlx"


# --- gathering -----------------------------------------------------------------------------------

def _metrics(manifest: dict) -> dict:
    return {(r["task"], r["metric"]): r for r in manifest["info"].get("metrics", [])}


def gather(store: Store, params: dict, refs: dict[str, ArtifactRef]) -> CardFacts:
    """The facts of one cell's card. `params` are the publish settings (model, recipe, repo_id,
    license...), `refs` this cell's artifacts by stage (download, quantize, smoke, benchmark and,
    when the sweep measured them, fidelity)."""
    model, recipe = params["model"], params["recipe"]["name"]
    manifests = {stage: store.manifest(ref) for stage, ref in refs.items()}
    quantize = manifests["quantize"]
    qm = _metrics(quantize)
    bench = json.loads((store.path(refs["benchmark"]) / "results.json").read_text())
    own_bench = [r for r in manifests["benchmark"]["info"]["metrics"] if r["metric"] == "acc"]
    tasks = [r["task"] for r in own_bench]
    about = manifests.get("download", {}).get("info", {}).get("about", {})
    source = params["source"]
    base = {**source, "base_model": about.get("base_model") or (source.get("repo") if source.get("kind") == "hf" else None)}

    # Siblings: the same model through other recipes, measured the same way (same data, backend and n).
    same_way = {(r["task"], r.get("data"), r.get("backend"), r.get("n")) for r in own_bench}
    rows = _sibling_rows(store, model)
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

    n = {r["task"]: r.get("n") for r in own_bench}
    diffs = [d for d in _comparisons(store, model) if d["task"] in n and d["n"] == n[d["task"]]
             and d["recipe"] in {t["recipe"] for t in table}]

    fidelity = {"corpus": None, "recipes": {}}
    if "fidelity" in refs:
        fm = _metrics(manifests["fidelity"])
        fidelity["corpus"] = manifests["fidelity"]["params"].get("corpus")
        fidelity["tokens"] = next((r.get("n") for r in fm.values() if r["metric"] == "kl_mean"), None)
        corpus = next((r.get("data") for r in fm.values()), None)
        fidelity["recipes"][recipe] = {m: r["value"] for (t, m), r in fm.items()}
        for (other, stage, task, metric), r in rows.items():
            if stage == "fidelity" and other != recipe and r["data"] == corpus:
                fidelity["recipes"].setdefault(other, {})[metric] = r["value"]
    runtime = {m for m, _, _ in RUNTIME_COLUMNS}
    for (other, stage, task, metric), r in rows.items():
        if stage == "smoke" and metric in runtime and other != recipe:
            fidelity["recipes"].setdefault(other, {})[metric] = r["value"]
    sm = _metrics(manifests["smoke"])
    fidelity["recipes"].setdefault(recipe, {}).update({m: sm[("smoke", m)]["value"] for m in runtime if ("smoke", m) in sm})
    fidelity["recipes"] = {r: v for r, v in fidelity["recipes"].items() if r in {t["recipe"] for t in table}}
    smoke = json.loads((store.path(refs["smoke"]) / "smoke.json").read_text())

    run = bench["config"]["params"]
    plan = {t["task"]: t.get("data") for t in run.get("plan") or []}
    evaluation = {"lm_eval": bench.get("lm_eval_version"), "num_fewshot": run.get("num_fewshot"), "limit": run.get("limit"),
                  "chat_template": bool(bench["config"].get("apply_chat_template")), "backend": run.get("backend"),
                  "data": {t: plan.get(t) for t in tasks}, "n": n}
    return CardFacts(
        name=published_name(model, recipe), repo_id=params.get("repo_id"), model=model, recipe=recipe,
        description=params.get("recipe_description") or "", base=base,
        license=params.get("license") or about.get("license"),
        plan=plan_summary(quantize["info"].get("plan", []), params["recipe"].get("dtype", "bfloat16")),
        warnings=quantize["info"].get("warnings", []),
        bits_per_weight=qm[("model", "bits_per_weight")]["value"], disk_bytes=int(qm[("model", "disk_bytes")]["value"]),
        tools=quantize.get("tools", {}), evaluation=evaluation, tasks=tasks, table=table, diffs=diffs,
        fidelity=fidelity, smoke={"prompt": smoke.get("prompt"), "answer": smoke.get("text", ""), "verdict": smoke.get("verdict")},
        keys={stage: refs[stage].key for stage in MEASURED if stage in refs},
    )


def _sibling_rows(store: Store, model: str) -> dict:
    """(recipe, stage, task, metric) -> row, as last measured, for every recipe of `model`."""
    db = MetricStore(store.metrics_db)
    if not db.path.exists():
        return {}
    cols, rows = db.query("SELECT recipe, stage, task, metric, value, stderr, n, data, backend FROM latest_metrics "
                          "WHERE model = ? AND stage IN ('quantize', 'benchmark', 'fidelity', 'smoke')", [model])
    return {(r[0], r[1], r[2], r[3]): dict(zip(cols, r)) for r in rows}


def _comparisons(store: Store, model: str) -> list[dict]:
    db = MetricStore(store.metrics_db)
    if not db.path.exists():
        return []
    cols, rows = db.query("SELECT recipe, task, n, diff, low, high, p_value, significant FROM comparisons "
                          "WHERE model = ? AND base = ? ORDER BY recipe, task", [model, BASE_RECIPE])
    return [dict(zip(cols, r)) for r in rows]


def plan_summary(rows: list[dict], dtype: str) -> list[str]:
    """Which layers got which bits: modules with the same setting over the same layers share a line."""
    def what(r):
        return dtype if r.get("bits") is None else f"{r['bits']}-bit {r['mode']}, group size {r['group_size']}"

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
    """The card's metadata through huggingface_hub's own ModelCardData, model-index included."""
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    for task in f.tasks:
        acc = next(t["acc"][task] for t in f.table if t["recipe"] == f.recipe)
        dataset, config, split, pretty = DATASETS.get(task, (task, None, None, task))
        results.append(EvalResult(
            task_type="text-generation", task_name="Text Generation", dataset_type=dataset, dataset_name=pretty,
            dataset_config=config, dataset_split=split, metric_type="acc", metric_name="accuracy",
            metric_value=round(float(acc), 4),
            metric_args={"num_fewshot": f.evaluation["num_fewshot"], "limit": f.evaluation["limit"]}))
    tags = ["mlx", "qsweep", "quantized" if f.recipe != "bf16" else "bf16", f.recipe]
    base = f.base.get("base_model")
    return ModelCardData(
        library_name="mlx", pipeline_tag="text-generation", license=f.license, tags=tags,
        base_model=base, base_model_relation="quantized" if base else None,
        model_name=f.name, eval_results=results or None)


def _fmt(value, spec="{:.3f}") -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if abs(value) >= 1e4 else spec.format(value)  # a broken recipe's ppl of 8e7


def _size(n) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
           ["| " + " | ".join(r) + " |" for r in rows]


def _label(f: CardFacts, recipe: str) -> str:
    label = f"{recipe} (base)" if recipe == BASE_RECIPE else recipe
    return f"**{label} (this model)**" if recipe == f.recipe else label


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


def render(f: CardFacts) -> str:
    from huggingface_hub import ModelCard

    ev = f.evaluation
    lines = [f"# {f.name}", "", _provenance(f), ""]
    lines += ["## Quantization", "", *_table(["", ""], [
        ["bits per weight", f"{f.bits_per_weight:.3f}"], ["size on disk", _size(f.disk_bytes)],
        ["recipe", f"`{f.recipe}`"]]), "", "Which layers got which bits:", ""]
    lines += [f"- {line}" for line in f.plan] + [""]
    lines += [f"Note: {w}" for w in f.warnings] + ([""] if f.warnings else [])

    data = sorted({d for d in ev["data"].values() if d})
    lines += ["## Benchmarks", "",
              f"Accuracy (lm-eval {ev['lm_eval']} `acc`, {ev['num_fewshot']}-shot, "
              + (f"the first {ev['limit']} questions of each task" if ev["limit"] else "every question")
              + f", chat template {'on' if ev['chat_template'] else 'off'}, {ev['backend']} weights), "
              f"this variant beside the other recipes of {f.model} measured the same way. "
              f"Data: {'; '.join(data) or 'as lm-eval defines it'}.", ""]
    header = ["recipe", "bits/weight", "size", *f.tasks, "mean"]
    rows = []
    for t in f.table:
        accs = [t["acc"].get(task) for task in f.tasks]
        mean = sum(accs) / len(accs) if accs and None not in accs else None
        rows.append([_label(f, t["recipe"]), _fmt(t["bits_per_weight"], "{:.2f}"), _size(t["disk_bytes"]),
                     *[_fmt(a) for a in accs], _fmt(mean)])
    lines += _table(header, rows) + [""]
    stderr = next(t["stderr"] for t in f.table if t["recipe"] == f.recipe)
    if any(v is not None for v in stderr.values()):
        lines += ["Standard error of this variant's accuracy: "
                  + ", ".join(f"{task} ±{stderr[task]:.3f}" for task in f.tasks if stderr.get(task) is not None)
                  + ". With this many questions, differences smaller than about twice that are noise.", ""]
    if f.diffs:
        lines += _diff_table(f)

    fid = f.fidelity["recipes"]
    if fid:
        cols = [c for c in FIDELITY_COLUMNS + RUNTIME_COLUMNS if any(c[0] in v for v in fid.values())]
        corpus = f.fidelity.get("corpus")
        lines += ["## Fidelity and speed", "",
                  (f"Perplexity and KL divergence of each variant's next-token distribution from the base model's, "
                   f"on {corpus}" + (f" ({f.fidelity['tokens']} scored tokens)" if f.fidelity.get("tokens") else "")
                   + "; lower is closer. " if corpus else "")
                  + "Tokens/s and peak memory come from the smoke test's generation on the machine that ran the sweep.", ""]
        order = [t["recipe"] for t in f.table if t["recipe"] in fid]
        lines += _table(["recipe", *[c[1] for c in cols]],
                        [[_label(f, r), *[_fmt(fid[r].get(c[0]), c[2]) for c in cols]] for r in order]) + [""]

    answer = " ".join(f.smoke["answer"].split())
    lines += ["## Smoke test", "", f"Prompt: {f.smoke['prompt']}", "",
              f"Answer ({f.smoke['verdict']}, greedy): {answer[:400]}", ""]
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
              *_table(["", ""], [[k, f"`{v}`"] for k, v in f.tools.items() if v]
                      + [[f"{stage} artifact", f"`{key[:16]}`"] for stage, key in f.keys.items()]), ""]
    # Parsing it back through huggingface_hub refuses metadata the hub would not read.
    return str(ModelCard(f"---\n{front_matter(f).to_yaml()}\n---\n\n" + "\n".join(lines).rstrip() + "\n"))


def _diff_table(f: CardFacts) -> list[str]:
    by = {(d["recipe"], d["task"]): d for d in f.diffs}
    marked = sum(1 for d in f.diffs if d["significant"])
    rows = []
    for t in f.table:
        r = t["recipe"]
        if r == BASE_RECIPE or not any((r, task) in by for task in f.tasks):
            continue
        cells = []
        for task in f.tasks:
            d = by.get((r, task))
            cells.append("" if d is None else
                         f"{d['diff']:+.3f}{'*' if d['significant'] else ''} ({d['low']:+.3f}, {d['high']:+.3f})")
        rows.append([_label(f, r), *cells])
    expected = 0.05 * len(f.diffs)
    return [f"Difference from {BASE_RECIPE} on the same questions, with its 95% paired bootstrap interval; "
            f"`*` marks McNemar's exact p < 0.05. {marked} of {len(f.diffs)} differences are marked, and about "
            f"{expected:.1f} would be by chance alone.", "",
            *_table(["recipe", *f.tasks], rows), ""]


def write(facts: CardFacts, out: Path) -> None:
    """README.md and the facts it was rendered from (card.json, for tools)."""
    (out / "README.md").write_text(render(facts))
    (out / "card.json").write_text(json.dumps(asdict(facts), indent=2, sort_keys=True) + "\n")
