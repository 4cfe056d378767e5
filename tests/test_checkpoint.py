"""tasks/checkpoint.py: scored chunks survive a kill; a resume scores the same chunks, so the same numbers."""

import json
import random

import pytest

import tasks.checkpoint as checkpoint
from tasks.loading import load_as
from tasks.scoring import Scorer


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def scorer(tiny_model):
    model, tokenizer = load_as(tiny_model, "fp32")
    return Scorer(model, batch_size=4, prefix_token=tokenizer.bos_token_id)


@pytest.fixture
def requests():
    """25 questions of 2 to 4 choices: 74 requests, random tokens of the tiny model's vocabulary (512)."""
    rng = random.Random(0)
    out = []
    for _ in range(25):
        ctx = [rng.randrange(512) for _ in range(rng.randrange(3, 12))]
        out += [(ctx, [rng.randrange(512) for _ in range(rng.randrange(1, 5))]) for _ in range(rng.randrange(2, 5))]
    return out


def recording(score, calls, die_at=None):
    """score, noting the first request of every chunk it is given; raises Killed on chunk number die_at."""
    def wrapped(chunk):
        calls.append(chunk[0])
        if len(calls) == die_at:
            raise Killed
        return score(chunk)
    return wrapped


def test_a_resume_scores_only_the_missing_chunks_to_the_same_numbers(scorer, requests, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "CHUNK", 20)  # 74 requests: chunks at 0, 20, 40, 60
    whole_calls, killed_calls, resumed_calls = [], [], []
    whole = checkpoint.scored(tmp_path / "whole.jsonl", requests, recording(scorer.score, whole_calls))
    assert whole_calls == [requests[i] for i in (0, 20, 40, 60)]
    assert len((tmp_path / "whole.jsonl").read_text().splitlines()) == len(requests)

    with pytest.raises(Killed):
        checkpoint.scored(tmp_path / "c.jsonl", requests, recording(scorer.score, killed_calls, die_at=3))
    assert len(checkpoint.read(tmp_path / "c.jsonl")) == 40  # two chunks made it to the file
    resumed = checkpoint.scored(tmp_path / "c.jsonl", requests, recording(scorer.score, resumed_calls))
    assert resumed_calls == [requests[i] for i in (40, 60)]
    assert resumed == whole  # exactly: the same chunks, the same batch-mates
    assert resumed == checkpoint.scored(tmp_path / "c.jsonl", requests, recording(scorer.score, []))  # all held


def test_a_line_cut_short_is_ignored_and_its_chunk_scored_again(scorer, requests, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "CHUNK", 20)
    path = tmp_path / "c.jsonl"
    whole = checkpoint.scored(path, requests, scorer.score)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:30]) + "\n" + lines[30][:17])  # killed while writing the 2nd chunk's 11th line
    assert len(checkpoint.read(path)) == 30
    calls = []
    assert checkpoint.scored(path, requests, recording(scorer.score, calls)) == whole
    assert calls == [requests[i] for i in (20, 40, 60)]  # the partial chunk whole again, not from its 11th line
    assert all(json.loads(line) for line in path.read_text().splitlines()[31:])


def test_keys_tell_requests_apart():
    assert checkpoint.request_key([1, 2], [3]) != checkpoint.request_key([1], [2, 3])
    assert checkpoint.request_key([1, 2], [3]) == checkpoint.request_key((1, 2), (3,))
