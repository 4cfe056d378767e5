"""MLXLM, qsweep's lm-eval LM: lm-eval's requests in, each scored as a plain forward pass would score it."""

from pathlib import Path

import mlx.core as mx
import pytest
from lm_eval.api.instance import Instance
from mlx.utils import tree_flatten

from conftest import naive_tokens
from tasks.benchmark import LOCAL_TASKS
from tasks.lm_adapter import MLXLM


@pytest.fixture(scope="module")
def lm(tiny_model):
    return MLXLM(tiny_model, batch_size=2)


def naive_loglikelihood(lm, context, continuation):
    """One full forward per request, tokenised the way lm-eval's HFLM does."""
    tok = lm.tokenizer
    if context:
        n_spaces = len(context) - len(context.rstrip())
        context, continuation = context[: len(context) - n_spaces], context[len(context) - n_spaces:] + continuation
        ctx = tok.encode(context)
        cont = tok.encode(context + continuation)[len(ctx):]
    else:
        ctx, cont = [lm.prefix_token_id], tok.encode(continuation, add_special_tokens=False)
    return naive_tokens(lm.model, ctx, cont)


def test_batched_loglikelihood_matches_naive(lm):
    pairs = [
        ("The sun rises in the", " east"),
        ("The sun rises in the", " west and sets in the east"),  # shares a row with " east"
        ("The sun rises in the", " north"),
        ("", "Water boils at one hundred degrees."),
        ("A cat is an animal with ", "four legs"),  # trailing space moves to the continuation
        ("Question: What is two plus two?\nAnswer:", " four"),
        ("Question: What is two plus two?\nAnswer:", " five"),
        ("x", " y"),
    ]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for pair, (logprob, greedy) in zip(pairs, got):
        want_logprob, want_greedy = naive_loglikelihood(lm, *pair)
        assert logprob == pytest.approx(want_logprob, abs=1e-4), pair
        assert greedy == want_greedy, pair


def test_loglikelihood_rolling(lm, tiny_model):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    text = (Path(LOCAL_TASKS).parent / "corpus.txt").read_text()[:400]
    [whole] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert whole == pytest.approx(naive_loglikelihood(lm, "", text)[0], abs=1e-3)

    short = MLXLM(tiny_model, batch_size=4, max_length=16)
    [windowed] = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    tokens = lm.tok_encode(text, add_special_tokens=False)
    windows = map(make_disjoint_window, get_rolling_token_windows(tokens, lm.prefix_token_id, 16, 1))
    assert windowed == pytest.approx(sum(naive_tokens(lm.model, c, k)[0] for c, k in windows), abs=1e-3)


def test_generate_until(lm):
    from mlx_lm import generate

    prompt = "The sun rises in the"
    reference = generate(lm.model, lm.tokenizer, lm.tok_encode(prompt), max_tokens=12)
    stop = reference[len(reference) // 2:][:2]
    [text] = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 12}), 0)])
    assert text == reference.split(stop, 1)[0] and text
    [whole] = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 12}), 0)])
    assert whole == reference


def test_fp32_backend_gives_the_native_answers(quantized_model):
    """Dequantized fp32 is the same model: the same log-likelihoods and choices, only faster on a CPU."""
    native, fp32 = MLXLM(quantized_model, backend="native"), MLXLM(quantized_model, backend="fp32")
    assert all(p.dtype == mx.float32 for _, p in tree_flatten(fp32.model.parameters()))
    requests = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(
        [("The sky is", " blue"), ("The sky is", " green today"), ("Water boils at", " one hundred degrees")])]
    for (a, greedy_a), (b, greedy_b) in zip(native.loglikelihood(requests), fp32.loglikelihood(requests)):
        assert a == pytest.approx(b, rel=0.01)  # bf16 activations vs fp32: rounding, not a different model
        assert greedy_a == greedy_b


def test_a_checkpoint_file_gives_the_same_numbers(lm, tiny_model, tmp_path):
    """With a checkpoint the adapter scores through tasks/checkpoint.py: same results, and the file holds them."""
    from tasks import checkpoint

    requests = [(("", ""), lm.tok_encode(c), lm.tok_encode(x, add_special_tokens=False))
                for c, x in [("The sky is", " blue"), ("The sky is", " grey"), ("Fish live in", " water")]]
    saved = MLXLM(tiny_model, batch_size=2, checkpoint=tmp_path / "c.jsonl")
    got = saved._loglikelihood_tokens(requests)
    assert got == lm._loglikelihood_tokens(requests)
    held = checkpoint.read(tmp_path / "c.jsonl")
    assert [held[checkpoint.request_key(ctx, cont)] for _, ctx, cont in requests] == got
