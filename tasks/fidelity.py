"""fidelity: how far a quantized model's next-token distribution is from its base's.

Two stages. `reference` runs the base model once per (base, corpus, window, top-k)
and stores, for every scored position, the base's top-k log-probabilities, the
log of the probability mass outside them, and the log-probability of the actual
next token. Every recipe's cell asks for the same key, so the base pass is paid
once per sweep. `fidelity` runs a quantized model over the same windows and
compares.

The windows and scored positions are those of llama.cpp's `llama-perplexity`
(function perplexity() in tools/perplexity/perplexity.cpp, ggml-org/llama.cpp at
050fc7f32de16858ac667d775b43a51ed8976e6f; the same in the copy vendored by the
PyPI sdist llama-cpp-python 0.3.36, llama.cpp 0c1e57098bba43ac29e6e3b677cdceebdd22334f),
and its `--kl-divergence` mode (kl_divergence(), same file) uses the same ones:
- the whole corpus is tokenized once, with BOS at its start only if the tokenizer
  adds one (`add_bos`: for a GGUF, `tokenizer.ggml.add_bos_token`; here, whether
  the tokenizer's encode puts BOS before a text, see `adds_bos`). SmolLM2 does not;
- it is cut into n_chunk = n_tokens // window consecutive windows of `window`
  tokens (n_ctx, `-c`), the rest dropped; `windows` caps their number (`--chunks`);
- if add_bos, each window's FIRST token is REPLACED by BOS: the text is not
  shifted, and from the second window on the text token it replaces is in no window;
- with first = window // 2, the predictions at positions first .. window-2 are
  scored against the tokens at first+1 .. window-1: window - 1 - window//2 tokens
  per window (255 of 512), each with at least window/2 tokens of context.

Definitions (llama.cpp's, but for the differences listed below):
- perplexity = exp(mean negative log-likelihood of the actual next token). Its
  standard error is perplexity x std(NLL) / sqrt(n), by the delta method;
- KL divergence per token = sum_v p_base(v) (log p_base(v) - log p_quant(v)). It is
  reported as mean (with stderr), median, 90/99/99.9th percentiles (linear
  interpolation, as llama.cpp's) and max;
- "same top token": how often both models' most likely next token agree;
- delta p: p_quant(actual token) - p_base(actual token), as mean and RMS.

What still differs from llama.cpp, so the numbers agree closely, not exactly:
- the forward pass is MLX's (dequantized fp32 weights on a CPU, or MLX's native
  quantized kernels), not ggml's kernels and precision (ggml's CPU path, for one,
  rounds activations to 8 bits before a quantized matmul);
- the tokenizer is the model's Hugging Face tokenizer (for a GGUF base, the one
  tasks/gguf.py rebuilds from its metadata), not llama.cpp's own; and llama.cpp
  reads special-token text in the corpus as plain text (parse_special false)
  where a Hugging Face tokenizer matches it as the special token;
- the KL here is over the base's top-k tokens plus one bucket for all the rest
  (the rest's mass under each model). llama.cpp sums over the full vocabulary but
  stores the base's log-probs as 16-bit steps over the top 16 nats and skips every
  token whose base log-prob is at or below -16; its base NLL, p_base and top
  token come from those rounded values;
- standard errors divide by sqrt(n), llama.cpp's by sqrt(n - 1);
- llama.cpp refuses a corpus of fewer than 2 x window tokens and stops on a vocab
  that adds EOS; here one window is enough, and no EOS is ever added.
Checked against llama-perplexity built from llama-cpp-python 0.3.36's sdist (CPU),
same tokens in every case: the tiny demo model as an F16 GGUF, -c 128, 6 chunks, on
hamlet.txt, gives the same perplexity to 5e-5 (relative) with and without add_bos,
and --kl-divergence scores the same 63 positions of each window; SmolLM2-135M-Instruct
Q4_1, -c 512, reads 0.3-0.4% lower here on hamlet.txt (39.94 vs 40.09) and on
calibration.txt (20.00 vs 20.06).

Merging tokens into a bucket can only lower a KL divergence, so the KL here is a
lower bound, and the tail matters more than one might think. Measured on
SmolLM2-135M (q8, q6, q4 against the base, 4 windows of 256, with CODE_VERSION 2's
windows): k = 64 reads about 20% low, k = 256 10%, k = 1024 4%, and k = 4096 (1/12
of the vocabulary) within 1.1%. Hence the default k = 4096, with the base's
log-probs stored as float16 (which changes the result by under 0.02%).
"""
import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from tasks import cpu
from tasks.loading import load_as, trunk_and_head
from tasks.specs import shipped_path

# 2: top-k by partition, top-1 stored; passes split over CPU streams.
# 3: windows and scored positions as llama-perplexity's: BOS only if the tokenizer adds one, replacing
#    each window's first token (not prepended); positions window//2+1 .. window-1 scored, not window//2 ..
# 4: log-probs normalized in numpy (cpu.logsumexp_now: closer to float64, and faster on large vocabularies)
CODE_VERSION = "4"
WINDOWS_PER_PASS = 4  # windows in one forward pass: bounds the logits held at once (about window/2 x vocab each)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS before a text (llama.cpp's add_bos), told by what its encode does."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return tokenizer.encode("x")[:1] == [bos] != tokenizer.encode("x", add_special_tokens=False)[:1]


def windows(tokenizer, params: dict) -> np.ndarray:
    """(windows, window) token ids: the corpus cut as llama-perplexity cuts it into chunks (module doc)."""
    text = shipped_path(params["corpus"]).read_text(encoding="utf-8")
    tokens = tokenizer.encode(text, add_special_tokens=False, verbose=False)  # longer than the model's max on purpose
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    if bos is not None:  # BOS once, before the text; never EOS (llama.cpp refuses a vocab that adds one)
        tokens = [bos] + tokens
    n = int(params["window"])
    count = min(int(params["windows"]), len(tokens) // n)
    if count < 1:
        raise ValueError(f"fidelity.corpus {params['corpus']}: {len(tokens)} tokens, fewer than one window of {n}")
    rows = np.array(tokens[:count * n], dtype=np.int32).reshape(count, n)
    if bos is not None:
        rows[:, 0] = bos  # replaces each window's first token, as llama.cpp does; the text is not shifted
    return rows


def targets(tokens: np.ndarray) -> np.ndarray:
    """The tokens scored in each window: positions window//2 + 1 .. window - 1, predicted at window//2 .. window - 2."""
    return tokens[:, tokens.shape[1] // 2 + 1:]


def _passes(model, tokens: np.ndarray):
    """Run the windows in passes; yield (first row, float32 logits at the scored positions, evaluated) per part.

    Position t predicts token t + 1: the logits are (rows, window - 1 - window//2, vocab). A pass's parts run
    on one CPU stream each (tasks/cpu.py), so that every core is busy; what follows reads them in numpy, whose
    exp is SIMD (cpu.logsumexp_now): over gemma3's 262,144-token vocabulary that halved this stage.
    """
    trunk, head = trunk_and_head(model)
    streams, first = cpu.streams(), tokens.shape[1] // 2
    for start in range(0, len(tokens), WINDOWS_PER_PASS):
        rows = np.arange(start, min(start + WINDOWS_PER_PASS, len(tokens)))
        parts = [p for p in np.array_split(rows, min(len(streams), len(rows))) if len(p)]
        pending = []
        with cpu.blas_threads(1 if len(parts) > 1 else None):
            for stream, part in zip(streams, parts):
                with mx.stream(stream):
                    hidden = trunk(mx.array(tokens[part]))[:, first:-1]
                    pending.append((int(part[0]), head(hidden).astype(mx.float32)))
            mx.eval([logits for _, logits in pending])
        yield from pending


def _load(model_dir: Path, backend: str):
    """Base and quantized models run the same code path, so a model against itself reads exactly 0."""
    model, tokenizer = load_as(Path(model_dir), backend)
    cpu.fast_swiglu(model)
    return model, tokenizer


def _log_probs(logits: mx.array, ids: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """The log-probs of the given token ids, per position: their logits less the position's logsumexp."""
    return np.take_along_axis(np.asarray(logits), ids, axis=-1) - lse[..., None]


def _top_and_rest(logits: mx.array, top_ids: np.ndarray, lse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs of the given tokens, and the log of the mass of all others (summed directly, not 1 - top)."""
    return _log_probs(logits, top_ids, lse), cpu.logsumexp_now(logits, exclude=top_ids) - lse


def reference(base_dir: Path, params: dict, out: Path) -> dict:
    """The base model's top-k next-token log-probs on the corpus windows, saved as reference.npz.

    params: FidelitySpec's fields (tasks/specs.py), the backend resolved to native or fp32; all given.
    """
    model, tokenizer = _load(base_dir, params["backend"])
    tokens = windows(tokenizer, params)
    scored, k = targets(tokens), int(params["top_k"])

    parts = {"top_ids": [], "top_logp": [], "rest_logp": [], "target_logp": [], "top1": []}
    for first, logits in _passes(model, tokens):
        k_ = min(k, logits.shape[-1])
        lse = cpu.logsumexp_now(logits)
        # the top k in no particular order (a partition, not a sort), the log of the mass of all the others
        # (summed directly, not 1 - top), the actual next token's, and the top 1 on its own
        top_ids = np.array(mx.argpartition(-logits, kth=k_ - 1, axis=-1)[..., :k_].astype(mx.int32))
        top_logp, rest = _top_and_rest(logits, top_ids, lse)
        arrays = (top_ids, top_logp.astype(np.float16), rest,
                  _log_probs(logits, scored[first:first + len(logits)][..., None], lse)[..., 0],
                  np.asarray(logits).argmax(axis=-1).astype(np.int32))
        for name, value in zip(parts, arrays):
            parts[name].append(value)
    arrays = {name: np.concatenate(v) for name, v in parts.items()}
    np.savez(out / "reference.npz", tokens=tokens, **arrays)
    nll = -arrays["target_logp"].ravel().astype(np.float64)
    ppl = float(np.exp(nll.mean()))
    rows = [{"task": "fidelity", "metric": "ppl", "value": ppl, "stderr": float(ppl * nll.std() / np.sqrt(nll.size)),
             "n": int(nll.size), "backend": params["backend"], "data": params["corpus"]}]
    return {"metrics": rows, "params": params, "scored_tokens": int(nll.size)}


def compare(model, ref: dict) -> dict:
    """Per-token statistics of `model` against the reference arrays; see the module doc for definitions."""
    tokens = ref["tokens"]
    scored = targets(tokens)

    kl, nll, same, dp = [], [], [], []
    for first, logits in _passes(model, tokens):
        end = first + len(logits)
        lse = cpu.logsumexp_now(logits)
        top_ids, top_logp = ref["top_ids"][first:end], ref["top_logp"][first:end].astype(np.float32)
        rest_b = ref["rest_logp"][first:end]
        q_top, rest_q = _top_and_rest(logits, top_ids, lse)
        q_top = q_top.astype(np.float16).astype(np.float32)  # rounded as the base's were: a model against itself reads 0
        p_rest = np.exp(rest_b)
        with np.errstate(invalid="ignore"):  # no rest when k covers the vocabulary: -inf - -inf, then dropped
            rest_term = np.where(p_rest > 0, p_rest * (rest_b - rest_q), 0.0)
        kl.append(np.maximum((np.exp(top_logp) * (top_logp - q_top)).sum(axis=-1) + rest_term, 0.0))
        target = _log_probs(logits, scored[first:end][..., None], lse)[..., 0]
        nll.append(-target)
        same.append(np.asarray(logits).argmax(axis=-1) == ref["top1"][first:end])
        dp.append(np.exp(target) - np.exp(ref["target_logp"][first:end]))
    kl, nll, same, dp = (np.concatenate(x).ravel().astype(np.float64) for x in (kl, nll, same, dp))
    base_nll = -ref["target_logp"].ravel().astype(np.float64)
    n = kl.size
    ppl, base_ppl = float(np.exp(nll.mean())), float(np.exp(base_nll.mean()))
    stats = {
        "ppl": (ppl, ppl * nll.std() / np.sqrt(n)),
        "ppl_ratio": (ppl / base_ppl, None),
        "kl_mean": (kl.mean(), kl.std() / np.sqrt(n)),
        "kl_median": (np.median(kl), None),
        "kl_p90": (np.percentile(kl, 90), None),
        "kl_p99": (np.percentile(kl, 99), None),
        "kl_p99_9": (np.percentile(kl, 99.9), None),
        "kl_max": (kl.max(), None),
        "same_top": (same.mean(), np.sqrt(same.mean() * (1 - same.mean()) / n)),
        "delta_p_mean": (dp.mean(), dp.std() / np.sqrt(n)),
        "delta_p_rms": (np.sqrt((dp ** 2).mean()), None),
    }
    return {name: (float(v), None if e is None else float(e)) for name, (v, e) in stats.items()} | {"n": n}


def fidelity(model_dir: Path, reference_dir: Path, params: dict, out: Path) -> dict:
    """`model_dir` against the base's reference; params as reference's."""
    model, _ = _load(model_dir, params["backend"])
    with np.load(Path(reference_dir) / "reference.npz") as f:
        ref = dict(f)
    stats = compare(model, ref)
    n = stats.pop("n")
    saved = {"params": params, "n": n, "stats": stats}
    (out / "fidelity.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    rows = [{"task": "fidelity", "metric": name, "value": value, "stderr": err, "n": n, "backend": params["backend"],
             "data": params["corpus"]} for name, (value, err) in stats.items()]
    return {"metrics": rows}


def build_reference(job) -> dict:
    """The reference stage (tasks/registry.py): the base's pass, one per model and corpus settings."""
    return reference(job.inputs[0], job.params, job.out)


def build(job) -> dict:
    """The fidelity stage (tasks/registry.py); inputs: [the quantized model, the base's reference]."""
    return fidelity(job.inputs[0], job.inputs[1], job.params, job.out)
