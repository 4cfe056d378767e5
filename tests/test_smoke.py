"""smoke: generate a short greedy answer with the model and judge it."""

import json
import shutil

import pytest
from mlx_lm import generate, load

from tasks.smoke import DEFAULTS, smoke, verdict

PROMPT = "What color is the sky?"


@pytest.mark.parametrize("tokens, text", [([], ""), ([5, 6], "  \n\t")])
def test_empty_text(tokens, text):
    assert verdict(tokens, text) == "empty"


def test_one_token_over_and_over():
    assert verdict([7] * 12, "the the the the the the the the the the the the") == "repetitive"
    assert verdict([1, 2, 3] + [7] * 9, "a b c the the the the the the the the the") == "repetitive"


@pytest.mark.parametrize("period", [2, 3, 4])
def test_short_loop(period):
    opening = list(range(100, 106))
    loop = list(range(10, 10 + period)) * (12 // period)
    assert verdict(opening + loop, "some words then a loop") == "repetitive"


def test_varied_text_passes():
    text = "The capital of France is Paris, a city on the Seine."
    tokens = list(range(40, 56))
    assert verdict(tokens, text) == "ok"
    assert verdict(tokens[:3], "Paris.") == "ok"  # short answers are fine
    assert verdict([1, 2, 1, 3, 1, 4, 5, 6, 7, 8], "varied but with a common word") == "ok"


@pytest.fixture(scope="module")
def smoked(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    info = smoke(tiny_model, {"prompt": PROMPT, "max_tokens": 12}, out)
    return out, info


def test_smoke_writes_its_answer(smoked):
    out, info = smoked
    saved = json.loads((out / "smoke.json").read_text())
    assert saved["prompt"] == PROMPT and saved["chat_template"] is True
    assert 1 <= len(saved["tokens"]) <= 12 and all(isinstance(t, int) for t in saved["tokens"])
    assert saved["text"] == info["text"] and saved["verdict"] == info["verdict"]
    assert saved["verdict"] == verdict(saved["tokens"], saved["text"])
    assert [p.name for p in out.iterdir()] == ["smoke.json"]


def test_smoke_metric_rows(smoked):
    out, info = smoked
    rows = {r["metric"]: r for r in info["metrics"]}
    assert {r["task"] for r in rows.values()} == {"smoke"}
    assert rows["generation_tokens_per_s"]["value"] > 0 and rows["prompt_tokens_per_s"]["value"] > 0
    assert rows["peak_memory_gb"]["value"] > 0
    tokens = json.loads((out / "smoke.json").read_text())["tokens"]
    assert rows["generated_tokens"]["value"] == len(tokens)
    assert rows["degenerate"]["value"] == (0.0 if info["verdict"] == "ok" else 1.0)


def test_smoke_applies_the_chat_template(smoked, tiny_model):
    _, info = smoked
    model, tokenizer = load(str(tiny_model))
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    assert "<|im_start|>" in tokenizer.decode(chat)
    assert info["text"] == generate(model, tokenizer, chat, max_tokens=12)
    assert info["text"] != generate(model, tokenizer, tokenizer.encode(PROMPT), max_tokens=12)


def test_smoke_without_a_chat_template_uses_the_plain_prompt(tiny_model, tmp_path):
    model_dir = shutil.copytree(tiny_model, tmp_path / "plain")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    info = smoke(model_dir, {"max_tokens": 12}, out)

    saved = json.loads((out / "smoke.json").read_text())
    assert saved["chat_template"] is False and saved["prompt"] == DEFAULTS["prompt"]
    model, tokenizer = load(str(model_dir))
    assert info["text"] == generate(model, tokenizer, tokenizer.encode(DEFAULTS["prompt"]), max_tokens=12)
