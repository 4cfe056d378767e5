"""tasks/scoring.py on its own (no lm-eval): token lists in, every continuation scored as in its own forward pass."""

import mlx.core as mx
import pytest

from conftest import naive_tokens
from tasks.loading import load_as
from tasks.scoring import Scorer

PAIRS = [
    ("The sun rises in the", " east"),
    ("The sun rises in the", " west and sets in the east"),
    ("The sun rises in the", " north"),
    ("Question: What is two plus two?\nAnswer:", " four"),
    ("Question: What is two plus two?\nAnswer:", " five apples and a pear"),
    ("Question: What is ice?\nAnswer:", " frozen water"),
    ("Question: What is ice?\nAnswer:", " a kind of gas from the sun"),
    ("Question: What is ice?\nAnswer:", " fire"),
    ("Where do fish live?", " in water"),
    ("Where do fish live?", " in trees"),
]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    """The tiny model (its native bf16, as the lm-eval adapter's default runs it) and PAIRS as token lists."""
    model, tokenizer = load_as(tiny_model, "native")
    requests = [(tokenizer.encode(c), tokenizer.encode(x, add_special_tokens=False)) for c, x in PAIRS]
    return model, tokenizer, requests


def scorer(loaded, **kw) -> Scorer:
    model, tokenizer, _ = loaded
    return Scorer(model, prefix_token=tokenizer.bos_token_id, **kw)


@pytest.mark.parametrize("row_tokens, min_stream_tokens", [(64, 1), (0, 1), (64, 10_000)])
def test_packed_rows_and_streams_score_each_question_as_alone(loaded, monkeypatch, row_tokens, min_stream_tokens):
    """Several questions to a row, rows split over CPU streams: every answer scores as in its own forward pass."""
    import tasks.scoring

    monkeypatch.setattr(tasks.scoring, "ROW_TOKENS", row_tokens)
    monkeypatch.setattr(tasks.scoring, "MIN_TOKENS_PER_STREAM", min_stream_tokens)
    s = scorer(loaded, batch_size=2)
    s.streams = [mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)]
    assert s.packing
    model, _, requests = loaded
    for (ctx, cont), (logprob, greedy) in zip(requests, s.score(requests)):
        want_logprob, want_greedy = naive_tokens(model, ctx, cont)
        assert logprob == pytest.approx(want_logprob, abs=1e-4), (ctx, cont)
        assert greedy == want_greedy, (ctx, cont)


def test_unpacked_path_gives_the_same_scores(loaded):
    """A model whose rows cannot be packed (checked on a probe) is scored row by row, to the same numbers."""
    packed, plain = scorer(loaded, batch_size=3), scorer(loaded, batch_size=3)
    plain.__dict__["packing"] = False
    _, _, requests = loaded
    for (a, greedy_a), (b, greedy_b) in zip(packed.score(requests), plain.score(requests)):
        assert a == pytest.approx(b, abs=1e-4)
        assert greedy_a == greedy_b


def test_greedy_flag(loaded):
    model, tokenizer, _ = loaded
    ctx = tokenizer.encode("The moon goes around the")
    greedy = []
    for _ in range(2):
        greedy.append(mx.argmax(model(mx.array(ctx + greedy)[None])[0, -1]).item())
    other = [(greedy[0] + 1) % 512]
    got = scorer(loaded, batch_size=2).score([(ctx, greedy), (ctx, other), (ctx, [])])
    assert got[0][1] is True and got[1][1] is False and got[2] == (0.0, True)
    assert got[0][0] == pytest.approx(naive_tokens(model, ctx, greedy)[0], abs=1e-4)


def test_a_continuation_longer_than_the_context_window_is_refused(loaded):
    _, _, requests = loaded
    with pytest.raises(ValueError, match="exceeds max_length 4"):
        scorer(loaded, max_length=4).score([(requests[0][0], list(range(10)))])


def test_a_sliding_window_model_packs_rows_shorter_than_its_window():
    """gemma3: local layers attend within a sliding window. Questions that fit in it are packed, the others run
    alone, and every answer scores as in its own forward pass (mlx-lm's sliding-window mask)."""
    from tasks import compat

    model_class, args_class = compat.model_classes({"model_type": "gemma3_text"})
    mx.random.seed(0)
    model = model_class(args_class(model_type="gemma3_text", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                                   num_attention_heads=2, head_dim=32, vocab_size=300, query_pre_attn_scalar=32,
                                   sliding_window=24, sliding_window_pattern=2, max_position_embeddings=256))
    model.set_dtype(mx.float32)
    assert compat.packable_length(model) == 24
    short = [([2, 10, 11, 12], [[20, 21], [22], [23, 24, 25]]), ([2, 30, 31], [[40], [41, 42]])]
    long = [([2] + list(range(50, 80)), [[90, 91], [92]])]  # 31 tokens of context: past the window
    requests = [(ctx, cont) for ctx, conts in short + long for cont in conts]
    s = Scorer(model, prefix_token=2)
    assert s.packing
    for (ctx, cont), (logprob, greedy) in zip(requests, s.score(requests)):
        want_logprob, want_greedy = naive_tokens(model, ctx, cont)
        assert logprob == pytest.approx(want_logprob, abs=1e-4), (ctx, cont)
        assert greedy == want_greedy, (ctx, cont)
