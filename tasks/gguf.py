"""A local llama, qwen2 or gemma3 .gguf file -> a base model in Hugging Face layout.

A GGUF holds everything a base needs: the (quantized) weights, the hyper-parameters
and the tokenizer (vocab, merges or scores, token types, chat template) as metadata.
We dequantize with the `gguf` package's reference dequantizers (every ggml type,
K-quants included), undo what llama.cpp's convert_hf_to_gguf.py changed (llama: q/k
rows permuted; qwen2: nothing, its q/k/v biases kept; gemma3: 1 added to every RMSNorm
weight, since HF Gemma computes x * (1 + w)), and rebuild config.json and a `tokenizers`
tokenizer.json that splits text the way llama.cpp does: byte-level BPE for the file's `tokenizer.ggml.pre`, or
SentencePiece BPE by scores with byte fallback (Gemma).

Dequantized llama weights are written as float16: the ggml formats keep their block
scales in float16, so float16 rounds the dequantized values 8x finer than bfloat16
would. A GGUF that stores bfloat16 weights is written as bfloat16, exactly. Gemma is
the exception: always bfloat16, because Gemma's activations overflow float16. Norms
(float32 in every GGUF) stay float32, except Gemma's: its checkpoints are bfloat16 and
llama.cpp adds the 1 in float32, so w - 1 is bfloat16 again, and is written so when
that is exact (float32 norms would turn mlx-lm's whole bfloat16 forward pass float32).
"""

import json
import mmap
import struct
from collections import Counter
from pathlib import Path

import numpy as np

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")
# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), by the names its converter writes.
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")  # one digit a piece
PRE_TOKENIZERS = {  # name: (regexes applied in turn, ignore_merges, add_bos unless the file says)
    **dict.fromkeys(("gpt-2", "phi-2"), ([GPT2_RE], False, False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell"), ([r"\p{N}", GPT2_RE], False, False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3"), ([LLAMA3_RE], True, True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), ([QWEN2_RE], False, False)),
}
CONTROL, USER_DEFINED, UNKNOWN = 3, 4, 2  # gguf.TokenType
LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
         "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# gguf's tensor_mapping for MODEL_ARCH.GEMMA3: four norms a block, ffn_norm is the pre-FFN one.
GEMMA3_LAYER = {**LAYER, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
                "attn_k_norm": "self_attn.k_norm"}
LAYERS = {"llama": LAYER, "qwen2": LAYER, "gemma3": GEMMA3_LAYER}
BIASES = {"qwen2": ("attn_q", "attn_k", "attn_v")}  # the layers that have a bias (Qwen2's q/k/v projections)
GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
SHARD_BYTES = 2 << 30  # bounds the memory a conversion holds at once


class GGUFError(ValueError):
    """A GGUF file that cannot be read or converted; the message says why."""


def gguf_info(path) -> dict:
    """Architecture, quantization and tensor types, from the header only; raises GGUFError if unusable."""
    meta, tensors, _ = _read_header(Path(path))
    _check(Path(path).name, meta, tensors)
    return _info(meta, tensors)


def gguf_config(path) -> dict:
    """The config.json that convert_gguf would write, from the header only."""
    meta, tensors, _ = _read_header(Path(path))
    _check(Path(path).name, meta, tensors)
    return _config(meta, tensors)


def convert_gguf(path, out_dir) -> dict:
    """Write config.json, model*.safetensors and tokenizer files for the GGUF at `path` into `out_dir`."""
    import gguf
    import mlx.core as mx

    path, out = Path(path), Path(out_dir)
    meta, tensors, data = _read_header(path)
    _check(path.name, meta, tensors)
    out.mkdir(parents=True, exist_ok=True)
    config = _config(meta, tensors)
    arch = meta["general.architecture"]
    gemma = arch == "gemma3"
    weight_types = {t for name, (t, shape, _) in tensors.items() if len(shape) == 2}
    dtype = "bfloat16" if gemma or weight_types == {gguf.GGMLQuantizationType.BF16} else "float16"
    config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    _write_tokenizer(meta, config, out)

    shards, shard, size = [], {}, 0  # shards: (file, names, bytes)
    for name, (qtype, shape, offset) in tensors.items():
        qtype = gguf.GGMLQuantizationType(qtype)
        raw = np.frombuffer(data, np.uint8, _nbytes(qtype, shape), offset).reshape(
            gguf.quants.quant_shape_to_byte_shape(shape, qtype))
        w = gguf.quants.dequantize(raw, qtype)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):  # only LlamaModel permutes
            heads = config["num_attention_heads" if "attn_q" in name else "num_key_value_heads"]
            w = _unpermute(w, heads)
        array, wtype = mx.array(w), dtype if len(shape) == 2 else "float32"
        gemma_norm = gemma and name.endswith("norm.weight")
        if gemma_norm:  # Gemma3Model.modify_tensors: data_torch + 1
            array = array - 1
        # Gemma's norms and qwen2's biases in the weights' dtype where that is exact (Gemma's: always
        # bfloat16): float32 ones would turn the whole forward pass float32
        if (gemma_norm or name.endswith(".bias")) and mx.array_equal(
                array.astype(getattr(mx, dtype)).astype(mx.float32), array):
            wtype = dtype
        shard[_hf_name(name, arch)] = array = array.astype(getattr(mx, wtype))
        mx.eval(array)  # now, so that the float32 copy goes
        size += array.nbytes
        if size >= SHARD_BYTES:
            shards.append(_save(shard, out / f"model-{len(shards):05d}.safetensors"))
            shard, size = {}, 0
    if shard:
        shards.append(_save(shard, out / f"model-{len(shards):05d}.safetensors"))
    _name_shards(shards, out)
    return {**_info(meta, tensors), "dtype": dtype, "files": sorted(p.name for p in out.iterdir())}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py's permute reshapes rows to (n_head, 2, head_dim/2) and swaps the last two,
    # pairing rotary halves the way llama.cpp's RoPE reads them; swapping back restores HF's order.
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str, arch: str) -> str:
    base, _, suffix = name.rpartition(".")
    parts, layer = base.split("."), LAYERS[arch]
    if suffix == "bias" and not (parts[0] == "blk" and len(parts) == 3 and parts[2] in BIASES.get(arch, ())):
        raise KeyError(name)  # e.g. attention biases in a llama file, which its config cannot declare
    if suffix not in ("weight", "bias"):
        raise KeyError(name)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in layer:
        return f"model.layers.{parts[1]}.{layer[parts[2]]}.{suffix}"
    return f"{GLOBAL[base]}.weight"


def _save(shard: dict, path: Path) -> tuple:
    import mlx.core as mx

    mx.save_safetensors(str(path), shard, metadata={"format": "pt"})
    return path, sorted(shard), sum(a.nbytes for a in shard.values())


def _name_shards(shards: list, out: Path) -> None:
    """HF's names: model.safetensors alone, or model-0000i-of-0000n.safetensors and an index."""
    if len(shards) == 1:
        shards[0][0].rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, (path, names, _) in enumerate(shards):
        new = path.rename(out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        weight_map.update(dict.fromkeys(names, new.name))
    index = {"metadata": {"total_size": sum(s[2] for s in shards)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def _config(meta: dict, tensors: dict) -> dict:
    arch = meta["general.architecture"]
    get = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    hidden, heads = get("embedding_length"), get("attention.head_count")
    # mlx-lm stops generating at any of these: chat models end turns with EOT (Llama 3's <|eot_id|>).
    eos = list(dict.fromkeys(meta[f"tokenizer.ggml.{k}_token_id"] for k in ("eos", "eot", "eom")
                             if f"tokenizer.ggml.{k}_token_id" in meta))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": get("block_count"), "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"), "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length"),
        "vocab_size": tensors["token_embd.weight"][1][0],
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
    }
    if get("rope.scaling.type") == "linear":  # gemma3: global layers only, in llama.cpp and mlx-lm alike
        config["rope_scaling"] = {"type": "linear", "factor": _f32(get("rope.scaling.factor"))}
    if arch == "gemma3":
        config.update(_gemma3_config(get, config))
    if arch == "qwen2":  # mlx-lm's qwen2: q/k/v biases always, no head_dim of its own (hidden / heads)
        config.update({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_bias": True})
    return config


def _gemma3_config(get, config: dict) -> dict:
    """What mlx-lm's gemma3_text reads beyond llama's fields, as llama.cpp's llama-model.cpp sets it."""
    window = get("attention.sliding_window")
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        # llama.cpp: 1/sqrt(n_embd/n_head) for the 27B (62 layers), 1/sqrt(head_dim) for the others.
        "query_pre_attn_scalar": (config["hidden_size"] // config["num_attention_heads"]
                                  if config["num_hidden_layers"] == 62 else config["head_dim"]),
        # Local layers: llama.cpp hard-codes base 10000 and every 6th layer global; no window: all global.
        "rope_local_base_freq": _f32(get("rope.freq_base_swa", 10000.0)),
        "sliding_window": window or config["max_position_embeddings"],
        "sliding_window_pattern": 6 if window else 1,
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
    }


def _write_tokenizer(meta: dict, config: dict, out: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", [])
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    if meta["tokenizer.ggml.model"] == "llama":  # SentencePiece BPE, as HF's GemmaTokenizer builds it
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp's default for SPM
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        tok = Tokenizer(models.BPE(vocab, _spm_merges(tokens, meta["tokenizer.ggml.scores"], vocab),
                                   unk_token=None if unk is None else tokens[unk], fuse_unk=True, byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", "\u2581")  # no space prefix: _check refuses files that want one
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        regexes, ignore_merges, add_bos = PRE_TOKENIZERS[meta.get("tokenizer.ggml.pre")]
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>...) are special; user-defined ones are matched whole but decoded as text.
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == USER_DEFINED])
    named = {k: tokens[meta[f"tokenizer.ggml.{key}_token_id"]] for k, key in
             (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
             if meta.get(f"tokenizer.ggml.{key}_token_id", len(tokens)) < len(tokens)}
    if add_bos and "bos" in named:
        bos = named["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    tok.save(str(out / "tokenizer.json"))

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
        "bos_token": named.get("bos"), "eos_token": named.get("eos"), "unk_token": named.get("unk"),
        "pad_token": named.get("pad"), "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def _spm_merges(tokens: list, scores: list, vocab: dict) -> list:
    """BPE merges that replay llama.cpp's SentencePiece tokenizer: it merges the adjacent pair whose
    concatenation is a token with the highest score, so every split of a token into two tokens is a
    merge, ranked by that token's score (HF's generate_merges, with the file's scores)."""
    merges = []
    for i, token in enumerate(tokens):
        merges += [(-scores[i], i, k) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
    merges.sort()
    return [(tokens[i][:k], tokens[i][k:]) for _, i, k in merges]


def _check(name: str, meta: dict, tensors: dict) -> None:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"{name}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")
    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if model not in ("gpt2", "llama"):
        raise GGUFError(f"{name}: tokenizer model {model!r} is not supported; supported: 'gpt2' (byte-level BPE), "
                        "'llama' (SentencePiece BPE)")
    if model == "gpt2" and pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{name}: pre-tokenizer {pre!r} is not supported; supported: {', '.join(PRE_TOKENIZERS)}")
    if model == "llama" and meta.get("tokenizer.ggml.add_space_prefix", True):  # llama.cpp's default is True
        raise GGUFError(f"{name}: SentencePiece vocab with a space prefix is not supported (only add_space_prefix "
                        "false, as Gemma 3 writes)")
    if meta.get(f"{arch}.final_logit_softcapping"):  # mlx-lm's gemma3_text has no soft-capping
        raise GGUFError(f"{name}: final_logit_softcapping is not supported")
    if "rope_freqs.weight" in tensors or meta.get(f"{arch}.rope.scaling.type", "none") not in ("none", "linear"):
        raise GGUFError(f"{name}: rope scaling other than linear (e.g. Llama 3.1's rope_freqs) is not supported")
    for key in [f"{arch}.{k}" for k in ("block_count", "embedding_length", "feed_forward_length",
                                        "attention.head_count", "attention.layer_norm_rms_epsilon",
                                        "context_length")] + ["tokenizer.ggml.tokens"] + [
                   "tokenizer.ggml.merges" if model == "gpt2" else "tokenizer.ggml.scores"]:
        if key not in meta:
            raise GGUFError(f"{name}: metadata {key} is missing")
    for tensor in tensors:
        try:
            _hf_name(tensor, arch)
        except KeyError:
            raise GGUFError(f"{name}: tensor {tensor!r} has no {arch} equivalent") from None
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{name}: tensor 'token_embd.weight' is missing")


def _info(meta: dict, tensors: dict) -> dict:
    import gguf

    types = Counter(gguf.GGMLQuantizationType(t).name for t, shape, _ in tensors.values())
    try:
        quantization = gguf.LlamaFileType(meta["general.file_type"]).name.removeprefix("MOSTLY_")
        quantization = quantization.removeprefix("ALL_")
    except (KeyError, ValueError):  # older files: name it after the commonest weight type
        quantization = Counter(gguf.GGMLQuantizationType(t).name for t, shape, _ in tensors.values()
                               if len(shape) == 2).most_common(1)[0][0]
    return {"architecture": meta["general.architecture"], "quantization": quantization,
            "license": meta.get("general.license"),
            "tensor_count": len(tensors), "tensor_types": dict(sorted(types.items()))}


def _nbytes(qtype, shape) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _f32(x):
    """A float32 from the file as the shortest decimal that reads back the same (1e-05, not 9.99999974e-06)."""
    return None if x is None else float(str(np.float32(x)))


# --- the GGUF container: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md ------------------------
# Read here rather than with gguf.GGUFReader, which takes seconds on a 49k-token vocab: resolving a source
# reads the header too, and must stay cheap.

SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


def _read_header(path: Path):
    """(metadata, {tensor: (ggml type, numpy shape, absolute offset)}, the file mapped read-only)."""
    try:
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if data[:4] != b"GGUF":
            raise GGUFError(f"{path.name}: not a GGUF file (no GGUF magic)")
        pos = [4]

        def take(fmt):
            (value,) = struct.unpack_from("<" + fmt, data, pos[0])
            pos[0] += struct.calcsize(fmt)
            return value

        def string():
            n = take("Q")
            pos[0] += n
            return data[pos[0] - n:pos[0]].decode("utf-8", errors="replace")

        def value(vtype):
            if vtype == STRING:
                return string()
            if vtype == ARRAY:
                item, n = take("I"), take("Q")
                if item in SCALARS:  # numeric arrays (token types, scores) in one go
                    array = np.frombuffer(data, "<" + SCALARS[item], n, pos[0])
                    pos[0] += array.nbytes
                    return array.tolist()
                return [value(item) for _ in range(n)]
            return take(SCALARS[vtype])

        version = take("I")
        if version not in (2, 3):
            raise GGUFError(f"{path.name}: GGUF version {version} is not supported (2 or 3, little-endian)")
        n_tensors, n_kv = take("Q"), take("Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("I"))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = string(), take("I")
            dims = [take("Q") for _ in range(n_dims)]
            infos.append((name, take("I"), tuple(reversed(dims)), take("Q")))
        align = meta.get("general.alignment", 32)
        start = -(-pos[0] // align) * align
        tensors = {name: (qtype, shape, start + offset) for name, qtype, shape, offset in infos}
        for name, (qtype, shape, offset) in tensors.items():
            if offset + _nbytes(qtype, shape) > len(data):
                raise GGUFError(f"{path.name}: truncated (tensor {name!r} runs past the end of the file)")
    except (OSError, struct.error, KeyError, ValueError, OverflowError) as e:
        if isinstance(e, GGUFError):
            raise
        raise GGUFError(f"{path.name}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    return meta, tensors, data
