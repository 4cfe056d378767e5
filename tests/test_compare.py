"""tasks.compare: paired statistics for two quantized variants on the same questions."""

import math
import random

import numpy as np
import pytest

from tasks.compare import compare, format_comparisons, mcnemar_exact_p, paired_bootstrap_ci


def test_mcnemar_matches_hand_computed_values():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 0) == 2 * 0.5**5 == 0.0625
    assert mcnemar_exact_p(1, 0) == 1.0
    assert mcnemar_exact_p(10, 2) == pytest.approx(2 * sum(math.comb(12, k) for k in range(3)) / 2**12)
    assert mcnemar_exact_p(10, 2) == pytest.approx(0.03857421875)
    assert mcnemar_exact_p(6, 6) == 1.0


def test_mcnemar_is_symmetric_and_finite_for_large_n():
    for b, c in [(10, 2), (3, 7), (0, 9), (600, 500)]:
        assert mcnemar_exact_p(b, c) == mcnemar_exact_p(c, b)
    p = mcnemar_exact_p(600, 500)
    assert 0 < p < 1 and math.isfinite(p)
    # Normal approximation with continuity correction: z = (|b - c| - 1) / sqrt(b + c) = 2.985
    assert p == pytest.approx(math.erfc(99 / math.sqrt(1100) / math.sqrt(2)), rel=0.05)
    assert 0 <= mcnemar_exact_p(3000, 1000) < 1e-100


def test_bootstrap_of_identical_vectors_is_zero():
    a = [1, 0, 1, 1, 0] * 20
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0, 0.0)


def test_bootstrap_finds_a_consistent_improvement():
    a = [0] * 300 + [1] * 400 + [0] * 300
    b = [1] * 300 + [1] * 400 + [0] * 300  # B right on 300 questions A missed, never the reverse
    diff, low, high = paired_bootstrap_ci(a, b)
    assert diff == pytest.approx(0.3)
    assert 0 < low < 0.3 < high


def test_bootstrap_is_deterministic_given_a_seed():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    assert paired_bootstrap_ci(a, b, seed=7) == paired_bootstrap_ci(a, b, seed=7)
    other = paired_bootstrap_ci(a, b, seed=8)  # another seed: the same diff, an interval within resampling noise
    assert other[0] == paired_bootstrap_ci(a, b, seed=7)[0]
    assert np.allclose(other[1:], paired_bootstrap_ci(a, b, seed=7)[1:], atol=0.01)


def test_bootstrap_in_chunks_matches_the_normal_approximation():
    # 12_500_000 // n resamples per chunk: 100_000 questions -> 8 chunks of 125 for 1000 iters.
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 2, 100_000), rng.integers(0, 2, 100_000)
    diff, low, high = paired_bootstrap_ci(a, b, iters=1000)
    assert low < diff < high
    assert high - low == pytest.approx(2 * 1.96 * np.std(b - a) / math.sqrt(len(a)), rel=0.15)


def test_bootstrap_interval_shrinks_with_more_questions():
    rng = np.random.default_rng(3)

    def width(n):
        a, b = (rng.random(n) < 0.6).astype(int), (rng.random(n) < 0.6).astype(int)
        _, low, high = paired_bootstrap_ci(a, b, iters=2000)
        return high - low

    small, large = width(100), width(2000)
    assert large < small / 2  # ~ 1 / sqrt(n): a factor of about 4.5


def rows(recipe, task, correct, start=0):
    return [{"recipe": recipe, "task": task, "doc_id": start + i, "correct": c} for i, c in enumerate(correct)]


def test_compare_pairs_rows_by_doc_id_in_any_order():
    base = rows("bf16", "arc", [1] * 50 + [0] * 50)
    q4 = rows("q4", "arc", [1] * 50 + [0] * 50)  # same answers as the base, question by question
    q2 = rows("q2", "arc", [True] * 10 + [False] * 90, start=-10)  # doc ids -10..89: 90 shared
    samples = base + q4 + q2
    random.Random(0).shuffle(samples)
    by_recipe = {c.recipe: c for c in compare(samples, "bf16", iters=2000)}
    assert list(by_recipe) == list(dict.fromkeys(r["recipe"] for r in samples if r["recipe"] != "bf16"))

    q4 = by_recipe["q4"]
    assert (q4.n, q4.diff, q4.low, q4.high, q4.only_base, q4.only_recipe) == (100, 0.0, 0.0, 0.0, 0, 0)
    assert q4.p_value == 1.0 and not q4.significant

    q2 = by_recipe["q2"]  # shared docs 0..89: base right on 0..49, q2 right on none of them
    assert q2.n == 90
    assert (q2.only_base, q2.only_recipe) == (50, 0)
    assert q2.base_acc == pytest.approx(50 / 90) and q2.acc == 0.0
    assert q2.diff == pytest.approx(-50 / 90) and q2.high < 0
    assert q2.significant and q2.p_value == pytest.approx(2 * 0.5**50)


def test_compare_orders_by_task_then_recipe_appearance():
    samples = (rows("base", "mmlu", [1, 0]) + rows("b", "mmlu", [1, 1]) + rows("a", "mmlu", [0, 0])
               + rows("base", "arc", [1, 0]) + rows("a", "arc", [1, 1]) + rows("b", "arc", [0, 1]))
    got = [(c.task, c.recipe) for c in compare(samples, "base", iters=200)]
    assert got == [("arc", "b"), ("arc", "a"), ("mmlu", "b"), ("mmlu", "a")]


def test_compare_errors_name_the_task_and_recipe():
    with pytest.raises(ValueError, match=r"'hellaswag'.*'q4'.*'bf16'"):
        compare(rows("bf16", "arc", [1, 0]) + rows("q4", "hellaswag", [1, 0]), "bf16")
    with pytest.raises(ValueError, match=r"'arc'.*'q4'.*doc_id 1"):
        compare(rows("bf16", "arc", [1, 0]) + rows("q4", "arc", [1, 0]) + rows("q4", "arc", [0], start=1), "bf16")


def test_significant_flag_follows_alpha():
    samples = rows("bf16", "arc", [1] * 12 + [0] * 88) + rows("q4", "arc", [0] * 10 + [1] * 2 + [0] * 88)
    (c,) = compare(samples, "bf16", iters=500)
    assert c.p_value == pytest.approx(2 * 0.5**10)  # 10 only-base, 0 only-recipe
    assert compare(samples, "bf16", alpha=0.01, iters=500)[0].significant == (c.p_value < 0.01)
    assert compare(samples, "bf16", alpha=1e-4, iters=500)[0].significant is False


def test_format_marks_significant_rows_and_warns_about_multiple_comparisons():
    samples = (rows("bf16", "arc", [1] * 40 + [0] * 60) + rows("q4", "arc", [1] * 39 + [0] * 61)
               + rows("q2", "arc", [1] * 5 + [0] * 95) + rows("bf16", "mmlu", [1, 0] * 30)
               + rows("q4", "mmlu", [1, 0] * 30) + rows("q2", "mmlu", [0, 1] * 30))
    result = compare(samples, "bf16", iters=1000)
    text = format_comparisons(result)
    assert [c.significant for c in result] == [False, True, False, False]
    arc = text.split("mmlu:")[0]
    line = {name: next(x for x in arc.splitlines() if x.strip().startswith(name + " ")) for name in ("q4", "q2")}
    assert line["q2"].endswith("*") and not line["q4"].endswith("*")
    assert "-0.350" in line["q2"] and "-0.010" in line["q4"]
    for name in ("bf16", "q4", "q2", "arc", "mmlu"):
        assert name in text
    assert "4 comparisons" in text and "about 0.2 of them would be marked by chance alone" in text
    assert "multiple comparisons" in text and "Bonferroni threshold: p < 0.0125" in text
