"""smoke: load the quantized model, generate a short answer, judge it.

The text and verdict are the artifact (deterministic: greedy decoding); speed
and memory go to metric rows only, since they differ from run to run.
"""

import json
from collections import Counter
from pathlib import Path

from prefect import task

from storage.artifacts import ArtifactRef, Store
from tasks.benchmark import load_as
from tasks.stage import artifact_cache

CODE_VERSION = "1"
# backend: as for the benchmark, native kernels or dequantized fp32 (the rows say which: speed differs)
DEFAULTS = {"prompt": "What is the capital of France? Answer in one sentence.", "max_tokens": 48, "backend": "native"}


def verdict(tokens: list[int], text: str) -> str:
    """'empty', 'repetitive' (one token or a short loop dominating), or 'ok'."""
    if not text.strip():
        return "empty"
    if len(tokens) >= 8:
        if Counter(tokens).most_common(1)[0][1] > len(tokens) / 2:
            return "repetitive"
        tail = tokens[len(tokens) // 2:]
        for period in range(1, 5):  # the second half is one short pattern over and over
            if all(tail[i] == tail[i - period] for i in range(period, len(tail))):
                return "repetitive"
    return "ok"


def smoke(model_dir: Path, params: dict, out: Path) -> dict:
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    params = {**DEFAULTS, **params}
    model, tokenizer = load_as(model_dir, params["backend"])
    chat = getattr(tokenizer, "chat_template", None) is not None
    if chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": params["prompt"]}], add_generation_prompt=True
        )
    else:
        prompt = tokenizer.encode(params["prompt"])

    mx.reset_peak_memory()
    tokens, text, last = [], "", None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=params["max_tokens"], sampler=make_sampler(temp=0.0)):
        text += last.text
        if last.token is not None:
            tokens.append(int(last.token))
    judged = verdict(tokens, text)
    (out / "smoke.json").write_text(json.dumps({
        "prompt": params["prompt"], "chat_template": chat, "text": text,
        "tokens": tokens, "verdict": judged,
    }, indent=2))
    rows = [
        {"task": "smoke", "metric": "generation_tokens_per_s", "value": round(last.generation_tps, 2) if last else 0.0},
        {"task": "smoke", "metric": "prompt_tokens_per_s", "value": round(last.prompt_tps, 2) if last else 0.0},
        {"task": "smoke", "metric": "peak_memory_gb", "value": round(mx.get_peak_memory() / 1e9, 4)},
        {"task": "smoke", "metric": "generated_tokens", "value": len(tokens)},
        {"task": "smoke", "metric": "degenerate", "value": 0.0 if judged == "ok" else 1.0},
    ]
    rows = [{**row, "backend": params["backend"]} for row in rows]
    return {"metrics": rows, "verdict": judged, "text": text}


@task(name="smoke", cache_policy=artifact_cache("smoke", CODE_VERSION, loads_model=True), persist_result=True)
def smoke_task(store: str, params: dict, inputs: list[ArtifactRef]) -> ArtifactRef:
    s = Store(store)
    model_dir = s.path(inputs[0])
    return s.produce("smoke", CODE_VERSION, params, inputs, lambda out: smoke(model_dir, params, out))
