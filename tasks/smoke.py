"""smoke: ask the quantized model one question, greedy, and judge its answer.

The text and verdict are the artifact (deterministic: greedy decoding); speed
and memory go to metric rows only, since they differ from run to run.

Verdicts, first match wins; only the tokens before EOS count:
- `stopped`: EOS was the first token: the model said nothing at all;
- `empty`: no visible text;
- `repetitive`: a loop. A stretch of the answer that repeats with some period p
  (any p) counts when it spans at least 3 periods and at least 12 tokens; shorter,
  a loop cannot be told from a phrase that recurs ("Paris. Paris. Paris."). The
  stretch need not reach the end: a model that loops until the last few tokens
  ("Ash and Ash: Ash and Ash: ... Ash:") looped. Also one token making up more
  than half of an answer of 16 tokens or more. Unless the base's own greedy answer
  loops too: see `repetitive_as_base`;
- `not_language`: word salad. The base model (fp32, the same chat-templated prompt)
  scores the answer: its mean negative log-likelihood per token, in nats
  (`answer_nll`), against the same for the base's own greedy answer
  (`base_answer_nll`). The answer fails when it exceeds the base's by more than
  6 nats per token (each token ~400x less likely than the base's own), judged on
  answers of 4 tokens or more;
- `repetitive_as_base`: the answer loops, and so does the base's own greedy answer to
  the same prompt (the base in fp32); it has at least half as many distinct tokens as the
  base's answer (a collapse to "the the the" is still `repetitive`), and it passes the
  word-salad check. A pretrained
  (not instruction-tuned) model under greedy decoding often loops: gemma-3-270m answers
  the demo's prompt "The sky is blue because the sun is the only source of light." and
  then "The sun is the only source of light." three times more. That says nothing about
  the quantization, which is what the smoke test asks about; the gate passes it, and
  the card says it loops, as its base does;
- `ok`.
Measured on SmolLM2-135M-Instruct (the demo base; 15 recipes, 4 prompts, plus
hand-written answers): the base's own answers score 0.15-0.62 nats. Word salad from
q2, q2-hi, mixed_2_6 and q3 scores 7.6-14 (7.1-13.6 over the base's answer), shuffled
words 7.2 (7.0 over); fluent answers, right or wrong (reworded, French, "Istanbul is
the capital city of Turkey.", "New York City"), 0.15-3.7, and a half-broken q3 answer
4.6 (4.3 over). Hence the 6-nat margin, between 4.3 and 7.0. Answers of a token or two
are each a surprise to the base ("Paris." 4.1-5.4, "PARIS" 5.6-7.1, depending on the
prompt): hence no judgement under 4 tokens. The mean, not the median: salad that
repeats a few common tokens has a median as low as 3.7. The margin is over the base's
own answer, not an absolute bound, so that a base which itself writes nonsense (the
tiny random test model) is not held to what it never does: the smoke test asks
whether quantizing broke the model, not whether the base is any good.
Without a base (base_dir None) there is no language check: the verdict comes from the
other checks and smoke.json says `"language_checked": false`.

Speed and peak memory come from the backend the sweep resolved (`smoke.backend`, auto: mlx's
native quantized kernels on a GPU, the weights as a user runs them; the same weights dequantized to
fp32 on a CPU, where the quantized kernels with float16 scales run ~25x slower than fp32), and the
rows say which, on which device. Peak memory covers loading the model and generating the answer:
what mlx_lm's own `generate` reports (natively, the weights plus a few MB: q8 of the demo model,
0.143 GB of weights, peaks at 0.150; dequantized, 4 bytes a weight). The base's pass comes after
and is not counted.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np

from tasks.loading import describe_device, load_as

# 2: verdicts on the tokens before EOS; loops of any period; word salad against the base. 3: repetitive_as_base
CODE_VERSION = "3"
PASSING = ("ok", "repetitive_as_base")  # the verdicts the smoke gate lets out
LOOP_PERIODS, LOOP_TOKENS = 3, 12  # a loop repeats at least this many times, over at least this many tokens
DOMINANT_TOKENS = 16               # answers this long fail when one token is more than half of them
LANGUAGE_MARGIN = 6.0              # nats per token over the base's own answer: word salad (see above)
LANGUAGE_TOKENS = 4                # shorter answers are not judged for it


def loop(tokens: list[int]) -> tuple[int, int] | None:
    """(period, length) of the longest stretch of `tokens` that counts as a loop, if any."""
    t, best = np.asarray(tokens), None
    for period in range(1, len(t) // LOOP_PERIODS + 1):
        same = np.concatenate([[False], t[period:] == t[:-period], [False]])  # token i+period repeats token i
        edges = np.flatnonzero(np.diff(same.astype(np.int8)))
        run = int((edges[1::2] - edges[::2]).max(initial=0)) + period  # the longest stretch: its repeats + the first period
        if run >= LOOP_PERIODS * period and run >= LOOP_TOKENS and (best is None or run > best[1]):
            best = (period, run)
    return best


def repeats(tokens: list[int]) -> bool:
    """A loop, or one token making up more than half of a long answer."""
    return loop(tokens) is not None or (
        len(tokens) >= DOMINANT_TOKENS and Counter(tokens).most_common(1)[0][1] > len(tokens) / 2)


def verdict(tokens: list[int], text: str, stopped: bool = False, nll: float | None = None,
            base_nll: float | None = None, base_tokens: list[int] | None = None) -> str:
    """Judge an answer: its tokens before EOS, its text, whether EOS came first, its mean NLL per token
    under the base next to the base's own answer's, and the base's own answer (None: not checked)."""
    if stopped and not tokens:
        return "stopped"
    if not text.strip():
        return "empty"
    looped = repeats(tokens)
    if looped and not (base_tokens and repeats(base_tokens) and 2 * len(set(tokens)) >= len(set(base_tokens))):
        return "repetitive"
    if len(tokens) >= LANGUAGE_TOKENS and nll is not None and base_nll is not None and nll > base_nll + LANGUAGE_MARGIN:
        return "not_language"
    return "repetitive_as_base" if looped else "ok"


def chat_prompt(tokenizer, prompt: str) -> tuple[list[int], bool]:
    """The prompt's tokens, chat-templated when the tokenizer has a template; and whether it has."""
    if getattr(tokenizer, "chat_template", None) is not None:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True), True
    return tokenizer.encode(prompt), False


def generate(model, tokenizer, prompt: list[int], max_tokens: int):
    """The greedy answer: (tokens before EOS, text, whether it ended with EOS, mlx-lm's last response)."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    tokens, text, last = [], "", None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)):
        text += last.text
        tokens.append(int(last.token))
    eos = last is not None and last.finish_reason == "stop"  # mlx-lm yields the EOS token last, with no text
    return (tokens[:-1] if eos else tokens), text, eos, last


def token_nll(model, prompt: list[int], answer: list[int]) -> list[float]:
    """Each answer token's negative log-likelihood (nats) under `model`, given the prompt and the answer so far."""
    import mlx.core as mx

    if not answer:
        return []
    logits = model(mx.array([prompt + answer[:-1]]))[0, len(prompt) - 1:].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return (-mx.take_along_axis(logp, mx.array(answer)[:, None], axis=-1)[:, 0]).tolist()


# (base folder, prompt, max_tokens) -> the base's own greedy answer and its NLLs: the same for every recipe's cell,
# so a sweep computes it once per process (the folder is a content-addressed artifact: its bytes never change)
_BASE_ANSWERS: dict[tuple, tuple] = {}


def base_judgement(base_dir: Path, prompt: str, tokens: list[int], max_tokens: int) -> dict:
    """The base (fp32) on the same question: its own greedy answer, and how surprising it finds each answer."""
    import mlx.core as mx

    base, tokenizer = load_as(base_dir, "fp32")
    prompt_tokens, _ = chat_prompt(tokenizer, prompt)
    memo = (str(Path(base_dir).resolve()), prompt, max_tokens)
    if memo not in _BASE_ANSWERS:
        base_tokens, base_text, _, _ = generate(base, tokenizer, prompt_tokens, max_tokens)
        _BASE_ANSWERS[memo] = (base_tokens, base_text, token_nll(base, prompt_tokens, base_tokens))
    base_tokens, base_text, base_nll = _BASE_ANSWERS[memo]
    nll = token_nll(base, prompt_tokens, tokens)
    del base
    mx.clear_cache()
    return {"answer_nll": _mean(nll), "base_answer_nll": _mean(base_nll), "answer_token_nll": [round(x, 4) for x in nll],
            "base_text": base_text, "base_tokens": base_tokens}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def smoke(model_dir: Path, params: dict, out: Path, base_dir: Path | None = None) -> dict:
    """params: SmokeSpec's fields (tasks/specs.py), the backend resolved to native or fp32; all given."""
    import mlx.core as mx

    mx.reset_peak_memory()  # before loading: what running the model takes, weights included
    model, tokenizer = load_as(model_dir, params["backend"])
    prompt, chat = chat_prompt(tokenizer, params["prompt"])
    tokens, text, eos, last = generate(model, tokenizer, prompt, params["max_tokens"])
    peak = mx.get_peak_memory()
    del model
    mx.clear_cache()

    language = base_judgement(base_dir, params["prompt"], tokens, params["max_tokens"]) if base_dir else {}
    judged = verdict(tokens, text, stopped=eos, nll=language.get("answer_nll"),
                     base_nll=language.get("base_answer_nll"), base_tokens=language.get("base_tokens"))
    (out / "smoke.json").write_text(json.dumps({
        "prompt": params["prompt"], "chat_template": chat, "text": text, "tokens": tokens, "eos": eos,
        "verdict": judged, "language_checked": base_dir is not None, "language_margin": LANGUAGE_MARGIN, **language,
    }, indent=2))

    # how the answer was made: these kernels on this device (speed and memory mean nothing without it)
    how = {"backend": params["backend"], "device": describe_device()}  # "cpu: AMD EPYC (mlx-cpu 0.32.4)"
    rows = [
        {"task": "smoke", "metric": "generation_tokens_per_s", "value": round(last.generation_tps, 2) if last else 0.0},
        {"task": "smoke", "metric": "prompt_tokens_per_s", "value": round(last.prompt_tps, 2) if last else 0.0},
        {"task": "smoke", "metric": "peak_memory_gb", "value": round(peak / 1e9, 4)},
        {"task": "smoke", "metric": "generated_tokens", "value": len(tokens)},
        {"task": "smoke", "metric": "degenerate", "value": 0.0 if judged in PASSING else 1.0},
    ]
    rows = [{**row, **how} for row in rows]
    for metric, n in (("answer_nll", len(tokens)), ("base_answer_nll", len(language.get("base_tokens", [])))):
        if language.get(metric) is not None:  # scored by the base in fp32, n tokens
            rows.append({"task": "smoke", "metric": metric, "value": language[metric], "n": n, "backend": "fp32",
                         "device": how["device"]})
    return {"metrics": rows, "verdict": judged, "text": text, **how}


def build(job) -> dict:
    """The smoke stage (tasks/registry.py); inputs: [the quantized model, the base as downloaded (HF layout)]."""
    return smoke(job.inputs[0], job.params, job.out, job.inputs[1])
