"""fidelity: perplexity and KL divergence of quantized models against their base, on the tiny model."""

import json
import math
import shutil

import mlx.core as mx
import numpy as np
import pytest
from tokenizers import Tokenizer, processors

from tasks.fidelity import adds_bos, fidelity, reference, windows
from tasks.loading import load_as
from tasks.quantize import quantize
from tasks.recipes import BUILTINS
from tasks.specs import FidelitySpec, shipped_path

# What a sweep hands the stages: the spec's fields (small windows), the backend resolved.
PARAMS = FidelitySpec(window=128, windows=6).model_dump(exclude={"enabled"}) | {"backend": "fp32"}
LADDER = ["q8", "q6", "q5", "q4", "q3", "q2"]


@pytest.fixture(scope="module")
def ref(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    info = reference(tiny_model, PARAMS, out)
    return out, info


@pytest.fixture(scope="module")
def stats(tiny_model, ref, tmp_path_factory):
    """recipe -> {metric: value} for the base itself and each recipe of the ladder."""
    got = {}
    for name in ["base"] + LADDER:
        model_dir = tiny_model
        if name != "base":
            model_dir = tmp_path_factory.mktemp(name)
            quantize(tiny_model, BUILTINS[name], model_dir)
        out = tmp_path_factory.mktemp(f"{name}-fidelity")
        got[name] = {r["metric"]: r["value"] for r in fidelity(model_dir, ref[0], PARAMS, out)["metrics"]}
        got[name]["dir"] = model_dir
    return got


def test_base_against_itself(stats, ref):
    base = stats["base"]
    assert base["kl_mean"] == 0 and base["kl_max"] == 0
    assert base["same_top"] == 1 and base["ppl_ratio"] == 1 and base["delta_p_rms"] == 0
    assert base["ppl"] == pytest.approx(ref[1]["metrics"][0]["value"])


def test_kl_grows_as_bits_drop(stats):
    kl = [stats[name]["kl_mean"] for name in LADDER]
    assert kl == sorted(kl) and len(set(kl)) == len(kl), dict(zip(LADDER, kl))
    same = [stats[name]["same_top"] for name in LADDER]
    assert same[0] > same[-1]
    assert stats["q2"]["kl_p99"] >= stats["q2"]["kl_median"]


def full_kl(tiny_model, quantized_dir) -> float:
    base, _ = load_as(tiny_model, "fp32")
    quant, tokenizer = load_as(quantized_dir, "fp32")
    tokens = mx.array(windows(tokenizer, PARAMS))
    first = tokens.shape[1] // 2
    lb, lq = (nn_log_softmax(m(tokens)[:, first:-1]) for m in (base, quant))
    return (mx.exp(lb) * (lb - lq)).sum(axis=-1).mean().item()


def test_kl_against_the_full_vocabulary(tiny_model, stats, tmp_path):
    """The default top-k covers this vocabulary (512): the KL is the full one. A smaller k is a lower bound.

    On SmolLM2 (vocab 49152) the default k = 4096 reads within 1.1% of the full KL: bench/RESULTS.md.
    """
    full = full_kl(tiny_model, stats["q3"]["dir"])
    assert stats["q3"]["kl_mean"] == pytest.approx(full, rel=0.01)
    small = {**PARAMS, "top_k": 64}
    reference(tiny_model, small, tmp_path)
    (tmp_path / "f").mkdir()
    rows = fidelity(stats["q3"]["dir"], tmp_path, small, tmp_path / "f")["metrics"]
    bound = next(r["value"] for r in rows if r["metric"] == "kl_mean")
    assert 0 < bound <= full * (1 + 1e-4)  # merging tokens can only lower a KL divergence


def nn_log_softmax(logits):
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def test_same_inputs_same_reference_bytes(tiny_model, ref, tmp_path):
    reference(tiny_model, PARAMS, tmp_path)
    assert (tmp_path / "reference.npz").read_bytes() == (ref[0] / "reference.npz").read_bytes()
    with np.load(tmp_path / "reference.npz") as f:
        assert f["top_ids"].shape[-1] == min(PARAMS["top_k"], 512) and f["top_ids"].shape[:2] == f["target_logp"].shape


def test_a_corpus_shorter_than_a_window_is_refused(tiny_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    with pytest.raises(ValueError, match="fewer than one window"):
        reference(tiny_model, {**PARAMS, "corpus": str(short)}, tmp_path)


# --- windows and scored positions as llama.cpp's llama-perplexity (tools/perplexity/perplexity.cpp) ----------


@pytest.fixture(scope="module")
def bos_model(tiny_model, tmp_path_factory):
    """The tiny model with a tokenizer that puts BOS before every text (as a GGUF with add_bos_token true
    converts: tasks/gguf.py); the tiny model's own does not."""
    out = tmp_path_factory.mktemp("models") / "tiny-bos"
    shutil.copytree(tiny_model, out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    bos = "<|endoftext|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(out / "tokenizer.json"))
    return out


def corpus_tokens(tokenizer) -> list[int]:
    return tokenizer.encode(shipped_path(PARAMS["corpus"]).read_text(encoding="utf-8"), add_special_tokens=False)


def test_no_bos_unless_the_tokenizer_adds_one(tiny_model, tmp_path):
    _, tok = load_as(tiny_model, "fp32")
    assert tok.bos_token_id is not None and not adds_bos(tok)
    text, n = corpus_tokens(tok), PARAMS["window"]
    got = windows(tok, PARAMS)
    assert got.shape == (PARAMS["windows"], n)
    assert got.ravel().tolist() == text[:got.size]  # consecutive windows of the text, nothing inserted
    assert len(windows(tok, {**PARAMS, "windows": 10**6})) == len(text) // n  # llama.cpp's n_chunk

    no_bos = tmp_path / "no-bos"  # a tokenizer that has no BOS at all
    shutil.copytree(tiny_model, no_bos)
    config = json.loads((no_bos / "tokenizer_config.json").read_text())
    (no_bos / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": None}))
    (no_bos / "special_tokens_map.json").unlink()
    _, tok = load_as(no_bos, "fp32")
    assert tok.bos_token_id is None and not adds_bos(tok)
    assert np.array_equal(windows(tok, PARAMS), got)


def test_bos_replaces_the_first_token_of_every_window(bos_model):
    _, tok = load_as(bos_model, "fp32")
    bos, n = tok.bos_token_id, PARAMS["window"]
    assert adds_bos(tok)
    text = corpus_tokens(tok)
    got = windows(tok, PARAMS)
    assert got.shape == (PARAMS["windows"], n) and (got[:, 0] == bos).all()
    # The text with BOS before it, cut into windows, each window's first token then replaced by BOS:
    # window i holds text[i*n : (i+1)*n - 1] after its BOS, and text[i*n - 1] is in no window.
    for i in range(len(got)):
        assert got[i, 1:].tolist() == text[i * n:(i + 1) * n - 1]
    assert got[1, 1:].tolist() != text[n - 1:2 * n - 2]  # not BOS inserted before each window's text
    assert len(windows(tok, {**PARAMS, "windows": 10**6})) == (1 + len(text)) // n


def perplexity_by_hand(model_dir, window: int, count: int) -> tuple[float, int]:
    """llama.cpp's perplexity(), written out: tokenize with the tokenizer's special tokens, cut into chunks,
    BOS over each chunk's first token if the vocab adds BOS, score positions first+1 .. n_ctx-1."""
    model, tok = load_as(model_dir, "fp32")
    tokens = tok.encode(shipped_path(PARAMS["corpus"]).read_text(encoding="utf-8"))  # add_special=true
    first, nll, scored = window // 2, 0.0, 0
    for i in range(count):
        chunk = list(tokens[i * window:(i + 1) * window])
        if adds_bos(tok):
            chunk[0] = tok.bos_token_id
        logp = nn_log_softmax(model(mx.array(chunk)[None])[0])
        for j in range(first, window - 1):
            nll -= logp[j, chunk[j + 1]].item()
            scored += 1
    return math.exp(nll / scored), scored


@pytest.mark.parametrize("which, window", [("tiny", 128), ("bos", 128), ("bos", 97)])
def test_perplexity_is_exp_mean_nll_over_the_second_half(which, window, tiny_model, bos_model, tmp_path):
    model_dir = {"tiny": tiny_model, "bos": bos_model}[which]
    params = {**PARAMS, "window": window, "windows": 3}
    info = reference(model_dir, params, tmp_path)
    [row] = info["metrics"]
    assert info["scored_tokens"] == row["n"] == 3 * (window - 1 - window // 2)  # 63 of 128: n_ctx/2 - 1
    with np.load(tmp_path / "reference.npz") as f:
        assert f["target_logp"].shape == (3, window - 1 - window // 2)
    want, scored = perplexity_by_hand(model_dir, window, 3)
    assert scored == row["n"]
    assert row["value"] == pytest.approx(want, rel=1e-5)
