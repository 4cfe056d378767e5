import json

import mlx.core as mx
import pytest

from tasks.learned import calibration_data, learned_quantize
from tasks.specs import shipped_path

CALIBRATION = shipped_path("qsweep:data/calibration.txt")

METHODS = ("gptq", "awq")
BITS, GROUP_SIZE = 4, 32
CALIB = {"text": str(CALIBRATION), "num_samples": 8, "sequence_length": 64, "seed": 0}


@pytest.fixture(scope="module")
def learned(tiny_model, tmp_path_factory):
    """Each method run twice on the same inputs: {method: (info, out, out_again)}."""
    runs = {}
    for method in METHODS:
        outs = [tmp_path_factory.mktemp(f"{method}-{i}") for i in range(2)]
        infos = [learned_quantize(tiny_model, out, method, BITS, GROUP_SIZE, CALIB) for out in outs]
        runs[method] = (infos[0], *outs)
    return runs


@pytest.fixture(scope="module")
def rtn(tiny_model, tmp_path_factory):
    """Plain round-to-nearest quantization of the same model, same bits and group size."""
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("rtn") / "model"
    convert(str(tiny_model), mlx_path=str(out), quantize=True, q_bits=BITS, q_group_size=GROUP_SIZE)
    return out


def test_calibration_data_is_seeded_windows_of_the_text(tiny_model):
    from mlx_lm import load

    _, tokenizer = load(str(tiny_model))
    a = calibration_data(tokenizer, CALIBRATION, 8, 64, seed=0)
    assert a.shape == (8, 64)
    assert mx.array_equal(a, calibration_data(tokenizer, CALIBRATION, 8, 64, seed=0))
    assert not mx.array_equal(a, calibration_data(tokenizer, CALIBRATION, 8, 64, seed=1))
    tokens = tokenizer.encode(CALIBRATION.read_text(), verbose=False)
    windows = {tuple(tokens[i : i + 64]) for i in range(0, len(tokens) - 63, 64)}
    assert all(tuple(row) in windows for row in a.tolist())


def test_calibration_windows_are_those_a_seeded_global_generator_picks(tiny_model):
    """The windows that seeding the global generator right before the draw picks (as mlx-lm's
    load_data draws them, and as this module once did), from an explicit key instead: stored
    learned models keep their meaning, and threads do not share a generator."""
    from mlx_lm import load

    _, tokenizer = load(str(tiny_model))
    for seed in (0, 3):
        ours = calibration_data(tokenizer, CALIBRATION, -1, 64, seed=seed)
        tokens = mx.array(tokenizer.encode(CALIBRATION.read_text(), verbose=False))
        windows = tokens[: (tokens.size // 64) * 64].reshape(-1, 64)
        mx.random.seed(seed)
        assert mx.array_equal(ours, windows[mx.random.permutation(windows.shape[0])])


@pytest.mark.parametrize("method", METHODS)
def test_output_loads_and_generates(learned, method):
    from mlx_lm import generate, load

    model, tokenizer = load(str(learned[method][1]))
    assert isinstance(generate(model, tokenizer, prompt="The sun rises", max_tokens=4), str)
    logits = model(mx.array([tokenizer.encode("Water boils at one hundred degrees.")]))
    assert mx.all(mx.isfinite(logits)).item()


@pytest.mark.parametrize("method", METHODS)
def test_layers_are_quantized_and_recorded(learned, method):
    info, out, _ = learned[method]
    assert (info["method"], info["bits"], info["group_size"]) == (method, BITS, GROUP_SIZE)
    assert info["calibration"]["sha256"] and info["calibration"]["num_samples"] == 8
    layers = info["layers"]
    # 4 blocks x 7 projections, embeddings and lm_head
    assert len(layers) == 30
    for path, layer in layers.items():
        if path != "model.embed_tokens":
            assert layer == {"bits": BITS, "group_size": GROUP_SIZE, "mode": "affine"}, path
    # The scripts' own choices for embeddings: GPTQ falls back to 6 bits, AWQ uses 4 bits / 32.
    assert layers["model.embed_tokens"]["bits"] == {"gptq": 6, "awq": 4}[method]
    assert "quantization" in json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("method", METHODS)
def test_same_inputs_give_identical_bytes(learned, method):
    _, out, again = learned[method]
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in again.glob("*.safetensors"))
    for name in files + ["config.json"]:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


@pytest.mark.parametrize("method", METHODS)
def test_differs_from_round_to_nearest(learned, rtn, method):
    ours = mx.load(str(learned[method][1] / "model.safetensors"))
    plain = mx.load(str(rtn / "model.safetensors"))
    # Same layout in the transformer blocks (bits, group size, shapes), different codes.
    keys = [k for k in ours if k.startswith("model.layers.") and k.endswith("proj.weight")]
    assert len(keys) == 28
    assert all(ours[k].shape == plain[k].shape and ours[k].dtype == plain[k].dtype for k in keys)
    assert any(not mx.array_equal(ours[k], plain[k]) for k in keys)


@pytest.mark.parametrize(
    "method, bits, calibration, field",
    [
        ("rtn", 4, CALIB, "method"),
        ("gptq", 3, CALIB, "bits"),
        ("awq", 7, CALIB, "bits"),
        ("gptq", 4, {**CALIB, "text": "/nonexistent/calibration.txt"}, "calibration.text"),
    ],
)
def test_bad_arguments_raise_naming_the_field(tiny_model, tmp_path, method, bits, calibration, field):
    with pytest.raises(ValueError, match=field):
        learned_quantize(tiny_model, tmp_path, method, bits, GROUP_SIZE, calibration)
