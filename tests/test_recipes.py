"""Recipes: what bits each layer gets, checked against what mlx accepts."""

from dataclasses import replace

import pytest

from tasks.plan import bits_per_weight
from tasks.recipes import BUILTINS, MODES, Recipe, RecipeError, Rule, get_recipe


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_recipes_are_valid(name):
    recipe = BUILTINS[name]
    assert recipe.check() is recipe and recipe.name == name and recipe.description
    assert get_recipe(name) is recipe
    assert Recipe.from_params(recipe.params()) == replace(recipe, description="")


@pytest.mark.parametrize("recipe, field, allowed", [
    (Recipe("r7", bits=7), "bits 7", MODES["affine"]["bits"]),
    (Recipe("gs48", bits=4, group_size=48), "group_size 48", MODES["affine"]["group_size"]),
    (Recipe("foo", bits=4, mode="foo"), "mode 'foo'", MODES),
    (Recipe("mx", bits=8, group_size=32, mode="mxfp4"), "bits 8", MODES["mxfp4"]["bits"]),
    (Recipe("half", bits=4, dtype="float8"), "dtype 'float8'", ("bfloat16", "float16", "float32")),
    (Recipe("rule", bits=4, rules=(Rule("mlp", bits=7),)), "bits 7", MODES["affine"]["bits"]),
])
def test_bad_recipe_names_recipe_field_and_allowed_values(recipe, field, allowed):
    with pytest.raises(RecipeError) as err:
        recipe.check()
    message = str(err.value)
    assert f"recipe {recipe.name!r}" in message and field in message, message
    assert "allowed: " + ", ".join(map(str, allowed)) in message, message


def test_bad_regex_names_the_rule():
    with pytest.raises(RecipeError) as err:
        Recipe("regex", bits=4, rules=(Rule("(attn", bits=8),)).check()
    message = str(err.value)
    assert "recipe 'regex'" in message and "rules[0]" in message and "'(attn'" in message
    assert "regular expression" in message


def test_float_default_rule_needs_bits():
    with pytest.raises(RecipeError, match=r"recipe 'f'.*rules\[0\].*bits is required"):
        Recipe("f", rules=(Rule("mlp"),)).check()


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(RecipeError) as err:
        get_recipe("q7")
    assert "'q7'" in str(err.value) and all(name in str(err.value) for name in BUILTINS)


@pytest.mark.parametrize("path, bits", [
    ("model.layers.0.self_attn.q_proj", 8),
    ("model.layers.11.self_attn.k_proj", 8),
    ("model.layers.3.self_attn.v_proj", 8),
    ("model.layers.3.self_attn.o_proj", 8),
    ("lm_head", 8),
    ("model.embed_tokens", 8),
    ("model.layers.0.mlp.gate_proj", 6),
    ("model.layers.0.mlp.up_proj", 6),
    ("model.layers.29.mlp.down_proj", 6),
])
def test_qx86_hi_layers(path, bits):
    assert BUILTINS["qx86-hi"].layer(path) == {"bits": bits, "group_size": 32, "mode": "affine"}


def test_keep_rule_and_float_recipe_leave_layers_in_float():
    keep_head = Recipe("k", bits=4, rules=(Rule(r"lm_head$", keep=True),)).check()
    assert keep_head.layer("lm_head") is None
    assert keep_head.layer("model.layers.0.mlp.up_proj") == {"bits": 4, "group_size": 64, "mode": "affine"}
    assert BUILTINS["bf16"].layer("model.layers.0.mlp.up_proj") is None


def test_bits_per_weight_ordering():
    bpw = {name: bits_per_weight(recipe) for name, recipe in BUILTINS.items()}
    assert bpw["bf16"] == 16
    assert bpw["bf16"] > bpw["q8"] > bpw["q6"] > bpw["q5"] > bpw["q4"] > bpw["q3"] > bpw["q2"]
    assert bpw["q8-hi"] > bpw["q6-hi"] > bpw["q4-hi"]
    for bits in (8, 6, 4):  # smaller groups cost more scales
        assert bpw[f"q{bits}-hi"] > bpw[f"q{bits}"] > bits
    assert bpw["q6-hi"] < bpw["qx86-hi"] < bpw["q8-hi"]
    assert bpw["q5-hi"] < bpw["qx65-hi"] < bpw["q6-hi"]


# ---- layer selectors
@pytest.mark.parametrize("text, n, selected", [
    ("first 2", 6, [0, 1]),
    ("last 2", 6, [4, 5]),
    ("every 4", 10, [0, 4, 8]),
    ("every 3 from 1", 10, [1, 4, 7]),
    ("1-3", 6, [1, 2, 3]),
    ("0, 5", 6, [0, 5]),
    ("first 1, last 1", 6, [0, 5]),
    ("i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2", 30, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]),
])
def test_layer_selectors(text, n, selected):
    from tasks.recipes import layer_selector

    assert [i for i in range(n) if layer_selector(text)(i, n)] == selected


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "i.bit_length() > 1", "lambda: 1", "first", "i <"])
def test_layer_selector_refuses_anything_else(text):
    with pytest.raises(RecipeError) as err:
        Recipe("sel", bits=4, rules=(Rule("mlp", layers=text, bits=8),)).check()
    message = str(err.value)
    assert "recipe 'sel'" in message and "rules[0]" in message and "allowed" in message, message


def test_rules_with_layers_apply_by_index():
    r = Recipe("x", bits=4, rules=(Rule(r"self_attn", layers="every 2", bits=8),)).check()
    assert r.layer("model.layers.2.self_attn.q_proj", 4)["bits"] == 8
    assert r.layer("model.layers.3.self_attn.q_proj", 4)["bits"] == 4
    assert r.layer("lm_head", 4)["bits"] == 4  # no layer index: a layer rule does not apply


# ---- mlx-lm's mixed recipes, as our rules
def lazy_llama(n_layers: int):
    """A llama built from a config alone: parameters are never evaluated, so nothing is allocated."""
    from tasks.compat import model_classes

    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": n_layers,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False}
    model_class, args_class = model_classes(config)
    return model_class(args_class.from_dict(config))


@pytest.mark.parametrize("name", ["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"])
@pytest.mark.parametrize("n_layers", [4, 16, 30, 61])
def test_mixed_recipes_choose_what_mlx_lm_chooses(name, n_layers):
    from mlx_lm.convert import mixed_quant_predicate_builder

    model = lazy_llama(n_layers)
    theirs = mixed_quant_predicate_builder(name, model, group_size=64)
    ours = BUILTINS[name]
    paths = [p for p, m in model.named_modules() if hasattr(m, "to_quantized")]
    assert "lm_head" in paths and len(paths) == 7 * n_layers + 2
    for path in paths:
        assert ours.layer(path, n_layers) == theirs(path, None), path


# ---- recipe files
def test_every_builtin_is_a_file_a_user_can_copy(tmp_path):
    from tasks.recipes import RECIPE_DIR, load_recipe

    assert len(BUILTINS) >= 30
    (tmp_path / "recipes").mkdir()
    (tmp_path / "calibration.txt").write_bytes((RECIPE_DIR.parent / "calibration.txt").read_bytes())
    for name, recipe in BUILTINS.items():
        copy = tmp_path / "recipes" / f"{name}.yaml"
        copy.write_text((RECIPE_DIR / f"{name}.yaml").read_text())
        mine, theirs = load_recipe(copy).params(), recipe.params()
        if recipe.calibration:  # the copy names its own calibration file: the same bytes, so the same digest
            assert mine["calibration"].pop("text") == str(tmp_path / "calibration.txt")
            assert theirs["calibration"].pop("text") == "qsweep:data/calibration.txt"
        assert mine == theirs, name


def test_recipe_file_errors_name_the_file_field_and_allowed(tmp_path):
    from tasks.recipes import load_recipe

    bad = tmp_path / "mine.yaml"
    bad.write_text("name: mine\nbits: 4\nrules:\n  - match: mlp\n    bitz: 8\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    assert str(bad) in str(err.value) and "rules[0].bitz: unknown key" in str(err.value)
    assert "allowed keys: match, layers, bits, group_size, mode, keep" in str(err.value)
    bad.write_text("name: mine\nbits: 3\nmode: mxfp4\n")
    with pytest.raises(RecipeError, match=r"mine.yaml: recipe 'mine': bits 3 is not allowed for mode mxfp4; allowed: 4"):
        load_recipe(bad)


def test_toml_recipe_file(tmp_path):
    from tasks.recipes import load_recipe

    f = tmp_path / "mine.toml"
    f.write_text('name = "mine"\nbits = 4\ngroup_size = 32\n\n[[rules]]\nmatch = "lm_head"\nbits = 8\n\n'
                 '[[rules]]\nmatch = "mlp"\nlayers = "last 2"\nbits = 6\n')
    recipe = load_recipe(f)
    assert recipe.layer("lm_head", 8)["bits"] == 8
    assert recipe.layer("model.layers.7.mlp.up_proj", 8)["bits"] == 6
    assert recipe.layer("model.layers.0.mlp.up_proj", 8) == {"bits": 4, "group_size": 32, "mode": "affine"}
    assert get_recipe(str(f)) == recipe  # a sweep can name the file


# ---- plans
def test_plan_reports_rules_matching_nothing_and_fallbacks():
    from tasks.plan import make_plan

    recipe = Recipe("odd", bits=4, group_size=32, rules=(Rule("attention", bits=8), Rule("down_proj", group_size=128))).check()
    modules = [("model.layers.0.self_attn.q_proj", 64, 64, None), ("model.layers.0.mlp.down_proj", 64, 96, None)]
    plan = make_plan(recipe, modules, 1, source_dtype="bfloat16")
    down = plan.layers[1]
    assert down.quant is None and down.source == "fallback" and "96" in down.note and "128" in down.note
    warnings = "\n".join(plan.warnings())
    assert "rules[0] (match 'attention') matches no module" in warnings
    assert "model.layers.0.mlp.down_proj stays bfloat16" in warnings
    # no dtype known from the recipe or the config: the weights stay as stored
    assert "down_proj stays in float:" in "\n".join(make_plan(recipe, modules, 1).warnings())


def test_plan_from_a_config_reads_no_weights(tiny_model):
    from tasks.plan import format_plan, plan_for

    plan = plan_for(BUILTINS["qx86-hi"], tiny_model)
    table = format_plan(plan)
    assert "self_attn.q_proj" in table and "8-bit affine g32" in table and "6-bit affine g32" in table
    assert plan.n_layers == 4 and 6 < plan.bits_per_weight() < 8.5


# ---- the float type: the recipe's, else the one mlx_lm.convert picks from the config
def test_a_recipe_without_dtype_takes_the_float_type_convert_picks(tiny_model, tmp_path):
    """tests/test_quantize.py checks the written files against mlx_lm.convert; this, the plan's arithmetic."""
    import json
    import shutil

    from tasks.plan import format_plan, plan_for

    assert BUILTINS["q4"].dtype is None and BUILTINS["bf16"].dtype == "bfloat16"
    configs = {"torch_dtype": {"torch_dtype": "float32"}, "text_config": {"text_config": {"dtype": "float32"}},
               "dtype only": {"dtype": "float32"}}  # convert reads torch_dtype, else text_config's dtype, not dtype
    plans = {}
    for name, change in configs.items():
        model = shutil.copytree(tiny_model, tmp_path / name)
        config = json.loads((model / "config.json").read_text())
        config.pop("torch_dtype")
        (model / "config.json").write_text(json.dumps({**config, **change}))
        plans[name] = {recipe: plan_for(BUILTINS[recipe], model) for recipe in ("q4", "bf16", "qx86x-hi")}
    for name in ("torch_dtype", "text_config"):
        q4, bf16, qx = plans[name].values()
        assert q4.dtype == "float32" and bf16.dtype == "bfloat16"
        assert bf16.bits_per_weight() == 16 and bf16.rows()[0]["mode"] == "bfloat16"
        # fp32 scales and biases: 4 + 2 * 32 / 64 bits per weight, not 4 + 2 * 16 / 64
        assert q4.bits_per_weight() == 5
        assert {r["mode"] for r in qx.rows() if r["bits"] is None} == {"float32"}
    q4, bf16, qx = plans["dtype only"].values()
    assert q4.dtype is None and q4.bits_per_weight() == 4.5 and bf16.dtype == "bfloat16"
    assert {r["mode"] for r in qx.rows() if r["bits"] is None} == {"float"}
    assert "counted at 16 bits, an estimate" in format_plan(q4)
    assert "estimate" not in format_plan(plans["torch_dtype"]["q4"])


# ---- tied embeddings: no lm_head module, the output projection is the embedding
@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    from tasks.demo_model import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("tied") / "tiny-tied", tie_word_embeddings=True)


def test_a_rule_for_lm_head_on_a_tied_model_is_a_note_not_a_warning(tied_model, tiny_model):
    from tasks.plan import plan_for

    plan = plan_for(BUILTINS["qx86-hi"], tied_model)
    assert "lm_head" not in {p.path for p in plan.layers}
    assert plan.warnings() == []
    [note] = plan.notes()
    assert note.startswith("lm_head is tied to model.embed_tokens: the output projection uses the embedding's "
                           "8-bit affine, group size 32"), note
    assert "rules[1]" in note

    untied = plan_for(BUILTINS["qx86-hi"], tiny_model)  # its own lm_head: the rule applies
    head = next(p for p in untied.layers if p.path == "lm_head")
    assert head.source == "rule 1" and head.quant["bits"] == 8
    assert untied.warnings() == [] and untied.notes() == []

    mixed = plan_for(BUILTINS["mixed_3_6"], tied_model)  # mlx-lm's mixed_*: the embedding keeps the low bits
    assert mixed.warnings() == [] and "embedding's 3-bit affine, group size 64" in mixed.notes()[0]


def test_a_typo_on_a_tied_model_is_still_warned(tied_model):
    from tasks.plan import plan_for

    typo = Recipe("typo", bits=4, rules=(Rule(r"lm_haed$", bits=8), Rule(r"lm_head$", bits=8))).check()
    plan = plan_for(typo, tied_model)
    assert plan.warnings() == ["recipe 'typo': rules[0] (match 'lm_haed$') matches no module of this model"]
    assert len(plan.notes()) == 1 and "rules[1]" in plan.notes()[0] and "rules[0]" not in plan.notes()[0]


def test_recipes_show_prints_the_tied_note(tied_model, capsys):
    from flows.cli import main

    assert main(["recipes", "show", "qx86-hi", "--model", str(tied_model)]) == 0
    captured = capsys.readouterr()
    assert "note: lm_head is tied to model.embed_tokens" in captured.out
    assert "warning" not in captured.err


def test_gemma3_plan_ties_its_head_to_the_embedding_as_loading_does():
    """gemma3_text builds an lm_head and drops it at load when the weights have none; the plan from the
    config alone must be the loaded model's: the embedding takes the head's bits, and the plan says so."""
    from tasks.plan import plan_for

    plan = plan_for(BUILTINS["qx86-hi"], "demo://gemma3-270m")  # the GGUF's header only
    paths = {p.path for p in plan.layers}
    assert "lm_head" not in paths and "model.embed_tokens" in paths
    assert not any(p.endswith(("q_norm", "k_norm")) for p in paths)  # norms stay in float
    embedding = next(p for p in plan.layers if p.path == "model.embed_tokens")
    assert embedding.quant["bits"] == 8 and plan.warnings() == []
    [note] = plan.notes()
    assert note.startswith("lm_head is tied to model.embed_tokens") and "rules[1]" in note
