"""Quantization recipes: what bits each layer of a model gets.

A recipe is data (a YAML or TOML file, or a mapping in the sweep file): a default
(bits, group size, mode; no bits means "stay in float") and ordered rules. A rule
matches module paths by regex and optionally layer indices, and gives its modules
their own bits / group size / mode, or `keep` to leave them in float. The first
matching rule wins; everything else gets the default. The built-ins are files in
tasks/data/recipes/ that a user can copy.

`dtype` is the float type of what stays in float (and of affine scales and biases).
Left out (null), mlx_lm.convert decides, as it does when given no --dtype: the source
config's torch_dtype (else text_config's dtype) when that names a float type, else the
weights as stored. So a uniform recipe writes what plain `mlx_lm.convert` writes, whatever
the source's dtype. Learned recipes follow the same rule. bfloat16, float16 or float32 casts.

Layer selectors (`layers:` on a rule), with n the model's number of layers:
  [0, 1, 5]  "3-7"  "first 4"  "last 4"  "every 4"  "every 4 from 2"  (comma-separated to combine)
  or an expression in i and n, e.g. "i < n // 8 or (i - n // 8) % 3 == 2" (mlx-lm's mixed_* choice).
"""

import ast
import functools
import hashlib
import operator
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from tasks.specs import MODES, SAFE_NAME, Strict, shipped_path, shipped_ref, spec_errors

DTYPES = ("bfloat16", "float16", "float32")
# Learned methods run mlx-lm's own implementations (tasks/learned.py), with the bits they support.
METHODS = {"gptq": (2, 4, 8), "awq": (2, 3, 4, 5, 6, 8)}
CALIBRATION_KEYS = ("text", "num_samples", "sequence_length", "seed")  # a learned recipe's calibration: all required
RECIPE_DIR = Path(__file__).parent / "data" / "recipes"


class RecipeError(ValueError):
    pass


# ---- the file format (also a recipe inline in a sweep file)
class RuleSpec(Strict):
    match: str = ""
    layers: str | int | list[int] | None = None
    bits: int | None = None
    group_size: int | None = None
    mode: str | None = None
    keep: bool = False


class RecipeSpec(Strict):
    name: str = Field(pattern=f"^{SAFE_NAME}$")
    bits: int | None
    group_size: int = 64
    mode: str = "affine"
    dtype: str | None = None  # None: as mlx_lm.convert decides (see the module docstring)
    rules: list[RuleSpec] = []
    method: str | None = None  # gptq | awq: learned from calibration text instead of rounded
    calibration: dict | None = None  # {text, num_samples, sequence_length, seed}; part of the key
    description: str = ""


@dataclass(frozen=True)
class Rule:
    match: str = ""
    bits: int | None = None
    group_size: int | None = None
    mode: str | None = None
    keep: bool = False
    layers: str | None = None  # a selector, kept as written (canonical text) so it is part of the key

    def selects(self, path: str, n_layers: int | None) -> bool:
        if not re.search(self.match, path):
            return False
        if self.layers is None:
            return True
        i = layer_index(path)
        return i is not None and n_layers is not None and layer_selector(self.layers)(i, n_layers)


@dataclass(frozen=True)
class Recipe:
    name: str
    bits: int | None = None  # None: no quantization, weights stay in float
    group_size: int = 64
    mode: str = "affine"
    dtype: str | None = None  # float type written; None: as mlx_lm.convert decides
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    method: str | None = None
    calibration: dict | None = None
    description: str = ""

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def check(self) -> "Recipe":
        """Raise RecipeError naming the recipe, the field and the allowed values."""
        where = f"recipe {self.name!r}"
        if self.dtype is not None and self.dtype not in DTYPES:
            raise RecipeError(f"{where}: dtype {self.dtype!r} is not allowed; allowed: {', '.join(DTYPES)} "
                              "(or null: as mlx_lm.convert decides)")
        if self.quantized:
            _check_quant(where, self.bits, self.group_size, self.mode)
        if self.method is not None:
            if self.method not in METHODS:
                raise RecipeError(f"{where}: method {self.method!r} is not allowed; allowed: {', '.join(METHODS)}")
            if self.bits not in METHODS[self.method] or self.mode != "affine" or self.rules:
                raise RecipeError(f"{where}: method {self.method} takes affine bits "
                                  f"{', '.join(map(str, METHODS[self.method]))} and no rules")
            missing = set(CALIBRATION_KEYS) - set(self.calibration or {})
            unknown = set(self.calibration or {}) - {*CALIBRATION_KEYS, "sha256"}  # sha256: added on reading
            if unknown:
                raise RecipeError(f"{where}: calibration.{sorted(unknown)[0]}: unknown key; "
                                  f"allowed keys: {', '.join(CALIBRATION_KEYS)}")
            if missing:
                raise RecipeError(f"{where}: calibration lacks {', '.join(sorted(missing))}; "
                                  f"allowed keys: {', '.join(CALIBRATION_KEYS)}")
        for i, rule in enumerate(self.rules):
            at = f"{where}: rules[{i}] (match {rule.match!r})"
            try:
                re.compile(rule.match)
            except re.error as e:
                raise RecipeError(f"{at}: match is not a valid regular expression ({e})") from None
            if rule.layers is not None:
                try:
                    layer_selector(rule.layers)
                except ValueError as e:
                    raise RecipeError(f"{at}: layers {rule.layers!r}: {e}") from None
            if not rule.keep:
                if not self.quantized and rule.bits is None:
                    raise RecipeError(f"{at}: bits is required when the recipe's default is float")
                _check_quant(at, rule.bits or self.bits, rule.group_size or self.group_size, rule.mode or self.mode)
        return self

    def layer(self, path: str, n_layers: int | None = None) -> dict | None:
        """Quantization of one module: {"bits", "group_size", "mode"}, or None to keep it in float."""
        rule = self.rule_for(path, n_layers)
        if rule is not None:
            if rule.keep:
                return None
            return {"bits": rule.bits or self.bits, "group_size": rule.group_size or self.group_size,
                    "mode": rule.mode or self.mode}
        if not self.quantized:
            return None
        return {"bits": self.bits, "group_size": self.group_size, "mode": self.mode}

    def rule_for(self, path: str, n_layers: int | None = None) -> Rule | None:
        return next((r for r in self.rules if r.selects(path, n_layers)), None)

    @property
    def quantizes_any(self) -> bool:
        return self.quantized or any(not r.keep for r in self.rules)

    def params(self) -> dict:
        """Canonical parameters: what goes into the quantize stage's key (not the description)."""
        p = asdict(self)
        p.pop("description")
        p["rules"] = [asdict(r) for r in self.rules]
        return p

    @classmethod
    def from_params(cls, p: dict) -> "Recipe":
        p = dict(p)
        p["rules"] = tuple(Rule(**r) for r in p.get("rules", ()))
        return cls(**p)


def _check_quant(where, bits, group_size, mode):
    if mode not in MODES:
        raise RecipeError(f"{where}: mode {mode!r} is not allowed; allowed: {', '.join(MODES)}")
    allowed = MODES[mode]
    if bits not in allowed["bits"]:
        raise RecipeError(f"{where}: bits {bits} is not allowed for mode {mode}; allowed: {', '.join(map(str, allowed['bits']))}")
    if group_size not in allowed["group_size"]:
        raise RecipeError(
            f"{where}: group_size {group_size} is not allowed for mode {mode}; "
            f"allowed: {', '.join(map(str, allowed['group_size']))}"
        )


# ---- layer selectors
def layer_index(path: str) -> int | None:
    """The first all-digit component of a module path (model.layers.12.mlp -> 12), as mlx-lm finds it."""
    return next((int(part) for part in path.split(".") if part.isdigit()), None)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
        ast.GtE: operator.ge, ast.Eq: operator.eq, ast.NotEq: operator.ne}


def _evaluate(node, i: int, n: int):
    """A selector expression: integers, i, n, + - * // %, comparisons, and / or / not. Nothing else."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, i, n)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Name) and node.id in ("i", "n"):
        return i if node.id == "i" else n
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left, i, n), _evaluate(node.right, i, n))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        value = _evaluate(node.operand, i, n)
        return (not value) if isinstance(node.op, ast.Not) else -value
    if isinstance(node, ast.BoolOp):
        values = [_evaluate(v, i, n) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare) and all(type(op) in _OPS for op in node.ops):
        left = _evaluate(node.left, i, n)
        for op, right in zip(node.ops, node.comparators):
            right = _evaluate(right, i, n)
            if not _OPS[type(op)](left, right):
                return False
            left = right
        return True
    raise ValueError(f"{ast.unparse(node)!r} is not allowed in a layer expression (integers, i, n, + - * // %, "
                     "comparisons, and/or/not)")


def layer_selector(text: str):
    """(i, n) -> bool for a selector's text; raises ValueError saying what is allowed."""
    parts = []
    for piece in str(text).split(","):
        piece = piece.strip()
        if m := re.fullmatch(r"(\d+)", piece):
            parts.append(lambda i, n, a=int(m[1]): i == a)
        elif m := re.fullmatch(r"(\d+)\s*-\s*(\d+)", piece):
            parts.append(lambda i, n, a=int(m[1]), b=int(m[2]): a <= i <= b)
        elif m := re.fullmatch(r"first\s+(\d+)", piece):
            parts.append(lambda i, n, k=int(m[1]): i < k)
        elif m := re.fullmatch(r"last\s+(\d+)", piece):
            parts.append(lambda i, n, k=int(m[1]): i >= n - k)
        elif m := re.fullmatch(r"every\s+(\d+)(?:\s+from\s+(\d+))?", piece):
            k, start = int(m[1]), int(m[2] or 0)
            if k < 1:
                raise ValueError("every k needs k >= 1")
            parts.append(lambda i, n, k=k, s=start: i >= s and (i - s) % k == 0)
        else:
            try:
                tree = ast.parse(str(text), mode="eval")
            except SyntaxError:
                raise ValueError("allowed: a list of indices, 'a-b', 'first k', 'last k', 'every k [from s]', "
                                 "or an expression in i and n") from None
            _evaluate(tree, 0, 8)  # refuses what is not allowed, now rather than at quantize time
            return lambda i, n: bool(_evaluate(tree, i, n))
    return lambda i, n: any(p(i, n) for p in parts)


def canonical_layers(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, list):
        return ", ".join(str(int(v)) for v in value)
    return str(value)


# ---- reading recipes
def recipe_from_spec(spec: RecipeSpec) -> Recipe:
    calibration = dict(spec.calibration) if spec.calibration else None
    return Recipe(
        name=spec.name, bits=spec.bits, group_size=spec.group_size, mode=spec.mode, dtype=spec.dtype,
        rules=tuple(Rule(**{**r.model_dump(), "layers": canonical_layers(r.layers)}) for r in spec.rules),
        method=spec.method, calibration=calibration, description=spec.description,
    )


def load_recipe(path: Path | str) -> Recipe:
    """A recipe file (YAML or TOML), checked; errors name the file, the field and what is allowed."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as e:  # yaml and toml both say where
        raise RecipeError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping with keys {', '.join(RecipeSpec.model_fields)}")
    try:
        spec = RecipeSpec.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{path}: invalid recipe:\n  " + "\n  ".join(spec_errors(e.errors(), RecipeSpec))) from None
    recipe = recipe_from_spec(spec)
    try:
        recipe.check()
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    if recipe.calibration:
        recipe = with_calibration_digest(recipe, path.parent)
    return recipe


def with_calibration_digest(recipe: Recipe, relative_to: Path) -> Recipe:
    """The calibration text as a portable reference plus the sha256 of its bytes: both go into the key.

    A relative path is taken from `relative_to` (the recipe file's folder); a file that ships
    with qsweep is named "qsweep:<path under tasks/>", the same in every checkout.
    """
    text = shipped_path(recipe.calibration["text"], relative_to)
    if not text.is_file():
        raise RecipeError(f"recipe {recipe.name!r}: calibration.text {recipe.calibration['text']!r}: no such file")
    digest = hashlib.sha256(text.read_bytes()).hexdigest()
    return replace(recipe, calibration={**recipe.calibration, "text": shipped_ref(text), "sha256": digest})




# ---- the built-ins
BUILTIN_ORDER = ["bf16"] + [f"q{b}{s}" for b in (8, 6, 5, 4, 3, 2) for s in ("", "-hi", "-g128")] + [
    "mxfp8", "mxfp4", "nvfp4", "mixed_4_6", "mixed_3_6", "mixed_3_4", "mixed_2_6",
    "qx86-hi", "qx86x-hi", "qx65-hi", "qx65x-hi", "qx64-hi", "qx64x-hi", "qx53", "qx53x", "gptq-4", "awq-4"]


@functools.cache
def builtin_recipes() -> dict[str, Recipe]:
    """The recipe files in tasks/data/recipes/ by name, in BUILTIN_ORDER: read on first use, not on import."""
    recipes = [load_recipe(f) for f in sorted(RECIPE_DIR.glob("*.yaml"))]
    order = {name: i for i, name in enumerate(BUILTIN_ORDER)}
    return {r.name: r for r in sorted(recipes, key=lambda r: (order.get(r.name, len(order)), r.name))}


def __getattr__(name: str):
    if name == "BUILTINS":  # `from tasks.recipes import BUILTINS` reads them then
        return builtin_recipes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_recipe(name: str) -> Recipe:
    """A built-in by name, or a recipe file by path (ending in .yaml, .yml or .toml)."""
    if name.endswith((".yaml", ".yml", ".toml")):
        return load_recipe(name)
    builtins = builtin_recipes()
    if name not in builtins:
        raise RecipeError(f"unknown recipe {name!r}; allowed: {', '.join(builtins)} "
                          "(or a recipe file, or an inline recipe with name and bits)")
    return builtins[name]
