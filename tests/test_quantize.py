"""quantize: every built-in recipe on the tiny model, checked with mlx-lm and safetensors."""

import hashlib
import json
import re
import shutil
import threading
import time
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
    from mlx_lm import convert

    convert(str(tiny_model), mlx_path=str(tmp_path / "peer"), quantize=True, **PEERS[name])
    assert_same_as_convert(quantized[name][0], tmp_path / "peer")


def digests(model_dir: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir()) if p.is_file()}


@pytest.mark.parametrize("name, weights", [("q4", None), ("qx86-hi", None), ("mxfp4", None), ("bf16", "float32")])
def test_every_file_as_mlx_lm_convert_writes_it(tiny_model, tmp_path, name, weights):
    """Byte for byte what mlx_lm.convert writes when handed the same recipe: its options and the
    plan as quant_predicate. bf16 starts from float32 weights, so its cast is what is compared."""
    from mlx_lm import convert

    from tasks.plan import plan_for
    from tasks.quantize import quant_predicate

    recipe = BUILTINS[name]
    base = source(tiny_model, tmp_path / "base", weights, torch_dtype=weights) if weights else tiny_model
    quantize(base, recipe, tmp_path / "ours")
    q = recipe.quantizes_any
    convert(str(base), mlx_path=str(tmp_path / "peer"), quantize=q, q_bits=recipe.bits,
            q_group_size=recipe.group_size if q else None, q_mode=recipe.mode, dtype=recipe.dtype,
            quant_predicate=quant_predicate(plan_for(recipe, base)) if q else None)
    ours, peer = digests(tmp_path / "ours"), digests(tmp_path / "peer")
    assert "model.safetensors" in ours and "config.json" in ours
    assert ours == peer


def test_two_quantizes_in_threads_overlap_and_other_output_gets_through(tmp_path, capfd, monkeypatch):
    """No process-wide lock or stdout swap: two cells' quantize stages work at the same time, every
    line a third thread prints meanwhile reaches the real stdout, and each writes what it writes alone."""
    import mlx_lm.utils

    from tasks.demo_model import make_demo_model

    # ~180 MB of bfloat16: one quantize takes ~0.5 s on 2 cores, long enough to see the overlap.
    base = make_demo_model(tmp_path / "base", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=128)
    spans, saves, printed = {}, {}, []

    # The weights load and quantize lazily: mlx-lm's save is where they are computed and written.
    # Timing it (the real one runs) tells two calls working at once from one waiting for the other.
    real_save = mlx_lm.utils.save

    def timed_save(dst, *args, **kwargs):
        start = time.monotonic()
        real_save(dst, *args, **kwargs)
        saves[Path(dst).name] = (start, time.monotonic())

    monkeypatch.setattr(mlx_lm.utils, "save", timed_save)

    def run(name):
        start = time.monotonic()
        quantize(base, BUILTINS[name], tmp_path / name)
        spans[name] = (start, time.monotonic())

    def chatter():
        while any(t.is_alive() for t in cells):
            printed.append(f"<third thread {len(printed)}>")
            print(printed[-1], flush=True)
            time.sleep(0.02)

    cells = [threading.Thread(target=run, args=(name,)) for name in ("q4", "q8")]
    for t in cells:
        t.start()
    third = threading.Thread(target=chatter)
    third.start()
    for t in cells + [third]:
        t.join()

    for timed in (spans, saves):
        (a0, a1), (b0, b1) = timed["q4"], timed["q8"]
        assert max(a0, b0) < min(a1, b1), timed  # each starts before the other ends
    # print() writes the text and the newline apart, so lines of two threads may interleave mid-line.
    assert len(printed) > 5 and re.findall(r"<third thread \d+>", capfd.readouterr().out) == printed
    monkeypatch.undo()
    for name in ("q4", "q8"):
        quantize(base, BUILTINS[name], tmp_path / f"{name}-alone")
        assert digests(tmp_path / name) == digests(tmp_path / f"{name}-alone"), name


def assert_same_as_convert(ours: Path, theirs: Path):
    """The same tensors (dtype, shape, values) and the same config.json as mlx_lm.convert wrote."""
    import mlx.core as mx

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


def source(tiny_model: Path, out: Path, weights: str, **config) -> Path:
    """The tiny model with its weights cast to `weights` and its config's torch_dtype replaced by `config`."""
    import mlx.core as mx

    shutil.copytree(tiny_model, out)
    cast = {k: v.astype(getattr(mx, weights)) for k, v in mx.load(str(out / "model.safetensors")).items()}
    mx.save_safetensors(str(out / "model.safetensors"), cast, metadata={"format": "pt"})
    found = json.loads((out / "config.json").read_text())
    found.pop("torch_dtype")
    (out / "config.json").write_text(json.dumps({**found, **config}, indent=2))
    return out


# (weights stored as, config) -> what mlx_lm.convert writes when given no dtype. convert reads
# config.json's torch_dtype (else text_config's dtype) and ignores transformers-5's top-level `dtype`:
# such weights stay as stored, here float32 although the config says bfloat16.
SOURCES = {
    "float16": ("float16", {"torch_dtype": "float16"}, "float16"),
    "float32": ("float32", {"torch_dtype": "float32"}, "float32"),
    "bfloat16": ("bfloat16", {"torch_dtype": "bfloat16"}, "bfloat16"),
    "dtype-key-only": ("float32", {"dtype": "bfloat16"}, "float32"),
    "cast-by-config": ("float32", {"torch_dtype": "float16"}, "float16"),
}


@pytest.mark.parametrize("name", ["q4", "mxfp4"])
@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_same_as_plain_mlx_lm_convert_whatever_the_source_dtype(tiny_model, tmp_path, kind, name):
    from mlx_lm import convert

    weights, config, written = SOURCES[kind]
    base = source(tiny_model, tmp_path / "base", weights, **config)
    info = quantize(base, BUILTINS[name], tmp_path / "ours")
    convert(str(base), mlx_path=str(tmp_path / "peer"), quantize=True, **PEERS[name])  # no dtype, as a user types it
    assert_same_as_convert(tmp_path / "ours", tmp_path / "peer")
    assert info["dtype"] == written  # read from the written files
    floats = {d for d, _ in tensors(tmp_path / "ours").values()} - {"U32", "U8"}
    assert floats == {{"float16": "F16", "float32": "F32", "bfloat16": "BF16"}[written]}


def test_an_explicit_dtype_casts_as_convert_does(tiny_model, tmp_path):
    from dataclasses import replace

    from mlx_lm import convert

    base = source(tiny_model, tmp_path / "base", "float16", torch_dtype="float16")
    info = quantize(base, replace(BUILTINS["q4"], name="q4-bf16", dtype="bfloat16"), tmp_path / "ours")
    convert(str(base), mlx_path=str(tmp_path / "peer"), quantize=True, q_bits=4, q_group_size=64, dtype="bfloat16")
    assert_same_as_convert(tmp_path / "ours", tmp_path / "peer")
    assert info["dtype"] == "bfloat16"
    # ...and the default keeps the source's float16: what differed from plain convert before
    assert quantize(base, BUILTINS["q4"], tmp_path / "default")["dtype"] == "float16"


def test_float_modules_report_the_dtype_written(tiny_model, tmp_path):
    """The realised plan says what a float module was written in, from the files, not from the recipe."""
    base = source(tiny_model, tmp_path / "base", "float16", torch_dtype="float16")
    info = quantize(base, BUILTINS["qx86x-hi"], tmp_path / "ours")
    kept = [row for row in info["plan"] if row["bits"] is None]
    assert kept and all(".self_attn." in row["path"] for row in kept)
    stored = tensors(tmp_path / "ours")
    assert {stored[row["path"] + ".weight"][0] for row in kept} == {"F16"}
    assert {row["mode"] for row in kept} == {"float16"} and info["dtype"] == "float16"


def test_tied_model_notes_instead_of_warnings(tmp_path):
    """A tied model has no lm_head: the qx rule for it is a note (for the card), not a warning; a typo still warns."""
    from tasks.demo_model import make_demo_model
    from tasks.recipes import Recipe, Rule

    tied = make_demo_model(tmp_path / "tied", tie_word_embeddings=True)
    info = quantize(tied, BUILTINS["qx86-hi"], tmp_path / "qx")
    assert info["warnings"] == []
    assert [n.split(":")[0] for n in info["notes"]] == ["lm_head is tied to model.embed_tokens"]
    assert "8-bit affine, group size 32" in info["notes"][0]
    assert info["layers"]["model.embed_tokens"] == {"bits": 8, "group_size": 32, "mode": "affine"}
    assert "lm_head" not in info["layers"] and not any(k.startswith("lm_head") for k in tensors(tmp_path / "qx"))

    typo = Recipe("typo", bits=4, rules=(Rule("lm_haed", bits=8),)).check()
    info = quantize(tied, typo, tmp_path / "typo")
    assert info["notes"] == []
    assert info["warnings"] == ["recipe 'typo': rules[0] (match 'lm_haed') matches no module of this model"]


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


def test_learned_recipes_take_their_float_type_as_convert_does(tiny_model, tmp_path):
    """GPTQ / AWQ run on the model cast as mlx_lm.convert would cast it: the recipe's dtype, else the config's."""
    from dataclasses import replace

    from tasks.recipes import with_calibration_digest

    gptq = BUILTINS["gptq-4"]
    small = with_calibration_digest(replace(gptq, calibration={k: v for k, v in gptq.calibration.items() if k != "sha256"}
                                            | {"num_samples": 2, "sequence_length": 32}), Path("."))
    base = source(tiny_model, tmp_path / "base", "float32", torch_dtype="float16")
    for dtype, written in ((None, "float16"), ("bfloat16", "bfloat16")):
        info = quantize(base, replace(small, dtype=dtype), tmp_path / str(dtype))
        assert info["dtype"] == written
        floats = {d for d, _ in tensors(tmp_path / str(dtype)).values()} - {"U32"}
        assert floats == {{"float16": "F16", "bfloat16": "BF16"}[written]}
