"""Every mlx, mlx-lm and lm-eval internal that qsweep relies on, each in one place, with the version it was read in.

A private name, a protocol the libraries call on objects qsweep substitutes, a method qsweep
replaces on a library's object: none is promised to last. Each lives here, once, so that an
upgrade has one file to re-read. Checked against mlx 0.32.4, mlx-lm 0.32.2, lm_eval 0.4.13
(CHECKED). Where the numbers could change, the caller probes before it patches: scoring.Scorer.packing
scores a probe packed and alone, cpu.fast_swiglu and cpu.logsumexp run a probe through mlx's path
and their own, and each falls back to the library's path when they disagree.

Not listed because public: mx.new_stream / mx.stream (cpu.streams), mx.fast.rope's array offset,
mlx_lm.utils.dequantize_model, stream_generate, lm-eval's TemplateLM and _loglikelihood_tokens
(the hook its docs tell subclasses to write). Read, not private, and probed where used: mlx-lm's
model layout (model.model, lm_head or embed_tokens.as_linear: loading.trunk_and_head; layers[i].mlp's
gate/up/down_proj: cpu.fast_swiglu).

Imports are inside the functions: importing this module costs nothing.
"""

CHECKED = {"mlx": "0.32.4", "mlx-lm": "0.32.2", "lm_eval": "0.4.13", "tqdm": "4.70.1"}


# ---- mlx-lm


def model_classes(config: dict):
    """(Model, ModelArgs) for a config's model_type, as mlx_lm.load picks them: mlx_lm.utils._get_classes."""
    from mlx_lm.utils import _get_classes

    return _get_classes(config)


def packable_length(model) -> float:
    """The longest packed row whose attention is the plain causal one for every layer: unbounded when each
    layer's prompt cache is a plain KVCache; a sliding-window model's window when the others are
    RotatingKVCache (mlx-lm gives gemma3's local layers one of max_size sliding_window): no token of a row
    that short is out of any window; 0 for anything else (a quantized or state cache), which is never packed.
    mlx_lm.models.cache.make_prompt_cache, KVCache and RotatingKVCache.max_size, as in mlx-lm 0.32.2."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

    longest = float("inf")
    for c in make_prompt_cache(model):
        if type(c) is RotatingKVCache:
            longest = min(longest, c.max_size)
        elif type(c) is not KVCache:
            return 0
    return longest


class PackedRowsCache:
    """Stands in for a layer's KV cache in a packed pass: keeps nothing, gives the mask and positions.

    mlx-lm's attention (models/llama.py and kin, gemma3_text, 0.32.2) calls, per layer, cache.make_mask(...)
    through models/base.create_attention_mask for the mask (its window_size ignored: see packable_length),
    self.rope(x, offset=cache.offset), and cache.update_and_fetch(keys, values). Here the mask is given whole and the offset is
    a (batch, length) array of per-token positions, which only PositionedRoPE understands.
    """

    def __init__(self, mask, positions):
        self.mask, self.offset = mask, positions

    def update_and_fetch(self, keys, values):
        return keys, values

    def make_mask(self, *args, **kwargs):
        return self.mask


class PositionedRoPE:
    """A model's RoPE, also taking per-token positions: each token rotated as a batch row of its own.

    A plain object, not an nn.Module: RoPE holds no parameters, and so this file imports no mlx."""

    def __init__(self, rope):
        self.inner = rope

    def __call__(self, x, offset=0):
        if getattr(offset, "ndim", 0) == 2:  # an mx.array of (batch, length) positions, from PackedRowsCache
            B, H, L, D = x.shape
            rows = x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)
            return self.inner(rows, offset=offset.reshape(-1)).reshape(B, L, H, D).transpose(0, 2, 1, 3)
        return self.inner(x, offset=offset)


def positioned_rope(model) -> bool:
    """Wrap each layer's `self_attn.rope` (mlx-lm's attribute) in PositionedRoPE.

    An ordinary offset is passed through; False, and nothing wrapped, when a layer has no such rope.
    """
    attention = [getattr(layer, "self_attn", None) for layer in model.layers]
    if not all(hasattr(a, "rope") for a in attention):
        return False
    for a in attention:
        if not isinstance(a.rope, PositionedRoPE):
            a.rope = PositionedRoPE(a.rope)
    return True


# ---- mlx


# mlx's CPU exp (mlx/backend/cpu/simd/math.h, 0.32.4, constants from Cephes): exp(x) = 2**whole * p(frac).
EXP_POLYNOMIAL = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
                  2.402264791363012e-1, 6.931472028550421e-1, 1.0)


# ---- tqdm (under lm-eval, datasets and huggingface_hub)


def keep_tqdm_lock() -> None:
    """Create tqdm's class-wide lock once, before cells run in threads. tqdm.contrib.concurrent.ensure_lock
    (tqdm 4.70.1; huggingface_hub's thread_map uses it) deletes that lock after use when none existed before,
    and a bar closing in another thread then fails: AttributeError: type object 'tqdm' has no attribute
    '_lock' (seen as a failed benchmark with 3 cells at once). With the lock there, it restores it instead."""
    from tqdm import tqdm

    tqdm.get_lock()


# ---- lm-eval


def pin_eval_docs(task) -> None:
    """Replace an lm-eval Task's test_docs / validation_docs (whichever it evaluates) with its
    documents processed once: lm-eval 0.4.13 calls process_docs on every read of eval_docs
    (five or more a run), and for hellaswag each call maps its 10,042 documents again (seconds)."""
    split = "test_docs" if task.has_test_docs() else "validation_docs"
    docs = getattr(task, split)()
    if hasattr(docs, "__len__"):  # a generator must be made anew each time
        setattr(task, split, lambda: docs)


def load_task_yaml(path):
    """An lm-eval task YAML as lm-eval reads it (its !function tags and all): lm_eval.tasks._yaml_loader.load_yaml."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path)
