"""quantize: every built-in recipe on the tiny model, checked with mlx-lm and safetensors."""

import json
from pathlib import Path

import pytest
from mlx_lm import generate, load
from safetensors import safe_open

from tasks.quantize import quantize
from tasks.recipes import BUILTINS

QUANTIZED = sorted(name for name, r in BUILTINS.items() if r.quantized)


def tensors(model_dir: Path) -> dict:
    """name -> (dtype, shape) of every tensor in the model's safetensors files."""
    found = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():
                s = st.get_slice(k)
                found[k] = (s.get_dtype(), tuple(s.get_shape()))
    return found


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory):
    """recipe name -> (output dir, returned info), for every built-in recipe."""
    done = {}
    for name, recipe in BUILTINS.items():
        out = tmp_path_factory.mktemp(name)
        done[name] = (out, quantize(tiny_model, recipe, out))
    return done


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_output_loads_and_generates(quantized, name):
    out, info = quantized[name]
    assert info["recipe"] == name
    model, tokenizer = load(str(out))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    assert generate(model, tokenizer, prompt, max_tokens=8)


@pytest.mark.parametrize("name", QUANTIZED)
def test_every_module_gets_the_recipes_bits(quantized, tiny_model, name):
    out, info = quantized[name]
    recipe = BUILTINS[name]
    base = tensors(tiny_model)
    got = tensors(out)
    config = json.loads((out / "config.json").read_text())["quantization"]
    defaults = {k: v for k, v in config.items() if not isinstance(v, dict)}
    assert defaults == {"bits": recipe.bits, "group_size": recipe.group_size, "mode": recipe.mode}
    assert info["defaults"] == defaults

    modules = {k.removesuffix(".scales") for k in got if k.endswith(".scales")}
    # the tiny model's widths suit every group size: every matrix is quantized
    assert modules == {k.removesuffix(".weight") for k, (_, shape) in base.items() if len(shape) == 2}
    for path in modules:
        want = recipe.layer(path)
        assert config.get(path, defaults) == want, path  # how mlx_lm.load reads it
        # ...and what is stored has that many bits and groups
        in_features = base[path + ".weight"][1][-1]
        assert got[path + ".weight"][1][-1] == in_features * want["bits"] // 32, path
        assert got[path + ".scales"][1][-1] == in_features // want["group_size"], path
    assert set(info["layers"]) == {p for p in modules if isinstance(config.get(p), dict)}


def test_mixed_recipe_writes_per_layer_entries(quantized):
    layers = quantized["qx86-hi"][1]["layers"]
    assert "lm_head" in layers and "model.embed_tokens" in layers
    assert any(p.endswith("self_attn.q_proj") for p in layers)
    assert not any(".mlp." in p for p in layers)  # those take the 6-bit default


def test_bf16_stays_in_bfloat16(quantized):
    out, info = quantized["bf16"]
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert info["defaults"] == {} and info["layers"] == {}
    found = tensors(out)
    assert not any(k.endswith((".scales", ".biases")) for k in found)
    assert {dtype for dtype, _ in found.values()} == {"BF16"}


def test_fewer_bits_smaller_model(quantized):
    metric = {name: {r["metric"]: r["value"] for r in info["metrics"]} for name, (_, info) in quantized.items()}
    for suffix in ("", "-hi"):
        chain = ["bf16"] + [f"q{b}{suffix}" for b in (8, 6, 5, 4, 3, 2)]
        bpw = [metric[n]["bits_per_weight"] for n in chain]
        size = [metric[n]["weight_bytes"] for n in chain]
        assert bpw == sorted(bpw, reverse=True) and len(set(bpw)) == len(bpw), dict(zip(chain, bpw))
        assert size == sorted(size, reverse=True), dict(zip(chain, size))
    assert metric["q6-hi"]["bits_per_weight"] < metric["qx86-hi"]["bits_per_weight"] < metric["q8-hi"]["bits_per_weight"]
    for name, (out, _) in quantized.items():
        assert metric[name]["weight_bytes"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))


@pytest.mark.parametrize("name", ["q4", "qx86-hi"])
def test_same_input_same_bytes(quantized, tiny_model, tmp_path, name):
    first, _ = quantized[name]
    quantize(tiny_model, BUILTINS[name], tmp_path)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for n in names:
        assert (first / n).read_bytes() == (tmp_path / n).read_bytes(), n


def test_rules_apply_under_a_float_default(tiny_model, tmp_path):
    """bits: null keeps the model in float, except where a rule says otherwise."""
    from tasks.recipes import Recipe, Rule

    recipe = Recipe("head-only", bits=None, rules=(Rule(r"(^|\.)lm_head$", bits=8, group_size=32),)).check()
    info = quantize(tiny_model, recipe, tmp_path)
    scaled = {k.removesuffix(".scales") for k in tensors(tmp_path) if k.endswith(".scales")}
    assert scaled == {"lm_head"}
    assert info["layers"]["lm_head"] == {"bits": 8, "group_size": 32, "mode": "affine"}
    assert load(str(tmp_path))[0] is not None
