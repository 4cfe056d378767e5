"""Is a quantized variant really worse than another, or is it noise?

Two variants of one base model answer the same benchmark questions, so compare them
question by question (paired on doc id), not by their two headline accuracies:

- diff: accuracy of the recipe minus accuracy of the base, on the questions both answered.
- only_base / only_recipe: questions only the base / only the recipe got right. Questions
  both got right or both got wrong say nothing about which is better.
- low, high: a 95% interval for diff, Tango's asymptotic score interval for the difference
  of two paired proportions (Tango 1998, Stat Med 17:891-908): every difference whose score
  test the data do not reject. One accuracy at 1000 questions is uncertain by about +-3
  points; the paired diff is narrower because the two variants mostly agree: with 10% of
  answers flipping between them it is about +-2 points. An interval that holds 0 means the
  sample cannot tell the two apart.
- p_value: exact McNemar test on the discordant questions: how likely a split at least this
  lopsided is if each flip were a fair coin (the variants equally good).
- p_holm: p_value after Holm's step-down adjustment across every comparison of one
  compare() call (one model: all its tasks x recipes, what its card shows).
- significant: p_holm < alpha. The chance that any row of the call is marked when no
  recipe differs from the base is then at most alpha, however many rows there are.

Why Tango's interval: it inverts the score test whose statistic at diff = 0 is McNemar's,
so the interval and the test ask the same question; it needs no special cases when no
question flips (40 questions, none discordant: about +-8.8 points, not a point at 0, as the
paired bootstrap gave); its endpoints come from a closed-form constrained maximum
likelihood and a root search. Newcombe's method 10 (Wilson-based) performs about as well
but needs ad hoc rules for its correlation term when a margin is 0 or all questions agree.
Exact coverage at 40 questions, over true flip rates on a 0.01 grid (each direction
0.01-0.49, both together at most 0.5): 95.0% on average, 93.0% at worst (the bootstrap it
replaces: 93.6% on average, 55% at worst).

Two things to keep in mind. The interval is for one comparison, not adjusted for the
others, so it can exclude 0 on a row Holm does not mark. And it is asymptotic while the
McNemar p is exact and more cautious: 5 of 5 flips one way exclude 0 from the interval,
yet p = 0.0625.
"""

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Iterable

BASE_RECIPE = "bf16"  # what every other recipe of a model is compared with, when a sweep has it
INTERVAL_METHOD = "Tango score interval"  # what low, high are; the card prints it


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b questions only A got right, c only B got right."""
    n = b + c
    if n == 0:
        return 1.0
    # Exact integers; Python's int / int rounds correctly even where 2**n overflows a float.
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def _tango_score(only_base: int, only_recipe: int, n: int, diff: float) -> float:
    """Tango's score statistic for H0: p(only recipe) - p(only base) = diff."""
    b, c = only_recipe, only_base  # Tango's n12 and n21, so that diff = (b - c) / n
    # Maximum likelihood of p(only base) under H0: the root of 2n q^2 + w q - c diff (1 - diff) = 0.
    w = (2 * n - b + c) * diff - b - c
    q = (math.sqrt(max(0.0, w * w + 8 * n * c * diff * (1 - diff))) - w) / (4 * n)
    var = n * (2 * q + diff - diff * diff)  # of b - c under H0: n (p12 + p21 - diff^2)
    num = b - c - n * diff
    if var <= 0:  # only at diff = -1, 0 or 1 with no data against it
        return 0.0 if num == 0 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def paired_interval(only_base: int, only_recipe: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Tango's score interval for acc(recipe) - acc(base) from the discordant counts of n pairs."""
    if n <= 0 or only_base < 0 or only_recipe < 0 or only_base + only_recipe > n:
        raise ValueError(f"need 0 <= only_base + only_recipe <= n and n > 0; got {only_base}, {only_recipe}, {n}")
    z = NormalDist().inv_cdf((1 + level) / 2)
    est = (only_recipe - only_base) / n

    def root(lo: float, hi: float, target: float) -> float:
        # The statistic falls as diff rises, from +inf at -1 to -inf at 1: bisect to full precision.
        for _ in range(64):
            mid = (lo + hi) / 2
            if _tango_score(only_base, only_recipe, n, mid) > target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = -1.0 if est == -1 else root(-1.0, est, z)
    high = 1.0 if est == 1 else root(est, 1.0, -z)
    return low, high


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given."""
    m = len(p_values)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))  # adjusted p never falls with rank
        out[i] = running
    return out


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
    p_value: float  # exact McNemar, this comparison alone
    p_holm: float  # p_value adjusted across all comparisons of one compare() call
    significant: bool  # p_holm < alpha


def compare(samples: Iterable[dict], base: str, alpha: float = 0.05) -> list[Comparison]:
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
            pairs = [(ref[d], mine[d]) for d in ref if d in mine]
            if not pairs:
                raise ValueError(f"task {task!r}: recipe {recipe!r} and base {base!r} share no doc_id")
            n = len(pairs)
            only_base = sum(a > b for a, b in pairs)
            only_recipe = sum(b > a for a, b in pairs)
            base_acc, acc = sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n
            low, high = paired_interval(only_base, only_recipe, n)
            out.append(Comparison(task, base, recipe, n, base_acc, acc, (only_recipe - only_base) / n, low, high,
                                  only_base, only_recipe, mcnemar_exact_p(only_base, only_recipe), 1.0, False))
    for c, p in zip(out, holm([c.p_value for c in out])):
        c.p_holm, c.significant = p, p < alpha
    return out


def format_comparisons(rows: list[Comparison], alpha: float = 0.05) -> str:
    """A console table per task, and a note on what the marks mean (rows of one compare() call)."""
    from tasks.tables import console_table

    lines = []
    header = ["recipe", "n", "base", "acc", "diff", f"95% {INTERVAL_METHOD}", "McNemar p", "Holm p", ""]
    for task in dict.fromkeys(r.task for r in rows):
        block = [r for r in rows if r.task == task]
        lines.append(f"{task}: each recipe against {block[0].base}, on the questions both answered")
        table = console_table(header, [
            [r.recipe, r.n, f"{r.base_acc:.3f}", f"{r.acc:.3f}", f"{r.diff:+.3f}", f"[{r.low:+6.3f}, {r.high:+6.3f}]",
             f"{r.p_value:.2g}", f"{r.p_holm:.2g}", "*" if r.significant else ""] for r in block], right=tuple(header[1:]))
        lines += ["  " + line for line in table.splitlines()] + [""]
    count = len(rows)
    lines.append(f"* Holm-adjusted McNemar p < {alpha:g} across all {count} comparison{'s' if count != 1 else ''} above "
                 f"(multiple comparisons): were no recipe different from its base,")
    lines.append(f"  the chance that any row is marked would be at most {alpha:g}. Intervals are per comparison, not adjusted.")
    return "\n".join(lines)
