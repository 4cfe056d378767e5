"""tasks.compare: paired statistics for two quantized variants on the same questions."""

import math
import random
from statistics import NormalDist

import numpy as np
import pytest
from scipy.optimize import brentq, minimize_scalar
from scipy.special import xlogy
from scipy.stats import binomtest
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from tasks.compare import (INTERVAL_METHOD, compare, format_comparisons, holm, mcnemar_exact_p,
                           paired_interval)


def test_mcnemar_matches_hand_computed_values():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 0) == 2 * 0.5**5 == 0.0625
    assert mcnemar_exact_p(1, 0) == 1.0
    assert mcnemar_exact_p(10, 2) == pytest.approx(2 * sum(math.comb(12, k) for k in range(3)) / 2**12)
    assert mcnemar_exact_p(10, 2) == pytest.approx(0.03857421875)
    assert mcnemar_exact_p(6, 6) == 1.0


def test_mcnemar_matches_scipy_and_statsmodels():
    for b, c in [(1, 0), (5, 0), (10, 2), (3, 7), (0, 9), (17, 23), (60, 31), (600, 500)]:
        p = mcnemar_exact_p(b, c)
        assert p == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9)
        assert p == pytest.approx(mcnemar([[50, b], [c, 50]], exact=True).pvalue, rel=1e-9)


def test_mcnemar_is_symmetric_and_finite_for_large_n():
    for b, c in [(10, 2), (3, 7), (0, 9), (600, 500)]:
        assert mcnemar_exact_p(b, c) == mcnemar_exact_p(c, b)
    p = mcnemar_exact_p(600, 500)
    assert 0 < p < 1 and math.isfinite(p)
    # Normal approximation with continuity correction: z = (|b - c| - 1) / sqrt(b + c) = 2.985
    assert p == pytest.approx(math.erfc(99 / math.sqrt(1100) / math.sqrt(2)), rel=0.05)
    assert 0 <= mcnemar_exact_p(3000, 1000) < 1e-100


def test_holm_matches_statsmodels():
    rng = np.random.default_rng(0)
    cases = [[0.01, 0.04, 0.03, 0.005], [0.2, 0.2, 0.01, 1.0, 0.01], [0.5], [1e-8] * 3 + [0.9] * 4,
             list(rng.uniform(0, 0.1, 35)), list(rng.uniform(0, 1, 12) ** 4)]
    for p in cases:
        assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]), abs=1e-12)
    assert holm([]) == []


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4 * 0.005, 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def independent_interval(only_base, only_recipe, n, level=0.95):
    """Tango's interval the long way: the constrained likelihood maximised numerically, endpoints by brentq."""
    rest = n - only_base - only_recipe
    z = NormalDist().inv_cdf((1 + level) / 2)

    def score(d):  # d = p(only recipe) - p(only base)
        loglik = lambda q: -(xlogy(only_base, q) + xlogy(only_recipe, q + d) + xlogy(rest, 1 - 2 * q - d))
        q = minimize_scalar(loglik, bounds=(max(0.0, -d), (1 - d) / 2), method="bounded",
                            options={"xatol": 1e-13}).x
        pb, pc = q, q + d
        return (only_recipe - only_base - n * d) / math.sqrt(n * (pb + pc - d * d))

    est = (only_recipe - only_base) / n
    eps = 1e-9
    low = -1.0 if est == -1 else brentq(lambda d: score(d) - z, -1 + eps, est - eps, xtol=1e-12)
    high = 1.0 if est == 1 else brentq(lambda d: score(d) + z, est + eps, 1 - eps, xtol=1e-12)
    return low, high


@pytest.mark.parametrize("only_base, only_recipe, n, level", [
    (0, 0, 40, 0.95), (3, 0, 40, 0.95), (0, 3, 40, 0.95), (5, 12, 40, 0.95), (20, 20, 40, 0.95),
    (1, 0, 5, 0.95), (0, 2, 2, 0.95), (7, 1, 100, 0.90), (37, 61, 1000, 0.99), (500, 600, 5000, 0.95),
])
def test_interval_matches_an_independent_computation(only_base, only_recipe, n, level):
    got = paired_interval(only_base, only_recipe, n, level)
    assert got == pytest.approx(independent_interval(only_base, only_recipe, n, level), abs=1e-6)


# Published Tango intervals, as (both right, only recipe right, only base right, both wrong), level, (low, high)
# to 3 decimals, with their sources as R's ratesci cites them in its own checks (tests/testthat/test3.R,
# pairbinci contrast "RD").
PUBLISHED = [
    ((4, 9, 3, 16), 0.95, (-0.027, 0.390)),   # Tango 1998, Stat Med 17:891-908
    ((43, 0, 1, 0), 0.90, (-0.096, 0.037)),   # Tango 1998: an off-diagonal zero
    ((53, 16, 8, 9), 0.95, (-0.020, 0.207)),  # Agresti & Min 2005, Stat Med 24:729-740
    ((1, 1, 7, 12), 0.95, (-0.517, -0.026)),  # Fagerland, Lydersen & Laake 2014, Stat Med 33:2850-2875 (Bentur 2009)
]


@pytest.mark.parametrize("cells, level, expected", PUBLISHED)
def test_interval_matches_published_examples(cells, level, expected):
    both, only_recipe, only_base, neither = cells
    low, high = paired_interval(only_base, only_recipe, sum(cells), level)
    assert (round(low, 3), round(high, 3)) == expected


def test_interval_with_no_discordant_pairs_is_symmetric_and_several_points_wide():
    # With b = c = 0 the score statistic at d > 0 is -sqrt(n d / (1 - d)): the limit solves n d / (1 - d) = z^2.
    z = NormalDist().inv_cdf(0.975)
    for n in (40, 100, 1000):
        low, high = paired_interval(0, 0, n)
        assert low == pytest.approx(-high, abs=1e-12)
        assert high == pytest.approx(z * z / (n + z * z), abs=1e-12)
    assert paired_interval(0, 0, 40)[1] > 0.08  # 40 questions that all agree still allow about 8.8 points


def test_interval_edges_and_symmetry():
    assert paired_interval(0, 40, 40)[1] == 1.0 and paired_interval(40, 0, 40)[0] == -1.0
    for b, c, n in [(3, 0, 40), (2, 9, 40), (100, 130, 1000)]:
        low, high = paired_interval(b, c, n)
        mirror = paired_interval(c, b, n)
        assert (low, high) == pytest.approx((-mirror[1], -mirror[0]), abs=1e-12)
        assert low < (c - b) / n < high
    assert paired_interval(3, 0, 40)[0] < 0 < paired_interval(3, 0, 40)[1]  # McNemar p = 0.25: holds 0
    assert paired_interval(20, 0, 40)[1] < 0
    with pytest.raises(ValueError):
        paired_interval(30, 20, 40)


def test_interval_narrows_with_more_questions_and_widens_with_level():
    widths = [np.subtract(*paired_interval(n // 10, n // 10, n)[::-1]) for n in (100, 400, 1600)]
    assert widths[1] == pytest.approx(widths[0] / 2, rel=0.05) and widths[2] == pytest.approx(widths[1] / 2, rel=0.05)
    l90, h90 = paired_interval(5, 9, 60, 0.90)
    l99, h99 = paired_interval(5, 9, 60, 0.99)
    assert l99 < l90 and h90 < h99


def test_exact_coverage_at_40_questions():
    # Enumerate every (only_base, only_recipe, rest) outcome of 40 questions: the exact chance the interval
    # holds the true difference, over true flip rates on a grid (each 0.01-0.49, together at most 0.5).
    # Measured: mean 0.950, minimum 0.930 (the old paired bootstrap: mean 0.936, minimum 0.55).
    n = 40
    b, c = np.array([(b, c) for b in range(n + 1) for c in range(n + 1 - b)]).T
    low, high = np.array([paired_interval(int(x), int(y), n) for x, y in zip(b, c)]).T
    log_ways = np.array([math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(y + 1) - math.lgamma(n - x - y + 1)
                         for x, y in zip(b, c)])
    coverage = []
    for pb, pc in [(i / 100, j / 100) for i in range(1, 50) for j in range(1, 50) if i + j <= 50]:
        prob = np.exp(log_ways + b * math.log(pb) + c * math.log(pc) + (n - b - c) * math.log(1 - pb - pc))
        d = pc - pb
        coverage.append(prob[(low <= d + 1e-12) & (d - 1e-12 <= high)].sum())
    coverage = np.array(coverage)
    assert 0.945 < coverage.mean() < 0.955
    assert coverage.min() > 0.925


def rows(recipe, task, correct, start=0):
    return [{"recipe": recipe, "task": task, "doc_id": start + i, "correct": c} for i, c in enumerate(correct)]


def test_compare_pairs_rows_by_doc_id_in_any_order():
    base = rows("bf16", "arc", [1] * 50 + [0] * 50)
    q4 = rows("q4", "arc", [1] * 50 + [0] * 50)  # same answers as the base, question by question
    q2 = rows("q2", "arc", [True] * 10 + [False] * 90, start=-10)  # doc ids -10..89: 90 shared
    samples = base + q4 + q2
    random.Random(0).shuffle(samples)
    by_recipe = {c.recipe: c for c in compare(samples, "bf16")}
    assert list(by_recipe) == list(dict.fromkeys(r["recipe"] for r in samples if r["recipe"] != "bf16"))

    q4 = by_recipe["q4"]
    assert (q4.n, q4.diff, q4.only_base, q4.only_recipe) == (100, 0.0, 0, 0)
    assert (q4.low, q4.high) == paired_interval(0, 0, 100) and q4.low < -0.03 and q4.high > 0.03  # not a point
    assert q4.p_value == q4.p_holm == 1.0 and not q4.significant

    q2 = by_recipe["q2"]  # shared docs 0..89: base right on 0..49, q2 right on none of them
    assert q2.n == 90
    assert (q2.only_base, q2.only_recipe) == (50, 0)
    assert q2.base_acc == pytest.approx(50 / 90) and q2.acc == 0.0
    assert q2.diff == pytest.approx(-50 / 90) and q2.low < q2.diff < q2.high < 0
    assert (q2.low, q2.high) == paired_interval(50, 0, 90)
    assert q2.significant and q2.p_value == pytest.approx(2 * 0.5**50) and q2.p_holm == pytest.approx(2 * q2.p_value)


def test_compare_orders_by_task_then_recipe_appearance():
    samples = (rows("base", "mmlu", [1, 0]) + rows("b", "mmlu", [1, 1]) + rows("a", "mmlu", [0, 0])
               + rows("base", "arc", [1, 0]) + rows("a", "arc", [1, 1]) + rows("b", "arc", [0, 1]))
    got = [(c.task, c.recipe) for c in compare(samples, "base")]
    assert got == [("arc", "b"), ("arc", "a"), ("mmlu", "b"), ("mmlu", "a")]


def test_compare_errors_name_the_task_and_recipe():
    with pytest.raises(ValueError, match=r"'hellaswag'.*'q4'.*'bf16'"):
        compare(rows("bf16", "arc", [1, 0]) + rows("q4", "hellaswag", [1, 0]), "bf16")
    with pytest.raises(ValueError, match=r"'arc'.*'q4'.*doc_id 1"):
        compare(rows("bf16", "arc", [1, 0]) + rows("q4", "arc", [1, 0]) + rows("q4", "arc", [0], start=1), "bf16")


def test_significant_flag_follows_alpha():
    samples = rows("bf16", "arc", [1] * 12 + [0] * 88) + rows("q4", "arc", [0] * 10 + [1] * 2 + [0] * 88)
    (c,) = compare(samples, "bf16")
    assert c.p_value == pytest.approx(2 * 0.5**10)  # 10 only-base, 0 only-recipe
    assert c.p_holm == c.p_value  # a family of one
    assert compare(samples, "bf16", alpha=0.01)[0].significant == (c.p_value < 0.01)
    assert compare(samples, "bf16", alpha=1e-4)[0].significant is False


def test_holm_marks_fewer_rows_than_raw_p_across_many_comparisons():
    # Ten tasks where q4 loses 6 of 6 flips (raw p = 0.031 each) and one where it loses 20 of 20.
    samples = []
    for t in range(10):
        samples += rows("bf16", f"task{t}", [1] * 6 + [0] * 34) + rows("q4", f"task{t}", [0] * 40)
    samples += rows("bf16", "zlast", [1] * 20 + [0] * 20) + rows("q4", "zlast", [0] * 40)
    result = compare(samples, "bf16")
    assert len(result) == 11
    assert sum(c.p_value < 0.05 for c in result) == 11
    assert [c.task for c in result if c.significant] == ["zlast"]
    assert [c.p_holm for c in result] == pytest.approx(list(multipletests([c.p_value for c in result], method="holm")[1]))
    for c in result:  # each interval is per comparison: all of them exclude 0
        assert c.high < 0


def test_format_marks_significant_rows_and_explains_the_adjustment():
    samples = (rows("bf16", "arc", [1] * 40 + [0] * 60) + rows("q4", "arc", [1] * 39 + [0] * 61)
               + rows("q2", "arc", [1] * 5 + [0] * 95) + rows("bf16", "mmlu", [1, 0] * 30)
               + rows("q4", "mmlu", [1, 0] * 30) + rows("q2", "mmlu", [0, 1] * 30))
    result = compare(samples, "bf16")
    text = format_comparisons(result)
    assert [c.significant for c in result] == [False, True, False, False]
    arc = text.split("mmlu:")[0]
    line = {name: next(x for x in arc.splitlines() if x.strip().startswith(name + " ")) for name in ("q4", "q2")}
    assert line["q2"].endswith("*") and not line["q4"].endswith("*")
    assert "-0.350" in line["q2"] and "-0.010" in line["q4"]
    q2 = result[1]
    assert f"[{q2.low:+6.3f}, {q2.high:+6.3f}]" in line["q2"]
    assert f"{q2.p_value:.2g}" in line["q2"] and f"{q2.p_holm:.2g}" in line["q2"]
    for name in ("bf16", "q4", "q2", "arc", "mmlu", INTERVAL_METHOD, "McNemar p", "Holm p"):
        assert name in text
    assert "Holm-adjusted McNemar p < 0.05 across all 4 comparisons" in text and "multiple comparisons" in text
    assert "by chance alone" not in text
    assert "at most 0.05" in format_comparisons(result) and "at most 0.01" in format_comparisons(result, alpha=0.01)


def test_recipes_measured_on_other_questions_are_not_compared(tmp_path):
    """flows.compare reads the store: a recipe benchmarked on another sample (another seed, or the first
    questions by an older qsweep) shares few questions with the base, if any; it is left out, not paired."""
    from flows.compare import compare_recipes
    from storage.metrics import MetricStore

    db = MetricStore(tmp_path / "metrics.duckdb")
    same, other = "arc; 40 random documents of 1172 (seed 0)", "arc; 40 random documents of 1172 (seed 1)"
    for recipe, data, start in (("bf16", same, 0), ("q4", same, 0), ("q2", other, 500)):
        key = f"bench-{recipe}"
        db.record_stage("run", "m", recipe, "benchmark", key, "done", False, 1.0)
        db.record_metrics("run", "m", recipe, "benchmark", key, [
            {"task": "arc", "metric": "acc", "value": 0.5, "n": 40, "backend": "fp32", "data": data}])
        db.record_samples("m", recipe, key, [
            {"task": "arc", "doc_id": start + i, "target": 0, "chosen": i % 2, "correct": i % 2 == 0,
             "correct_norm": None, "logliks": [0.0, 0.0]} for i in range(40)])
    [c] = compare_recipes(str(tmp_path), "bf16")["m"]
    assert (c.recipe, c.n) == ("q4", 40)
