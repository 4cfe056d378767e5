"""Scoring in checkpointed chunks: a benchmark killed halfway resumes from what it had finished.

lm-eval keeps no partial progress unless the model saves it, and the seven tasks model cards
report are ~69k requests unlimited (hours on a CPU). So requests are scored in fixed chunks of CHUNK
and each chunk's results are appended to a JSONL file as it finishes; a rerun takes every
chunk found whole and scores the rest. The chunks are cut from the full request list the same
way with or without a resume, so each is scored with the same batch-mates and the numbers are
identical; a chunk only partly written (a kill mid-write, a line cut short) is scored again.
"""

import hashlib
import json
from pathlib import Path

# Requests scored between two checkpoint writes: a resume redoes at most this many.
CHUNK = 512


def request_key(ctx: list[int], cont: list[int]) -> str:
    return hashlib.sha256(json.dumps([list(ctx), list(cont)]).encode()).hexdigest()[:32]


def read(path: Path) -> dict[str, tuple[float, bool]]:
    """{request key: (logprob, greedy)} of what the file holds; a line cut short by a kill is skipped."""
    done = {}
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row["key"]] = (row["logprob"], row["greedy"])
    return done


def scored(path: Path, requests: list[tuple[list[int], list[int]]], score) -> list[tuple[float, bool]]:
    """score(requests), chunk by chunk, each chunk's results appended to path as it finishes;
    a chunk whose every request the file already holds is taken from it instead."""
    keys = [request_key(ctx, cont) for ctx, cont in requests]
    done = read(path)
    for start in range(0, len(requests), CHUNK):
        chunk = range(start, min(start + CHUNK, len(requests)))
        if all(keys[i] in done for i in chunk):
            continue
        results = score([requests[i] for i in chunk])
        with Path(path).open("a") as f:
            for i, (logprob, greedy) in zip(chunk, results):
                done[keys[i]] = (logprob, greedy)
                f.write(json.dumps({"key": keys[i], "logprob": logprob, "greedy": greedy}) + "\n")
    return [done[k] for k in keys]
