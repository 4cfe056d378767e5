"""quantize: every built-in recipe on the tiny model, checked with mlx-lm and safetensors."""

import json
from pathlib import Path

import pytest
from mlx_lm import generate, load
from safetensors import safe_open

from tasks.quantize import quantize
from tasks.recipes import BUILTINS

# Learned recipes (gptq-4, awq-4) calibrate for a while: tests/test_learned.py covers them.
ROUNDED = {name: r for name, r in BUILTINS.items() if not r.method}
QUANTIZED = sorted(name for name, r in ROUNDED.items() if r.quantized)


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
    for name, recipe in ROUNDED.items():
        out = tmp_path_factory.mktemp(name)
        done[name] = (out, quantize(tiny_model, recipe, out))
    return done


@pytest.mark.parametrize("name", sorted(ROUNDED))
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

    plan = {row["path"]: row for row in info["plan"]}
    matrices = {k.removesuffix(".weight") for k, (_, shape) in base.items() if len(shape) == 2}
    assert set(plan) == matrices
    modules = {k.removesuffix(".scales") for k in got if k.endswith(".scales")}
    # what the plan leaves in float (a width no group size divides) is stored without scales; the rest is quantized
    assert modules == {p for p, row in plan.items() if row["bits"] is not None}
    for path in matrices:
        want = recipe.layer(path, 4)
        if plan[path]["source"] == "fallback":
            assert path not in modules and plan[path]["note"], path
            continue
        if want is None:  # a keep rule: stored in float; mlx_lm.load sees no scales and leaves it so
            assert path not in modules and plan[path]["bits"] is None, path
            continue
        assert config.get(path, defaults) == want, path  # how mlx_lm.load reads it
        assert (plan[path]["bits"], plan[path]["group_size"], plan[path]["mode"]) == tuple(want.values())
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


# mlx_lm.convert's own options for the recipes it also has: our output must be the same, tensor by tensor.
PEERS = {
    "q4": dict(q_bits=4, q_group_size=64),
    "q8-hi": dict(q_bits=8, q_group_size=32),
    "q3-g128": dict(q_bits=3, q_group_size=128),
    "mxfp4": dict(q_mode="mxfp4"),
    "nvfp4": dict(q_mode="nvfp4"),
    "mxfp8": dict(q_mode="mxfp8"),
    **{name: dict(quant_predicate=name, q_group_size=64) for name in ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")},
}


@pytest.mark.parametrize("name", sorted(PEERS))
def test_same_weights_and_config_as_mlx_lm_convert(quantized, tiny_model, tmp_path, name):
    import mlx.core as mx
    from mlx_lm import convert

    convert(str(tiny_model), mlx_path=str(tmp_path / "peer"), quantize=True, **PEERS[name])
    ours, theirs = quantized[name][0], tmp_path / "peer"
    a, b = mx.load(str(ours / "model.safetensors")), mx.load(str(theirs / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and mx.array_equal(a[k], b[k]).item(), k
    mine, peer = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    q_mine, q_peer = mine.pop("quantization"), peer.pop("quantization")
    mine.pop("quantization_config", None), peer.pop("quantization_config", None)  # copies of "quantization"
    assert mine == peer
    # the same per-module settings as mlx_lm.load reads them (mlx-lm's mixed_* list every module,
    # and give the unused default 4 bits; ours list the exceptions to a default that is used)
    modules = [k.removesuffix(".scales") for k in a if k.endswith(".scales")]
    assert effective(q_mine, modules) == effective(q_peer, modules)


def effective(quantization: dict, modules: list[str]) -> dict:
    """Each quantized module's settings as mlx_lm.load reads them: its own entry, else the defaults."""
    defaults = {k: v for k, v in quantization.items() if not isinstance(v, dict)}
    return {m: {**defaults, **quantization.get(m, {})} for m in modules}


def test_learned_recipe_runs_through_the_quantize_stage(tiny_model, tmp_path):
    from dataclasses import replace

    from tasks.recipes import with_calibration_digest

    gptq = BUILTINS["gptq-4"]
    assert gptq.calibration["text"] == "qsweep:data/calibration.txt" and len(gptq.calibration["sha256"]) == 64
    small = replace(gptq, calibration={k: v for k, v in gptq.calibration.items() if k != "sha256"}
                    | {"num_samples": 4, "sequence_length": 64})
    info = quantize(tiny_model, with_calibration_digest(small, Path(".")), tmp_path)
    assert info["learned"]["method"] == "gptq" and info["learned"]["calibration"]["sha256"] == gptq.calibration["sha256"]
    plan = {row["path"]: row for row in info["plan"]}
    assert plan["model.layers.0.mlp.up_proj"]["bits"] == 4
    assert plan["model.embed_tokens"]["bits"] == 6  # GPTQ does not learn embeddings: mlx-lm's fallback, as stored
    model, tokenizer = load(str(tmp_path))
    assert generate(model, tokenizer, "Hello", max_tokens=4)
