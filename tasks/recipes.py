"""Quantization recipes: what bits each layer of a model gets.

A recipe is data: a default (bits, group size, mode; bits=None means "stay in
float") and ordered rules. A rule matches module paths by regex; the first
matching rule wins and gives that module its own bits / group size / mode, or
`keep` to leave it in float. Everything else gets the default.
"""

import re
from dataclasses import asdict, dataclass, field

# What mlx's quantize accepts, per mode (mlx.core.quantize docs; checked on the CPU build).
MODES = {
    "affine": {"bits": (2, 3, 4, 5, 6, 8), "group_size": (32, 64, 128)},
    "mxfp4": {"bits": (4,), "group_size": (32,)},
    "nvfp4": {"bits": (4,), "group_size": (16,)},
    "mxfp8": {"bits": (8,), "group_size": (32,)},
}
DTYPES = ("bfloat16", "float16", "float32")

ATTENTION = r"\.self_attn\.(q|k|v|o)_proj$"
HEAD = r"(^|\.)lm_head$"
EMBEDDINGS = r"(^|\.)embed_tokens$"


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    match: str
    bits: int | None = None
    group_size: int | None = None
    mode: str | None = None
    keep: bool = False


@dataclass(frozen=True)
class Recipe:
    name: str
    bits: int | None = None  # None: no quantization, weights cast to `dtype`
    group_size: int = 64
    mode: str = "affine"
    dtype: str = "bfloat16"
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    description: str = ""

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def check(self) -> "Recipe":
        """Raise RecipeError naming the recipe, the field and the allowed values."""
        where = f"recipe {self.name!r}"
        if self.dtype not in DTYPES:
            raise RecipeError(f"{where}: dtype {self.dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
        if self.quantized:
            _check_quant(where, self.bits, self.group_size, self.mode)
        for i, rule in enumerate(self.rules):
            at = f"{where}: rules[{i}] (match {rule.match!r})"
            try:
                re.compile(rule.match)
            except re.error as e:
                raise RecipeError(f"{at}: match is not a valid regular expression ({e})") from None
            if not rule.keep:
                if not self.quantized and rule.bits is None:
                    raise RecipeError(f"{at}: bits is required when the recipe's default is float")
                _check_quant(at, rule.bits or self.bits, rule.group_size or self.group_size, rule.mode or self.mode)
        return self

    def layer(self, path: str) -> dict | None:
        """Quantization of one module: {"bits", "group_size", "mode"}, or None to keep it in float."""
        for rule in self.rules:
            if re.search(rule.match, path):
                if rule.keep:
                    return None
                return {
                    "bits": rule.bits or self.bits,
                    "group_size": rule.group_size or self.group_size,
                    "mode": rule.mode or self.mode,
                }
        if not self.quantized:
            return None
        return {"bits": self.bits, "group_size": self.group_size, "mode": self.mode}

    @property
    def quantizes_any(self) -> bool:
        return self.quantized or any(not r.keep for r in self.rules)

    def quant_predicate(self, model_predicate=None):
        """mlx-lm's quant_predicate: rule matches get their own dict (or False: keep); other modules
        the default, deferring to the model's own predicate where it has one (e.g. MoE gates at 8 bits)."""
        def predicate(path, module):
            for rule in self.rules:
                if re.search(rule.match, path):
                    return False if rule.keep else self.layer(path)
            if not self.quantized:
                return False
            return model_predicate(path, module) if model_predicate else True
        return predicate

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


def _deckard(name: str, high: int, low: int, group_size: int) -> Recipe:
    return Recipe(
        name, bits=low, group_size=group_size,
        rules=tuple(Rule(m, bits=high) for m in (ATTENTION, HEAD, EMBEDDINGS)),
        description=f"Deckard-style: attention q/k/v/o, lm_head and embeddings {high}-bit, "
                    f"other weights {low}-bit, group size {group_size}",
    )


def _builtins() -> dict[str, Recipe]:
    recipes = [Recipe("bf16", description="no quantization: weights in bfloat16 (the baseline row)")]
    for bits in (8, 6, 5, 4, 3, 2):
        recipes.append(Recipe(f"q{bits}", bits=bits, group_size=64, description=f"uniform affine {bits}-bit, group size 64"))
        recipes.append(Recipe(f"q{bits}-hi", bits=bits, group_size=32, description=f"uniform affine {bits}-bit, group size 32"))
    recipes.append(_deckard("qx86-hi", 8, 6, 32))
    recipes.append(_deckard("qx65-hi", 6, 5, 32))
    return {r.name: r.check() for r in recipes}


BUILTINS = _builtins()


def get_recipe(name: str) -> Recipe:
    if name not in BUILTINS:
        raise RecipeError(f"unknown recipe {name!r}; allowed: {', '.join(BUILTINS)} (or an inline recipe with name and bits)")
    return BUILTINS[name]


# A typical small llama (SmolLM2-135M's shapes) for estimates without any weights.
REFERENCE_SHAPES = {"layers": 30, "hidden": 576, "ffn": 1536, "heads": 9, "kv_heads": 3, "vocab": 49152, "tied": True}


def reference_modules(s=REFERENCE_SHAPES) -> list[tuple[str, int, int]]:
    """(path, out features, in features) of a llama's quantizable modules."""
    head_dim = s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head_dim
    mods = [("model.embed_tokens", s["vocab"], s["hidden"])]
    for i in range(s["layers"]):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        mods += [(f"{a}.q_proj", s["hidden"], s["hidden"]), (f"{a}.k_proj", kv, s["hidden"]),
                 (f"{a}.v_proj", kv, s["hidden"]), (f"{a}.o_proj", s["hidden"], s["hidden"]),
                 (f"{m}.gate_proj", s["ffn"], s["hidden"]), (f"{m}.up_proj", s["ffn"], s["hidden"]),
                 (f"{m}.down_proj", s["hidden"], s["ffn"])]
    if not s["tied"]:
        mods.append(("lm_head", s["vocab"], s["hidden"]))
    return mods


def bits_per_weight(recipe: Recipe, modules=None) -> float:
    """Estimated storage bits per weight over the quantizable modules, scales included."""
    modules = modules or reference_modules()
    total_bits = total = 0
    for path, out_features, in_features in modules:
        n = out_features * in_features
        q = recipe.layer(path)
        if q is None:
            total_bits += n * (32 if recipe.dtype == "float32" else 16)
        else:
            # affine stores a float16 scale and bias per group; MX formats an 8-bit scale
            overhead = 32 if q["mode"] == "affine" else 8
            total_bits += n * q["bits"] + n // q["group_size"] * overhead
        total += n
    return total_bits / total
