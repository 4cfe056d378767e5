"""The recipe search's pieces: sizes as the plan counts them, the exact knapsack, and recipes written from a choice."""

import itertools
import re

import numpy as np
import pytest

from tasks.plan import _bits, make_plan, reference_plan
from tasks.recipes import MODES, Recipe, RecipeError, builtin_recipes, get_recipe, load_recipe
from tasks.search import BudgetError, compact, formats_for, option_bits, recipe_yaml, solve

FORMATS = [None] + [{"bits": b, "group_size": g, "mode": "affine"}
                    for b in MODES["affine"]["bits"] for g in (32, 64, 128)] + [
    {"bits": 4, "group_size": 32, "mode": "mxfp4"}, {"bits": 4, "group_size": 16, "mode": "nvfp4"},
    {"bits": 8, "group_size": 32, "mode": "mxfp8"}]
MODULES = [(p.path, p.out_features, p.in_features) for p in reference_plan(get_recipe("q4")).layers]
N_LAYERS = 30


def affine(bits, group_size=64):
    return {"bits": bits, "group_size": group_size, "mode": "affine"}


def plan_of(recipe: Recipe, dtype=None):
    return make_plan(recipe, [(p, o, i, None) for p, o, i in MODULES], N_LAYERS, source_dtype=dtype)


def assert_reproduces(recipe: Recipe, assignment: dict, tmp_path, dtype=None):
    """The recipe's plan gives every module its format, and so does the recipe written out and read back."""
    for r in (recipe, written_and_read(recipe, tmp_path)):
        got = {lp.path: lp.quant for lp in plan_of(r, dtype).layers}
        assert got == assignment
        assert not plan_of(r, dtype).warnings()  # no unmatched rule, no fallback
    assert written_and_read(recipe, tmp_path).params() == recipe.params()


def written_and_read(recipe: Recipe, tmp_path):
    path = tmp_path / f"{recipe.name}.yaml"
    path.write_text(recipe_yaml(recipe, ["searched"]))
    return load_recipe(path)


# ---- sizes and candidates
def test_option_bits_counts_what_the_plan_counts():
    for name in ("q4", "qx86-hi", "nvfp4", "mixed_3_6", "bf16"):
        plan = reference_plan(get_recipe(name))
        assert sum(option_bits(p.out_features, p.in_features, p.quant, plan.dtype) for p in plan.layers) == \
            sum(_bits(p, plan.dtype) for p in plan.layers)
    # 4-bit affine, group 64: a bfloat16 scale and bias per 64 weights
    assert option_bits(576, 576, affine(4), "bfloat16") == 576 * 576 * 4 + 576 * 576 // 64 * 32
    assert option_bits(576, 576, None, "float32") == 576 * 576 * 32


def test_formats_for_keeps_group_sizes_that_divide_the_width():
    fits = formats_for(576, FORMATS)
    assert None in fits and affine(4, 64) in fits and affine(4, 128) not in fits
    assert affine(4, 128) in formats_for(1536, FORMATS)
    assert formats_for(24, FORMATS) == [None]


# ---- the knapsack
def brute_force(costs, sizes, budget):
    best = None
    for choice in itertools.product(*(range(len(c)) for c in costs)):
        if sum(sizes[i][j] for i, j in enumerate(choice)) <= budget:
            total = sum(costs[i][j] for i, j in enumerate(choice))
            best = total if best is None else min(best, total)
    return best


def check_against_brute_force(costs, sizes, budget):
    choice = solve(costs, sizes, budget)
    assert len(choice) == len(costs)
    assert sum(sizes[i][j] for i, j in enumerate(choice)) <= budget
    assert sum(costs[i][j] for i, j in enumerate(choice)) == pytest.approx(brute_force(costs, sizes, budget), abs=1e-12)


def test_solve_is_optimal_on_small_random_cases():
    rng = np.random.default_rng(0)
    for case in range(400):
        units = rng.integers(2, 7)
        counts = rng.integers(2, 5, size=units)
        if case % 3 == 0:  # ties: costs from a few values, so several choices are optimal
            costs = [list(rng.integers(0, 3, size=k) / 4) for k in counts]
        else:
            costs = [list(rng.random(k)) for k in counts]
        sizes = [[int(s) for s in rng.integers(1, 6 if case % 2 else 1000, size=k)] for k in counts]
        low, high = sum(map(min, sizes)), sum(map(max, sizes))
        for budget in {low, high, int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))}:
            check_against_brute_force([[float(c) for c in unit] for unit in costs], sizes, budget)


def test_solve_is_exact_with_sizes_of_a_billion_bits():
    rng = np.random.default_rng(1)
    for _ in range(5):
        sizes = [[int(s) for s in rng.integers(10**8, 10**9, size=3)] for _ in range(9)]
        costs = [list(rng.random(3) * 1e-3) for _ in range(9)]
        low, high = sum(map(min, sizes)), sum(map(max, sizes))
        for budget in (low, low + (high - low) // 3, high - 1):
            check_against_brute_force(costs, sizes, budget)


def test_solve_is_deterministic_and_handles_uniform_sizes():
    rng = np.random.default_rng(2)
    costs = [[float(c) for c in rng.integers(0, 2, size=4)] for _ in range(30)]
    sizes = [[int(s) for s in rng.integers(1, 50, size=4)] for _ in range(30)]
    budget = sum(map(min, sizes)) + 300
    assert solve(costs, sizes, budget) == solve(costs, sizes, budget)
    assert solve([[3.0, 1.0, 2.0], [0.5, 0.1]], [[7, 7, 7], [2, 2]], 9) == [1, 1]


def test_solve_refuses_a_budget_out_of_reach_naming_the_range():
    costs, sizes = [[1.0, 0.0], [2.0, 0.0, 1.0]], [[10, 20], [5, 30, 7]]
    for budget in (14, 51):
        with pytest.raises(BudgetError, match=r"\b15\b.*\b50\b"):
            solve(costs, sizes, budget)
    assert issubclass(BudgetError, ValueError)
    assert solve(costs, sizes, 15) == [0, 0] and solve(costs, sizes, 50) == [1, 1]


def test_solved_choice_written_as_a_recipe_has_the_planned_size(tmp_path):
    """Costs and sizes per module, solved, compacted: the plan's size is what the solver counted."""
    rng = np.random.default_rng(3)
    options = [formats_for(i, FORMATS) for _, _, i in MODULES]
    sizes = [[option_bits(o, i, f, "bfloat16") for f in fs] for (_, o, i), fs in zip(MODULES, options)]
    costs = [[0.0 if f is None else float(rng.random()) * 2.0 ** -f["bits"] for f in fs] for fs in options]
    budget = sum(option_bits(o, i, affine(4), "bfloat16") for _, o, i in MODULES)  # q4's size
    choice = solve(costs, sizes, budget)
    assignment = {p: fs[j] for (p, _, _), fs, j in zip(MODULES, options, choice)}
    recipe = compact(assignment, MODULES, N_LAYERS, "searched", dtype="bfloat16")
    assert_reproduces(recipe, assignment, tmp_path, dtype="bfloat16")
    planned = sum(_bits(p, "bfloat16") for p in plan_of(recipe, "bfloat16").layers)
    assert planned == sum(sizes[i][j] for i, j in enumerate(choice)) <= budget


# ---- compaction
def kind(path):
    return re.sub(r"^model\.layers\.\d+\.", "", path)


def layer(path):
    m = re.match(r"model\.layers\.(\d+)\.", path)
    return int(m[1]) if m else None


def test_compact_reproduces_random_assignments(tmp_path):
    rng = np.random.default_rng(4)
    for case in range(40):
        pool = [FORMATS[k] for k in rng.choice(len(FORMATS), size=int(rng.integers(1, 6)), replace=False)]
        assignment = {}
        for path, _, width in MODULES:
            fits = formats_for(width, pool) or [None]
            assignment[path] = fits[int(rng.integers(len(fits)))]
        recipe = compact(assignment, MODULES, N_LAYERS, f"random-{case}", dtype="bfloat16" if case % 2 else None)
        assert_reproduces(recipe, assignment, tmp_path, dtype=recipe.dtype)


@pytest.mark.parametrize("case, rules", [
    ("attention 8-bit", 1),  # one rule: \.self_attn\.(q_proj|k_proj|v_proj|o_proj)$
    ("last 4 layers 6-bit", 1),  # every kind at layers "last 4", one regex
    ("one odd layer", 1),  # layer 7's down_proj at 8 bits
    ("attention and embedding 8-bit, last 4 MLPs 6-bit, one float down_proj", 3),
    ("attention 4-bit, the rest float", 1),  # the default is float
    ("nvfp4 MLP, affine attention, mxfp8 embedding", 2),
    ("every third layer's v_proj and down_proj 6-bit", 1),  # layers "every 3"
])
def test_compact_writes_structured_choices_in_few_rules(case, rules, tmp_path):
    def fmt(path):
        k, i = kind(path), layer(path)
        attention = k.startswith("self_attn.")
        if case == "attention 8-bit":
            return affine(8) if attention else affine(4)
        if case == "last 4 layers 6-bit":
            return affine(6) if i is not None and i >= 26 else affine(4)
        if case == "one odd layer":
            return affine(8) if (i, k) == (7, "mlp.down_proj") else affine(4)
        if case.startswith("attention and embedding"):
            if attention or i is None:
                return affine(8)
            if (i, k) == (11, "mlp.down_proj"):
                return None
            return affine(6) if i >= 26 else affine(4)
        if case.startswith("attention 4-bit"):
            return affine(4) if attention else None
        if case.startswith("nvfp4"):
            return affine(8, 32) if attention else {"bits": 8, "group_size": 32, "mode": "mxfp8"} if i is None else \
                {"bits": 4, "group_size": 16, "mode": "nvfp4"}
        return affine(6) if k in ("self_attn.v_proj", "mlp.down_proj") and i % 3 == 0 else affine(3)

    assignment = {p: fmt(p) for p, _, _ in MODULES}
    recipe = compact(assignment, MODULES, N_LAYERS, "structured", description=case)
    assert len(recipe.rules) == rules, recipe.rules
    assert_reproduces(recipe, assignment, tmp_path)


def test_compact_selectors_read_like_the_builtins():
    assignment = {p: affine(8) if kind(p).startswith("self_attn.") else
                  affine(6) if layer(p) is not None and (layer(p) < 2 or layer(p) in (9, 10, 11, 15) or layer(p) >= 27)
                  else affine(4) for p, _, _ in MODULES}
    assignment["model.embed_tokens"] = None
    recipe = compact(assignment, MODULES, N_LAYERS, "mix")
    assert (recipe.bits, recipe.group_size, recipe.mode) == (4, 64, "affine")
    by_match = {r.match: r for r in recipe.rules}
    assert by_match[r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$"].layers is None
    assert by_match[r"\.mlp\.(gate_proj|up_proj|down_proj)$"].layers == "first 2, 9-11, 15, last 3"
    assert by_match[r"(^|\.)embed_tokens$"].keep


def test_compact_writes_strided_layers_as_every():
    assignment = {p: affine(6) if kind(p) == "self_attn.v_proj" and layer(p) % 4 == 1 else
                  affine(5) if kind(p) == "mlp.down_proj" and layer(p) % 3 == 0 else affine(3) for p, _, _ in MODULES}
    recipe = compact(assignment, MODULES, N_LAYERS, "strided")
    assert sorted(r.layers for r in recipe.rules) == ["every 3", "every 4 from 1"]


def test_compact_picks_a_default_group_size_every_quantized_module_allows(tmp_path):
    """down_proj (input 1536) at group 128 covers the most weights, but 128 does not divide the other
    modules' 576: as the recipe's group size, mlx-lm would leave those in float."""
    assignment = {p: affine(4, 128) if kind(p) == "mlp.down_proj" else affine(4, 64) if kind(p).startswith("mlp.")
                  else affine(8, 32) for p, _, _ in MODULES}
    recipe = compact(assignment, MODULES, N_LAYERS, "groups")
    assert recipe.group_size in (32, 64)
    assert_reproduces(recipe, assignment, tmp_path)


def test_compact_anchors_whole_paths_where_a_module_name_repeats(tmp_path):
    """A vision tower with the same module names as the language model: a regex for the name alone would
    select both towers, so each kind's rule names its whole path."""
    modules = [(f"{tower}.layers.{i}.mlp.{name}", 64, 128) for tower in ("model", "vision") for i in range(4)
               for name in ("up_proj", "down_proj")]
    modules += [("model.embed_tokens", 256, 128), ("vision.embed_tokens", 64, 128)]
    assignment = {p: affine(8) if p.startswith("vision.") else affine(4) for p, _, _ in modules}
    assignment["model.layers.3.mlp.down_proj"] = None
    recipe = compact(assignment, modules, 4, "towers")
    plan = make_plan(recipe, [(p, o, i, None) for p, o, i in modules], 4)
    assert {lp.path: lp.quant for lp in plan.layers} == assignment
    assert r"^model\.layers\.\d+\.mlp\.down_proj$" in [r.match for r in recipe.rules]
    back = written_and_read(recipe, tmp_path)
    assert back.params() == recipe.params()


def test_compact_refuses_what_no_recipe_can_write():
    assignment = {p: affine(4) for p, _, _ in MODULES}
    with pytest.raises(ValueError, match="group size 128 does not divide its input width 576"):
        compact({**assignment, "model.layers.0.self_attn.q_proj": affine(4, 128)}, MODULES, N_LAYERS, "x")
    with pytest.raises(ValueError, match="missing"):
        compact({p: f for p, f in assignment.items() if p != "model.embed_tokens"}, MODULES, N_LAYERS, "x")
    with pytest.raises(RecipeError, match="not one mlx quantizes"):
        compact({**assignment, "model.embed_tokens": affine(7)}, MODULES, N_LAYERS, "x")


# ---- the file
def test_recipe_yaml_reads_back_equal(tmp_path):
    assignment = {p: affine(8, 32) if kind(p).startswith("self_attn.") else affine(6, 32) for p, _, _ in MODULES}
    recipe = compact(assignment, MODULES, N_LAYERS, "searched-1", dtype="bfloat16", description='a "quoted" search')
    text = recipe_yaml(recipe, ["budget 4.5 bits per weight", "calibration sha256 abc123", "predicted KL 0.0123"])
    assert text.splitlines()[:3] == ["# budget 4.5 bits per weight", "# calibration sha256 abc123",
                                     "# predicted KL 0.0123"]
    path = tmp_path / "searched-1.yaml"
    path.write_text(text)
    back = load_recipe(path)
    assert back.params() == recipe.params() and back.description == recipe.description


def test_recipe_yaml_writes_every_builtin_back(tmp_path):
    for name, recipe in builtin_recipes().items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(recipe_yaml(recipe, [name]))
        assert load_recipe(path).params() == recipe.params(), name
