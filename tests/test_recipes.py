"""Recipes: what bits each layer gets, checked against what mlx accepts."""

from dataclasses import replace

import pytest

from tasks.recipes import BUILTINS, MODES, Recipe, RecipeError, Rule, bits_per_weight, get_recipe


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
