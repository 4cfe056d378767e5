"""Searching for a recipe: each module's format chosen to minimise a predicted loss within a size budget.

The caller measures, per module and candidate format, a cost (e.g. the KL divergence the model's
output gains when only that module is quantized that way) and a size (option_bits). solve() picks
one format per module with the least total cost whose total size fits the budget (an exact
multiple-choice knapsack, HiGHS through scipy). compact() writes the choice as a recipe with few
rules, and recipe_yaml() as a file load_recipe reads back.

Pure Python, numpy and scipy: no mlx.
"""

import json
import math
import re
from collections import defaultdict

import numpy as np
import yaml
from scipy.optimize import LinearConstraint, milp
from scipy.sparse import csr_array

from tasks.plan import LayerPlan, _bits, make_plan
from tasks.recipes import MODES, Recipe, RecipeError, Rule, layer_index
from tasks.specs import SAFE_NAME


class BudgetError(ValueError):
    pass


# ---- options per module
def option_bits(out_features: int, in_features: int, fmt: dict | None, dtype: str | None) -> int:
    """Storage bits of one module in a format (None: float in `dtype`), as the plan counts them."""
    return _bits(LayerPlan("", None, out_features, in_features, fmt, ""), dtype)


def formats_for(in_features: int, formats: list[dict | None]) -> list[dict | None]:
    """The formats a module of this input width can take: a group size must divide the width
    (else mlx-lm leaves it in float); float (None), where listed, always fits."""
    return [f for f in formats if f is None or in_features % f["group_size"] == 0]


# ---- the knapsack
def solve(costs: list[list[float]], sizes: list[list[int]], budget: int) -> list[int]:
    """One option per unit with the least total cost such that the total size is <= budget (exact)."""
    if len(costs) != len(sizes) or any(len(c) != len(s) or not c for c, s in zip(costs, sizes)):
        raise ValueError("costs and sizes need the same shape: one non-empty list of options per unit")
    if not all(math.isfinite(c) for unit in costs for c in unit):
        raise ValueError("costs must be finite numbers")
    sizes = [[int(s) for s in unit] for unit in sizes]
    low = sum(min(unit) for unit in sizes)
    high = sum(max(unit) for unit in sizes)
    if not low <= budget <= high:
        raise BudgetError(f"budget {budget} bits is outside what the options reach: "
                          f"from {low} (the smallest option of every unit) to {high} (the largest)")
    # Options another option of the unit beats (no larger and no costlier) are never needed: dropping
    # them keeps the optimum, fixes units left one option, and leaves the solver fewer variables.
    options = [_frontier(c, s) for c, s in zip(costs, sizes)]
    choice = [opts[0] for opts in options]  # units left one option are decided
    open_units = [i for i, opts in enumerate(options) if len(opts) > 1]
    if not open_units:
        return choice

    # Exact integer reductions: every unit's smallest option (first on its frontier) is taken as spent,
    # and all extra sizes share a common divisor, so the solver sees small integers.
    extra = [[sizes[i][j] - sizes[i][options[i][0]] for j in options[i]] for i in open_units]
    step = math.gcd(*(e for unit in extra for e in unit))
    extra = [[e // step for e in unit] for unit in extra]
    room = (budget - low) // step

    # HiGHS stops within an absolute gap of 1e-6 as well as the relative one (scipy passes only the
    # latter): costs measured from each unit's cheapest option and scaled up make that gap negligible.
    # A power of ten, so costs on a decimal grid stay on one: HiGHS then proves optimality with integer
    # steps of the objective (rounded KLs with ties took a minute under an arbitrary scale, 0.2 s so).
    cost = [np.array([costs[i][j] for j in options[i]], dtype=float) for i in open_units]
    cost = [c - c.min() for c in cost]
    top = max(float(c.max()) for c in cost)
    scale = 10.0 ** (6 - math.ceil(math.log10(top))) if top > 0 else 1.0

    counts = [len(c) for c in cost]
    n = sum(counts)
    c_vec = np.concatenate(cost) * scale
    size_vec = np.array([e for unit in extra for e in unit], dtype=float)
    starts = np.cumsum([0] + counts[:-1])
    rows = np.repeat(np.arange(len(counts)), counts)
    one_each = csr_array((np.ones(n), (rows, np.arange(n))), shape=(len(counts), n))

    limit = room
    for _ in range(20):
        result = milp(c_vec, integrality=np.ones(n), bounds=(0, 1),
                      constraints=[LinearConstraint(one_each, 1, 1),
                                   LinearConstraint(size_vec[None, :], -np.inf, limit)],
                      options={"mip_rel_gap": 0})
        if result.x is None:
            raise RuntimeError(f"the solver found no choice within the budget ({result.message})")
        picked = [int(np.argmax(result.x[s:s + k])) for s, k in zip(starts, counts)]
        used = sum(extra[u][j] for u, j in enumerate(picked))
        if used <= room:
            for i, j in zip(open_units, picked):
                choice[i] = options[i][j]
            return choice
        limit -= used - room  # a binary the solver left a hair off 0/1 hid the excess: tighten and solve again
    raise RuntimeError(f"the solver's choices kept exceeding the budget {budget} bits")


def _frontier(costs: list[float], sizes: list[int]) -> list[int]:
    """Indices of a unit's options that no other beats, smallest first (of equal ones, the first)."""
    kept, best = [], math.inf
    for j in sorted(range(len(sizes)), key=lambda j: (sizes[j], costs[j], j)):
        if costs[j] < best:
            kept.append(j)
            best = costs[j]
    return kept


# ---- writing a choice as a recipe
def _key(fmt: dict | None):
    return None if fmt is None else (fmt["bits"], fmt["group_size"], fmt["mode"])


def _kind(path: str) -> tuple[str, str | None]:
    """(prefix, suffix) around a path's layer index; (path, None) for a module outside the layers."""
    parts = path.split(".")
    at = next((k for k, p in enumerate(parts) if p.isdigit()), None)
    if at is None:
        return path, None
    return ".".join(parts[:at]), ".".join(parts[at + 1:])


def _kind_regex(kind: tuple[str, str | None], paths_of_kind: list[str], all_paths: list[str]):
    """(regex, short) for a kind: the short form reads like the built-ins (r"\\.self_attn\\.q_proj$") and is
    used only if it selects exactly this kind's modules among all of them; else the path, anchored at both ends."""
    prefix, suffix = kind
    if suffix is None:
        full = "^" + re.escape(prefix) + "$"
        short = r"(^|\.)" + re.escape(prefix.split(".")[-1]) + "$"
    else:
        full = "^" + re.escape(prefix) + r"\.\d+" + (r"\." + re.escape(suffix) if suffix else "") + "$"
        short = r"\." + re.escape(suffix) + "$" if suffix else None
    if short is not None and {p for p in all_paths if re.search(short, p)} == set(paths_of_kind):
        return short, True
    return full, False


def _merge(regexes: list[tuple[str, tuple, bool]]) -> str:
    """One regex for several kinds: short layered ones under one parent share it
    (r"\\.self_attn\\.(q_proj|k_proj)$"); the rest are alternatives, each anchored on its own."""
    by_parent: dict[str, list[str]] = {}
    out = []
    for regex, (_, suffix), short in regexes:
        if short and suffix is not None and "." in suffix:
            parent, leaf = suffix.rsplit(".", 1)
            if parent not in by_parent:
                by_parent[parent] = []
                out.append(("parent", parent))
            by_parent[parent].append(leaf)
        else:
            out.append(("regex", regex))
    pieces = []
    for what, value in out:
        if what == "regex":
            pieces.append(value)
        else:
            leaves = [re.escape(x) for x in by_parent[value]]
            inner = leaves[0] if len(leaves) == 1 else "(" + "|".join(leaves) + ")"
            pieces.append(r"\." + re.escape(value) + r"\." + inner + "$")
    return "|".join(pieces)


def _layers_text(indices: list[int], n_layers: int) -> str:
    """Layer indices as a selector: "first 4, 7, 10-12, last 2", or "every 3 from 1" to the last layer."""
    indices = sorted(set(indices))
    steps = {b - a for a, b in zip(indices, indices[1:])}
    if len(indices) >= 3 and len(steps) == 1 and (k := steps.pop()) > 1 and indices[-1] + k >= n_layers:
        return f"every {k}" + (f" from {indices[0]}" if indices[0] else "")
    runs = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    parts = []
    for a, b in runs:
        if a == b:
            parts.append(str(a))
        elif a == 0:
            parts.append(f"first {b + 1}")
        elif b == n_layers - 1:
            parts.append(f"last {b - a + 1}")
        else:
            parts.append(f"{a}-{b}")
    return ", ".join(parts)


def compact(assignment: dict[str, dict | None], modules: list[tuple[str, int, int]], n_layers: int,
            name: str, dtype: str | None = None, description: str = "") -> Recipe:
    """A recipe whose plan gives every module its assigned format (None: float), with few rules.

    The default is the format covering the most weights among those the recipe's group size may take
    (mlx-lm leaves a module whose input width the default group size does not divide in float, so it
    must divide every quantized module's); then a rule per module kind and non-default format, with
    layers where the kind's layers differ, kinds with the same format and layers sharing one rule.
    """
    if not re.fullmatch(SAFE_NAME, name):
        raise RecipeError(f"recipe name {name!r} is not allowed: letters, digits, '.', '_', '-'")
    paths = [m[0] for m in modules]
    shape = {p: (o, i) for p, o, i in modules}
    if set(assignment) != set(paths):
        missing, unknown = sorted(set(paths) - set(assignment)), sorted(set(assignment) - set(paths))
        raise ValueError(f"the assignment must name every module once; missing {missing[:3]}, unknown {unknown[:3]}")
    for path, fmt in assignment.items():
        if fmt is None:
            continue
        allowed = MODES.get(fmt["mode"])
        if allowed is None or fmt["bits"] not in allowed["bits"] or fmt["group_size"] not in allowed["group_size"]:
            raise RecipeError(f"{path}: format {fmt} is not one mlx quantizes (see tasks/recipes.MODES)")
        if shape[path][1] % fmt["group_size"]:
            raise ValueError(f"{path}: group size {fmt['group_size']} does not divide its input width {shape[path][1]}")

    # the default
    widths = {shape[p][1] for p, f in assignment.items() if f is not None}
    weight: dict = defaultdict(int)
    for p, f in assignment.items():
        weight[_key(f)] += shape[p][0] * shape[p][1]
    eligible = [k for k in weight if k is None or all(w % k[1] == 0 for w in widths)]

    def order(k):  # most weights, then float, then fewest bits
        return -weight[k], k is not None, k or ()

    default = min(eligible, key=order)
    if default is not None:
        bits, group_size, mode = default
    else:  # float by default: rules inherit the group size and mode of the most used quantized format
        quantized = [k for k in eligible if k is not None]
        bits, (_, group_size, mode) = None, min(quantized, key=order) if quantized else (None, 64, "affine")

    # rules per kind and format
    kinds: dict[tuple, list[str]] = {}
    for p in paths:
        kinds.setdefault(_kind(p), []).append(p)
    groups: dict[tuple, list] = {}  # (format, layers) -> [(regex, kind, short)]
    for kind, members in kinds.items():
        formats = {_key(assignment[p]) for p in members}
        regex, short = _kind_regex(kind, members, paths)
        for fmt in sorted((f for f in formats if f != default), key=lambda k: (k is not None, k or ())):
            chosen = [p for p in members if _key(assignment[p]) == fmt]
            layers = None if len(formats) == 1 or kind[1] is None else _layers_text(
                [layer_index(p) for p in chosen], n_layers)
            groups.setdefault((fmt, layers), []).append((regex, kind, short))

    rules = []
    for (fmt, layers), entries in groups.items():
        match = _merge(entries)
        if fmt is None:
            rules.append(Rule(match=match, keep=True, layers=layers))
        else:
            b, g, m = fmt
            rules.append(Rule(match=match, layers=layers, bits=b if b != bits else None,
                              group_size=g if g != group_size else None, mode=m if m != mode else None))
    recipe = Recipe(name=name, bits=bits, group_size=group_size, mode=mode, dtype=dtype, rules=tuple(rules),
                    description=description).check()

    plan = make_plan(recipe, [(p, o, i, None) for p, o, i in modules], n_layers, source_dtype=dtype)
    wrong = [lp.path for lp in plan.layers if _key(lp.quant) != _key(assignment[lp.path])]
    if wrong:  # a bug here, not the caller's: say where
        raise RuntimeError(f"compact: recipe {name!r} does not reproduce the assignment at {wrong[:3]}")
    return recipe


# ---- the file
def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"  # a YAML single-quoted scalar: backslashes stay as written


def _plain(text: str) -> str:
    """As written where YAML reads it back as this string, else quoted (a name like 1e3 or true)."""
    try:
        same = yaml.safe_load(f"x: {text}") == {"x": text}
    except yaml.YAMLError:
        same = False
    return text if same else _quoted(text)


def recipe_yaml(recipe: Recipe, header: list[str]) -> str:
    """The recipe as a file in the shape of tasks/data/recipes/*.yaml, the header as leading comments."""
    lines = [("# " + line).rstrip() for entry in header for line in str(entry).splitlines() or [""]]
    lines += [f"name: {_plain(recipe.name)}", f"description: {json.dumps(recipe.description, ensure_ascii=False)}",
              f"bits: {'null' if recipe.bits is None else recipe.bits}",
              f"group_size: {recipe.group_size}", f"mode: {recipe.mode}"]
    if recipe.dtype is not None:
        lines.append(f"dtype: {recipe.dtype}")
    if recipe.method is not None:
        lines.append(f"method: {recipe.method}")
    if recipe.calibration:
        calibration = {k: v for k, v in recipe.calibration.items() if k != "sha256"}  # load_recipe adds it
        lines.append(f"calibration: {json.dumps(calibration, ensure_ascii=False)}")
    if recipe.rules:
        lines.append("rules:")
    for rule in recipe.rules:
        lines.append(f"  - match: {_quoted(rule.match)}")
        if rule.layers is not None:
            lines.append(f"    layers: {_quoted(rule.layers)}")
        for field in ("bits", "group_size", "mode"):
            if getattr(rule, field) is not None:
                lines.append(f"    {field}: {getattr(rule, field)}")
        if rule.keep:
            lines.append("    keep: true")
    return "\n".join(lines) + "\n"


# ---- the search stage's part of quantize: a budget, the sensitivity table -> a recipe
def find_recipe(table: dict, base_dir, name: str, search: dict) -> tuple[Recipe, list[str], dict]:
    """The recipe that minimises the predicted KL (the table's, tasks/sensitivity.py) within the budget:
    search = {"budget_bpw" or "budget_bytes", "formats": [format dicts, None for float]}.
    Returns (recipe, its file's header lines, facts for the manifest). Raises BudgetError with both ends."""
    from tasks.plan import model_modules
    from tasks.specs import format_name

    modules, n_layers, _, facts = model_modules(base_dir)
    dtype = facts["dtype"]
    predicted = {(r["path"], r["format"]): r["predicted_kl"] for r in table["rows"]}
    allowed = search["formats"]
    units, costs, sizes, options = [], [], [], []
    for path, out_features, in_features, _ in modules:
        fmts = [f for f in formats_for(in_features, allowed) if f is None or (path, format_name(f)) in predicted]
        fmts = fmts or [None]  # a module nothing was measured for stays in float
        units.append((path, out_features, in_features))
        options.append(fmts)
        costs.append([0.0 if f is None else max(predicted[(path, format_name(f))], 0.0) for f in fmts])
        sizes.append([option_bits(out_features, in_features, f, dtype) for f in fmts])
    weights = sum(o * i for _, o, i in units)
    low, high = sum(min(s) for s in sizes), sum(max(s) for s in sizes)
    budget = int(search["budget_bytes"] * 8) if search.get("budget_bytes") else int(search["budget_bpw"] * weights)
    what = (f"{search['budget_bytes']} bytes" if search.get("budget_bytes")
            else f"{search['budget_bpw']:g} bits per weight")
    if not low <= budget <= high:
        raise BudgetError(f"search budget {what} is out of reach for {name}: with the {len(allowed)} formats allowed, "
                          f"this model's quantizable modules take from "
                          f"{low / weights:.3f} bits per weight ({low // 8} bytes) to {high / weights:.3f} ({high // 8} bytes)")
    chosen = solve(costs, sizes, budget)
    assignment = {u[0]: options[i][j] for i, (u, j) in enumerate(zip(units, chosen))}
    kl = sum(costs[i][j] for i, j in enumerate(chosen))
    bits = sum(sizes[i][j] for i, j in enumerate(chosen))
    check = table["summary"]["check"]
    recipe = compact(assignment, units, n_layers, name, dtype=dtype,
                     description=f"searched for {what}: predicted KL {kl:.4g} nats per token on the calibration text")
    header = [f"{name}: found by `qsweep search` (tasks/search.py) for {what}, from measured sensitivity",
              f"calibration text: {table['params']['calibration']} (sha256 {table['params'].get('calibration_sha256', '?')})",
              f"predicted mean KL from the base {kl:.4g} nats per token (the sum of each module's own; measured by",
              "the fidelity stage on another text); "
              f"{bits / weights:.3f} bits per weight, {bits // 8} bytes over the quantizable modules",
              f"the estimate's rank agreement with measurement on {check['modules']} modules: Spearman "
              f"{check['spearman'] if check['spearman'] is None else round(check['spearman'], 3)}"]
    return recipe, header, {"budget": what, "predicted_kl": kl, "bits_per_weight": bits / weights, "bytes": bits // 8,
                            "rules": len(recipe.rules), "formats": sorted({format_name(f) for f in assignment.values()})}
