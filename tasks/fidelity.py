"""fidelity: how far a quantized model's next-token distribution is from its base's.

Two stages. `reference` runs the base model once per (base, corpus, window, top-k)
and stores, for every scored position, the base's top-k log-probabilities, the
log of the probability mass outside them, and the log-probability of the actual
next token. Every recipe's cell asks for the same key, so the base pass is paid
once per sweep. `fidelity` runs a quantized model over the same windows and
compares.

Definitions follow llama.cpp's `llama-perplexity --kl-divergence`
(tools/perplexity/perplexity.cpp in ggml-org/llama.cpp):
- the corpus is cut into windows of `window` tokens, and only the second half of
  each window is scored, so every scored token has at least window/2 of context;
- perplexity = exp(mean negative log-likelihood of the actual next token). Its
  standard error is perplexity x std(NLL) / sqrt(n), by the delta method;
- KL divergence per token = sum_v p_base(v) (log p_base(v) - log p_quant(v)). It is
  reported as mean (with stderr), median, 90/99/99.9th percentiles and max;
- "same top token": how often both models' most likely next token agree;
- delta p: p_quant(actual token) - p_base(actual token), as mean and RMS.

The KL here is over the base's top-k tokens plus one bucket for all the rest (the
rest's mass under each model). Merging tokens into a bucket can only lower a KL
divergence, so this is a lower bound, and the tail matters more than one might
think. Measured on SmolLM2-135M (q8, q6, q4 against the base, 4 windows of 256):
k = 64 reads about 20% low, k = 256 10%, k = 1024 4%, and k = 4096 (1/12 of the
vocabulary) within 1.1%. Hence the default k = 4096, with the base's
log-probs stored as float16 (which changes the result by under 0.02%).
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from prefect import task

from storage.artifacts import ArtifactRef, Store
from tasks import cpu
from tasks.benchmark import load_as, trunk_and_head
from tasks.stage import artifact_cache

CODE_VERSION = "2"  # 2: top-k by partition, top-1 stored; passes split over CPU streams
DATA = Path(__file__).parent / "data"
DEFAULTS = {"corpus": "qsweep:data/hamlet.txt", "window": 512, "windows": 12, "top_k": 4096, "backend": "fp32"}
WINDOWS_PER_PASS = 4  # windows in one forward pass: bounds the logits held at once (window/2 x vocab each)


def corpus_path(ref: str) -> Path:
    return DATA.parent / ref.removeprefix("qsweep:") if ref.startswith("qsweep:") else Path(ref)


def windows(tokenizer, params: dict) -> np.ndarray:
    """(windows, window) token ids: the corpus cut into consecutive windows, each starting with BOS if the model has one."""
    text = corpus_path(params["corpus"]).read_text(encoding="utf-8")
    tokens = tokenizer.encode(text, add_special_tokens=False, verbose=False)  # longer than the model's max on purpose
    n, bos = int(params["window"]), tokenizer.bos_token_id
    step = n - (bos is not None)
    count = min(int(params["windows"]), len(tokens) // step)
    if count < 1:
        raise ValueError(f"fidelity.corpus {params['corpus']}: {len(tokens)} tokens, fewer than one window of {n}")
    rows = [tokens[i * step:(i + 1) * step] for i in range(count)]
    if bos is not None:  # llama.cpp puts BOS first in each chunk, as the model saw text in training
        rows = [[bos] + r for r in rows]
    return np.array(rows, dtype=np.int32)


def _passes(model, tokens: np.ndarray, per_part):
    """Run the windows in passes; yield (first row, per_part's arrays) for each part of each pass.

    per_part(log_probs of the scored half (rows, window/2, vocab) float32, first row) builds the
    arrays to keep, lazily: a pass's parts run on one CPU stream each (tasks/cpu.py), all of the
    work, comparison included, so that every core is busy; only what per_part keeps is evaluated.
    """
    trunk, head = trunk_and_head(model)
    streams, half = cpu.streams(), tokens.shape[1] // 2
    for start in range(0, len(tokens), WINDOWS_PER_PASS):
        rows = np.arange(start, min(start + WINDOWS_PER_PASS, len(tokens)))
        parts = [p for p in np.array_split(rows, min(len(streams), len(rows))) if len(p)]
        pending = []
        with cpu.blas_threads(1 if len(parts) > 1 else None):
            for stream, part in zip(streams, parts):
                with mx.stream(stream):
                    hidden = trunk(mx.array(tokens[part]))[:, half - 1:-1]  # position t predicts token t + 1
                    logits = head(hidden).astype(mx.float32)
                    pending.append((int(part[0]), per_part(logits - cpu.logsumexp(logits)[..., None], int(part[0]))))
            mx.eval([arrays for _, arrays in pending])
        yield from pending


def _load(model_dir: Path, backend: str):
    """Base and quantized models run the same code path, so a model against itself reads exactly 0."""
    model, tokenizer = load_as(Path(model_dir), backend)
    cpu.fast_swiglu(model)
    return model, tokenizer


def _top_and_rest(logp: mx.array, top_ids: mx.array) -> tuple[mx.array, mx.array]:
    """Log-probs of the given tokens, and the log of the mass of all others (summed directly, not 1 - top)."""
    return (mx.take_along_axis(logp, top_ids, axis=-1),
            mx.logsumexp(mx.put_along_axis(logp, top_ids, mx.array(-mx.inf), axis=-1), axis=-1))


def reference(base_dir: Path, params: dict, out: Path) -> dict:
    """The base model's top-k next-token log-probs on the corpus windows, saved as reference.npz."""
    p = {**DEFAULTS, **params}
    model, tokenizer = _load(base_dir, p["backend"])
    tokens = windows(tokenizer, p)
    half, k = tokens.shape[1] // 2, int(p["top_k"])

    def keep(logp, first):
        k_ = min(k, logp.shape[-1])
        # the top k in no particular order (a partition, not a sort), and the top 1 on its own
        top_ids = mx.argpartition(-logp, kth=k_ - 1, axis=-1)[..., :k_].astype(mx.int32)
        top_logp, rest = _top_and_rest(logp, top_ids)
        targets = mx.array(tokens[first:first + len(logp), half:])
        target = mx.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return top_ids, top_logp.astype(mx.float16), rest, target, mx.argmax(logp, axis=-1).astype(mx.int32)

    parts = {"top_ids": [], "top_logp": [], "rest_logp": [], "target_logp": [], "top1": []}
    for _, arrays in _passes(model, tokens, keep):
        for name, value in zip(parts, arrays):
            parts[name].append(np.array(value))
    arrays = {name: np.concatenate(v) for name, v in parts.items()}
    np.savez(out / "reference.npz", tokens=tokens, **arrays)
    nll = -arrays["target_logp"].ravel().astype(np.float64)
    ppl = float(np.exp(nll.mean()))
    rows = [{"task": "fidelity", "metric": "ppl", "value": ppl, "stderr": float(ppl * nll.std() / np.sqrt(nll.size)),
             "n": int(nll.size), "backend": p["backend"], "data": p["corpus"]}]
    return {"metrics": rows, "params": p, "scored_tokens": int(nll.size)}


def compare(model, ref: dict) -> dict:
    """Per-token statistics of `model` against the reference arrays; see the module doc for definitions."""
    tokens = ref["tokens"]
    half = tokens.shape[1] // 2

    def stats(logp, first):
        end = first + len(logp)
        top_ids = mx.array(ref["top_ids"][first:end])
        top_logp = mx.array(ref["top_logp"][first:end]).astype(mx.float32)
        rest_b = mx.array(ref["rest_logp"][first:end])
        q_top, rest_q = _top_and_rest(logp, top_ids)
        q_top = q_top.astype(mx.float16).astype(mx.float32)  # rounded as the base's were: a model against itself reads 0
        p_rest = mx.exp(rest_b)
        rest_term = mx.where(p_rest > 0, p_rest * (rest_b - rest_q), 0.0)  # no rest when k covers the vocabulary
        kl = mx.maximum((mx.exp(top_logp) * (top_logp - q_top)).sum(axis=-1) + rest_term, 0.0)
        target = mx.take_along_axis(logp, mx.array(tokens[first:end, half:])[..., None], axis=-1)[..., 0]
        same = mx.argmax(logp, axis=-1) == mx.array(ref["top1"][first:end])
        return kl, target, same

    kl, nll, same, dp = [], [], [], []
    for first, (k, target, s) in _passes(model, tokens, stats):
        target = np.array(target)
        kl.append(np.array(k))
        nll.append(-target)
        same.append(np.array(s))
        dp.append(np.exp(target) - np.exp(ref["target_logp"][first:first + len(target)]))
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
    p = {**DEFAULTS, **params}
    model, _ = _load(model_dir, p["backend"])
    with np.load(Path(reference_dir) / "reference.npz") as f:
        ref = dict(f)
    stats = compare(model, ref)
    n = stats.pop("n")
    (out / "fidelity.json").write_text(json.dumps({"params": p, "n": n, "stats": stats}, indent=2, sort_keys=True) + "\n")
    rows = [{"task": "fidelity", "metric": name, "value": value, "stderr": err, "n": n, "backend": p["backend"],
             "data": p["corpus"]} for name, (value, err) in stats.items()]
    return {"metrics": rows}


@task(name="reference", cache_policy=artifact_cache("reference", CODE_VERSION, loads_model=True), persist_result=True)
def reference_task(store: str, params: dict, inputs: list[ArtifactRef]) -> ArtifactRef:
    s = Store(store)
    base_dir = s.path(inputs[0])
    return s.produce("reference", CODE_VERSION, params, inputs, lambda out: reference(base_dir, params, out))


@task(name="fidelity", cache_policy=artifact_cache("fidelity", CODE_VERSION, loads_model=True), persist_result=True)
def fidelity_task(store: str, params: dict, inputs: list[ArtifactRef]) -> ArtifactRef:
    s = Store(store)
    model_dir, reference_dir = s.path(inputs[0]), s.path(inputs[1])
    return s.produce("fidelity", CODE_VERSION, params, inputs, lambda out: fidelity(model_dir, reference_dir, params, out))
