"""Is a quantized variant really worse than another, or is it noise?

Two variants of one base model answer the same benchmark questions, so compare them
question by question (paired on doc id), not by their two headline accuracies:

- diff: accuracy of the recipe minus accuracy of the base, on the questions both answered.
- interval: a paired bootstrap percentile interval for diff (question indices resampled
  with replacement, the same indices for both). One accuracy at 1000 questions is
  uncertain by about +-3 points (arc_challenge at 1000 questions: 95% interval of about
  +-3 points); the paired diff is narrower because the two variants mostly agree: with
  10% of answers flipping between them it is about +-2 points. An interval that holds 0
  means the sample cannot tell the two apart.
- only_base / only_recipe: questions only the base / only the recipe got right. Questions
  both got right or both got wrong say nothing about which is better.
- p_value: exact McNemar test on those discordant questions: how likely a split at least
  this lopsided is if each flip were a fair coin (the variants equally good).
- significant: p_value < alpha. With many recipes and tasks some rows are marked by
  chance alone; format_comparisons says how many to expect, and the Bonferroni threshold.
"""

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

BASE_RECIPE = "bf16"  # what every other recipe of a model is compared with, when a sweep has it


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b questions only A got right, c only B got right."""
    n = b + c
    if n == 0:
        return 1.0
    # Exact integers; Python's int / int rounds correctly even where 2**n overflows a float.
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_bootstrap_ci(
    a: Sequence[int], b: Sequence[int], iters: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean(b) - mean(a), low, high): a paired percentile bootstrap interval."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if d.ndim != 1 or len(d) == 0 or len(a) != len(b):
        raise ValueError(f"need two equal-length, non-empty vectors; got {len(a)} and {len(b)}")
    n = len(d)
    rng = np.random.Generator(np.random.PCG64(seed))
    chunk = max(1, 12_500_000 // n)  # int64 indices + the float64 values they pick: ~200 MB at a time
    means = np.concatenate([
        d[rng.integers(0, n, size=(min(chunk, iters - i), n))].mean(axis=1) for i in range(0, iters, chunk)
    ])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(low), float(high)


@dataclass
class Comparison:
    task: str
    base: str
    recipe: str
    n: int
    base_acc: float
    acc: float
    diff: float
    low: float
    high: float
    only_base: int
    only_recipe: int
    p_value: float
    significant: bool  # p_value < alpha


def compare(
    samples: Iterable[dict], base: str, alpha: float = 0.05, iters: int = 10000, seed: int = 0
) -> list[Comparison]:
    """Each recipe against `base`, per task (tasks sorted, recipes in order of first appearance)."""
    table: dict[tuple[str, str], dict] = {}  # (task, recipe) -> {doc_id: 0/1}
    recipes: list[str] = []
    for row in samples:
        recipe, task, doc = row["recipe"], row["task"], row["doc_id"]
        docs = table.setdefault((task, recipe), {})
        if doc in docs:
            raise ValueError(f"task {task!r}, recipe {recipe!r}: doc_id {doc!r} appears twice")
        docs[doc] = int(bool(row["correct"]))
        if recipe not in recipes:
            recipes.append(recipe)

    out = []
    for task in sorted({t for t, _ in table}):
        for recipe in recipes:
            if recipe == base or (task, recipe) not in table:
                continue
            if (task, base) not in table:
                raise ValueError(f"task {task!r}: recipe {recipe!r} has rows but base {base!r} has none")
            ref, mine = table[task, base], table[task, recipe]
            docs = [d for d in ref if d in mine]
            if not docs:
                raise ValueError(f"task {task!r}: recipe {recipe!r} and base {base!r} share no doc_id")
            a = np.array([ref[d] for d in docs])
            b = np.array([mine[d] for d in docs])
            diff, low, high = paired_bootstrap_ci(a, b, iters=iters, seed=seed)
            only_base, only_recipe = int(np.sum(a > b)), int(np.sum(b > a))
            p = mcnemar_exact_p(only_base, only_recipe)
            out.append(Comparison(task, base, recipe, len(docs), float(a.mean()), float(b.mean()), diff,
                                  low, high, only_base, only_recipe, p, p < alpha))
    return out


def format_comparisons(rows: list[Comparison], alpha: float = 0.05) -> str:
    """A plain-text table, one block per task, and a note on multiple comparisons."""
    lines = []
    for task in dict.fromkeys(r.task for r in rows):
        block = [r for r in rows if r.task == task]
        first = block[0]
        width = max(len("recipe"), *(len(r.recipe) for r in block))
        lines.append(f"{task}: each recipe against {first.base}, on the questions both answered")
        lines.append(f"  {'recipe':<{width}}  {'n':>5}  {'base':>5}  {'acc':>5}  {'diff':>6}  {'95% interval':>17}  "
                     f"{'McNemar p':>9}")
        for r in block:
            mark = " *" if r.significant else ""
            lines.append(f"  {r.recipe:<{width}}  {r.n:>5}  {r.base_acc:5.3f}  {r.acc:5.3f}  {r.diff:+6.3f}  "
                         f"[{r.low:+6.3f}, {r.high:+6.3f}]  {r.p_value:9.2g}{mark}")
        lines.append("")
    count = len(rows)
    lines.append(f"* McNemar p < {alpha:g}. {count} comparison{'s' if count != 1 else ''} made: even with no real "
                 f"difference, about {alpha * count:.1f} of them would be marked by chance alone "
                 f"(multiple comparisons).")
    if count:
        lines.append(f"  Bonferroni threshold: p < {alpha / count:.3g} ({alpha:g} / {count}).")
    return "\n".join(lines)
