"""A recipe resolved for one model: every quantizable module with its bits, or float, and why.

The plan is what `qsweep recipes show` prints, what the quantize stage hands to
mlx_lm.convert as its predicate, and what the artifact's manifest and DuckDB's
`recipe_layers` table record. It comes from the model's config alone: the model
is built lazily, so no weights are read or allocated.

It mirrors mlx-lm's own rules for what cannot be quantized: mlx_lm.utils.quantize_model
leaves a module in float when its input width is not a multiple of the recipe's
(default) group size, and mx.quantize refuses a rule's group size that does not
divide the width. Both fall back to float here, and the plan says so.

Float modules are stored in the recipe's dtype, else in the one mlx_lm.convert picks from the
config (convert_dtype); where the config names none, the weights stay as stored and the plan's
sizes count them at 16 bits, an estimate. A model that ties its output projection to the
embedding has no lm_head module: the plan says so (notes) rather than warning about a rule
for lm_head that has nothing to match.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from tasks.recipes import DTYPES, Recipe, layer_index
from tasks.tables import console_table, human_bytes


@dataclass(frozen=True)
class LayerPlan:
    path: str
    layer: int | None
    out_features: int
    in_features: int
    quant: dict | None  # {"bits", "group_size", "mode"}, or None: float, in the plan's dtype
    source: str  # "default", "rule N", "model" (the model's own predicate), "fallback"
    note: str = ""

    @property
    def size(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    n_layers: int
    layers: tuple[LayerPlan, ...]
    dtype: str | None = None  # what float modules are stored in; None: as stored, not known from the config
    tied: str | None = None  # the embedding the output projection reuses, when the model has no lm_head of its own

    def bits_per_weight(self) -> float:
        """Storage bits per weight over the quantizable modules, scales and biases included."""
        total_bits = sum(_bits(p, self.dtype) for p in self.layers)
        return total_bits / max(1, sum(p.size for p in self.layers))

    def bytes(self) -> int:
        return int(sum(_bits(p, self.dtype) for p in self.layers) // 8)

    def fallbacks(self) -> list[LayerPlan]:
        return [p for p in self.layers if p.source == "fallback"]

    def tied_rules(self) -> list[int]:
        """Rules written for lm_head where the model ties lm_head to its embedding: they select nothing,
        since there is no lm_head to apply to (a rule that selects other modules too is not one)."""
        if self.tied is None:
            return []
        return [i for i in self.unmatched_rules()
                if self.recipe.rules[i].layers is None and re.search(self.recipe.rules[i].match, "lm_head")]

    def unmatched_rules(self) -> list[int]:
        """Rules that select no module of this model: usually a typo in the regex."""
        used = {p.source for p in self.layers}
        return [i for i in range(len(self.recipe.rules)) if f"rule {i}" not in used]

    def warnings(self) -> list[str]:
        out = []
        tied = set(self.tied_rules())
        for i in self.unmatched_rules():
            if i in tied:  # said in notes(): the model has no lm_head, not a typo
                continue
            rule = self.recipe.rules[i]
            out.append(f"recipe {self.recipe.name!r}: rules[{i}] (match {rule.match!r}"
                       f"{f', layers {rule.layers!r}' if rule.layers else ''}) matches no module of this model")
        for p in self.fallbacks():
            out.append(f"recipe {self.recipe.name!r}: {p.path} {p.note}")
        return out

    def notes(self) -> list[str]:
        """Facts about the plan a reader needs that are not warnings."""
        rules = self.tied_rules()
        if not rules:
            return []
        embedding = next(p for p in self.layers if p.path == self.tied)
        if embedding.quant is None:
            setting = f"float weights ({self.dtype or 'as stored'})"
        else:
            q = embedding.quant
            setting = f"{q['bits']}-bit {q['mode']}, group size {q['group_size']}"
        which = ", ".join(f"rules[{i}] (match {self.recipe.rules[i].match!r})" for i in rules)
        return [f"lm_head is tied to {self.tied}: the output projection uses the embedding's {setting}; "
                f"{which} of recipe {self.recipe.name!r} has no separate lm_head to apply to"]

    def rows(self) -> list[dict]:
        """One row per module, for the manifest and DuckDB."""
        return [{"path": p.path, "layer": p.layer, "out_features": p.out_features, "in_features": p.in_features,
                 "bits": p.quant["bits"] if p.quant else None,
                 "group_size": p.quant["group_size"] if p.quant else None,
                 "mode": p.quant["mode"] if p.quant else (self.dtype or "float"),
                 "source": p.source, "note": p.note} for p in self.layers]


def _bits(p: LayerPlan, dtype: str | None) -> int:
    float_bits = 32 if dtype == "float32" else 16  # unknown: 16, an estimate
    if p.quant is None:
        return p.size * float_bits
    # affine stores a scale and a bias per group in the model's float type; MX formats one 8-bit scale
    overhead = 2 * float_bits if p.quant["mode"] == "affine" else 8
    return p.size * p.quant["bits"] + p.size // p.quant["group_size"] * overhead


def convert_dtype(config: dict) -> str | None:
    """The dtype mlx_lm.convert casts to when given none (mlx_lm/convert.py): config.json's torch_dtype,
    else text_config's dtype, if that is a float type it converts to. None: the weights stay as stored
    (transformers-5 configs say `dtype`, which convert does not read)."""
    dtype = config.get("torch_dtype")
    if dtype is None and (text_config := config.get("text_config")):
        dtype = text_config.get("dtype")
    return dtype if dtype in DTYPES else None



def cast(model, dtype: str | None) -> None:
    """Cast the float parameters to `dtype` as mlx_lm.convert does before it quantizes (None: leave them)."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    if dtype is None:
        return
    to, keep = getattr(mx, dtype), getattr(model, "cast_predicate", lambda _: True)
    model.update(tree_map_with_path(
        lambda k, v: v.astype(to) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v, model.parameters()))

def make_plan(recipe: Recipe, modules: list[tuple[str, int, int, object]], n_layers: int,
              model_predicate=None, source_dtype: str | None = None, tied: str | None = None) -> Plan:
    """modules: (path, out features, in features, module or None) of every quantizable module.
    source_dtype: convert_dtype of the model's config; tied: the embedding's path where the model ties lm_head to it."""
    out = []
    dtype = recipe.dtype or source_dtype
    stays = f"stays {dtype}" if dtype else "stays in float"
    default_group = recipe.group_size if recipe.quantizes_any else None
    for path, out_features, in_features, module in modules:
        rule = recipe.rule_for(path, n_layers)
        quant, source = recipe.layer(path, n_layers), "default" if rule is None else f"rule {recipe.rules.index(rule)}"
        if rule is None and quant is not None and model_predicate is not None and module is not None:
            own = model_predicate(path, module)
            if own is False or isinstance(own, dict):
                quant, source = (dict(own) if own else None), "model"
        note = ""
        if quant is not None and default_group and in_features % default_group:
            note = (f"{stays}: its input width {in_features} is not a multiple of the recipe's "
                    f"group size {default_group} (mlx-lm leaves such modules unquantized)")
        elif quant is not None and in_features % quant["group_size"]:
            note = (f"{stays}: its input width {in_features} is not a multiple of group size "
                    f"{quant['group_size']} ({source})")
        if note:
            quant, source = None, "fallback"
        out.append(LayerPlan(path, layer_index(path), out_features, in_features, quant, source, note))
    return Plan(recipe, n_layers, tuple(out), dtype, tied)


def model_config(model: str | Path) -> dict:
    """config.json of a model directory, or of a source the download stage takes (a .gguf file, demo://...)."""
    import json
    import tempfile

    from tasks.download import resolve_source

    if Path(model).is_dir():
        return json.loads((Path(model) / "config.json").read_text())
    resolved = resolve_source(str(model))
    if resolved["kind"] == "gguf":
        from tasks.gguf import gguf_config
        return gguf_config(resolved["path"])
    if resolved["kind"] == "demo":
        from tasks.demo_model import make_demo_model
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads((make_demo_model(Path(tmp) / "m", seed=resolved["seed"]) / "config.json").read_text())
    raise ValueError(f"{model}: give a local model directory, a .gguf file or a demo:// model "
                     "(a plan reads the config only; download hub models with a sweep first)")


def model_modules(model: str | Path):
    """(modules, n_layers, the model's own quant predicate, {"dtype": convert_dtype, "tied": embedding path or None})
    from the config alone: no weights are read."""
    config = model_config(model)
    if config.get("quantization"):
        raise ValueError(f"{model} is already quantized; a plan starts from a float model")
    model_class, args_class = _classes(config, Path(model))
    model = model_class(args_class.from_dict(config))  # parameters stay lazy: never evaluated here
    modules = [(path, m.weight.shape[0], m.weight.shape[-1], m) for path, m in model.named_modules()
               if hasattr(m, "to_quantized") and hasattr(m, "weight")]
    modules.sort(key=lambda x: (x[0] != "model.embed_tokens", layer_index(x[0]) or 0, x[0]))
    if _config_ties(config) and any(m[0] == "lm_head" for m in modules):
        # e.g. gemma3_text builds an lm_head and drops it at load when the weights have none (its sanitize),
        # as a tied model's weights never do: the plan is the loaded model's
        modules = [m for m in modules if m[0] != "lm_head"]
    facts = {"dtype": convert_dtype(config), "tied": _tied_embedding(config, model, [m[0] for m in modules])}
    return modules, len(model.layers), getattr(model, "quant_predicate", None), facts


def _config_ties(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings")))


def _tied_embedding(config: dict, model, paths: list[str]) -> str | None:
    """The embedding's path when the model ties its output projection to it: mlx-lm then builds no
    lm_head and computes the logits with the embedding (embed_tokens.as_linear)."""
    if any(p.split(".")[-1] == "lm_head" for p in paths):
        return None
    tie = config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings"))
    if tie is None:  # the architecture's default, e.g. llama's ModelArgs ties unless told otherwise
        tie = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    return next((p for p in paths if p.split(".")[-1] == "embed_tokens"), None) if tie else None


def _classes(config: dict, model: Path):
    """mlx-lm's classes for the config's model_type, or the model's own (config `model_file`), as
    mlx_lm.load picks them; its own only where the sweep file allowed the model's code."""
    from tasks.compat import model_classes

    if not config.get("model_file"):
        return model_classes(config)
    from tasks.remote_code import RemoteCodeRefused, trusted

    if not trusted():
        raise RemoteCodeRefused(f"{model}: config.json model_file {config['model_file']!r} is the model's own code; "
                                "allow it with models[].trust_remote_code: true")
    import importlib.util

    spec = importlib.util.spec_from_file_location("custom_model", model / config["model_file"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Model, module.ModelArgs


def plan_for(recipe: Recipe, model: str | Path) -> Plan:
    modules, n_layers, predicate, facts = model_modules(model)
    return make_plan(recipe, modules, n_layers, predicate, facts["dtype"], facts["tied"])


# A typical small llama (SmolLM2-135M's shapes) for estimates without any model at hand.
REFERENCE_SHAPES = {"layers": 30, "hidden": 576, "ffn": 1536, "heads": 9, "kv_heads": 3, "vocab": 49152, "tied": True}


def reference_plan(recipe: Recipe, s: dict = REFERENCE_SHAPES) -> Plan:
    head_dim = s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head_dim
    mods = [("model.embed_tokens", s["vocab"], s["hidden"], None)]
    for i in range(s["layers"]):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        mods += [(f"{a}.q_proj", s["hidden"], s["hidden"], None), (f"{a}.k_proj", kv, s["hidden"], None),
                 (f"{a}.v_proj", kv, s["hidden"], None), (f"{a}.o_proj", s["hidden"], s["hidden"], None),
                 (f"{m}.gate_proj", s["ffn"], s["hidden"], None), (f"{m}.up_proj", s["ffn"], s["hidden"], None),
                 (f"{m}.down_proj", s["hidden"], s["ffn"], None)]
    if not s["tied"]:
        mods.append(("lm_head", s["vocab"], s["hidden"], None))
    return make_plan(recipe, mods, s["layers"], tied="model.embed_tokens" if s["tied"] else None)


def bits_per_weight(recipe: Recipe) -> float:
    """Estimated on REFERENCE_SHAPES: for listing recipes without a model."""
    return reference_plan(recipe).bits_per_weight()


def format_plan(plan: Plan) -> str:
    """The plan as a table: consecutive layers with the same settings for a module share a line."""
    def what(p: LayerPlan) -> str:
        if p.quant is None:
            return plan.dtype or "float"
        q = p.quant
        return f"{q['bits']}-bit {q['mode']} g{q['group_size']}"

    by_module: dict[str, list[LayerPlan]] = {}
    for p in plan.layers:
        name = p.path if p.layer is None else p.path.split(f".{p.layer}.", 1)[-1]
        by_module.setdefault(name, []).append(p)
    lines = []
    for name, entries in by_module.items():
        run = [entries[0]]
        for p in entries[1:] + [None]:
            if p is not None and (what(p), p.source) == (what(run[0]), run[0].source) and p.layer == run[-1].layer + 1:
                run.append(p)
                continue
            first, last = run[0].layer, run[-1].layer
            layers = "" if first is None else (f"{first}" if first == last else f"{first}-{last}")
            lines.append((layers, name, what(run[0]), run[0].source))
            run = [p]
    out = [console_table(["layers", "module", "quantization", "why"], lines)]
    out.append(f"bits per weight {plan.bits_per_weight():.3f} and {human_bytes(plan.bytes())} over the quantizable modules "
               f"({len(plan.layers)} modules, {plan.n_layers} layers)")
    if plan.dtype is None:
        out.append("(float weights and scales counted at 16 bits, an estimate: neither the recipe nor a model "
                   "config names the dtype; mlx_lm.convert then keeps the weights as stored)")
    out += [f"note: {note}" for note in plan.notes()]
    return "\n".join(out)
