"""Log-likelihoods of continuations given contexts, many to a forward pass: the benchmark's scorer.

It knows nothing of lm-eval: requests are (context tokens, continuation tokens), results are
(log-probability of the continuation, whether greedy decoding would have produced it).

Why not one pass per request (mlx_lm.evaluate does that): a multiple-choice question repeats its
context for every choice. Here a context and all its continuations share a row, several questions
share a row, a mask lets each continuation see only its context and itself, at the positions it
would have alone, and the rows are split over one mlx stream per core (tasks/cpu.py). On
SmolLM2-135M, arc_easy, 100 questions, 2 CPU cores: 47 requests/s against mlx_lm.evaluate's 2.9
(16x), 55% of the machine's fp32 GEMM limit, every log-likelihood equal to 4e-5 nats
(bench/RESULTS.md). Packing patches the model (per-token RoPE positions, a stand-in KV cache:
tasks/compat.py), so it is used only after a probe scores the same packed and alone.
"""

import functools
from collections import defaultdict

import mlx.core as mx
import numpy as np

from tasks import compat, cpu
from tasks.loading import trunk_and_head

# Token positions (padding included) in one forward pass: bounds memory, keeps GEMMs large.
TOKENS_PER_BATCH = 4096
# Questions share a row up to this many tokens: long enough to pack well, short enough that
# attention (quadratic in the row) stays small beside the matmuls.
ROW_TOKENS = 64
# A stream gets at least this many context tokens, or matmuls get too thin to pay for the split.
MIN_TOKENS_PER_STREAM = 128


class Scorer:
    def __init__(self, model, batch_size: int = 16, max_length: int = 2048, prefix_token: int = 0):
        self.model, self.batch_size, self.max_length = model, batch_size, max_length
        self.prefix_token = prefix_token  # starts the probes: a token every model has
        self.streams = cpu.streams()

    def score(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """[(context, continuation)] -> [(log-probability of the continuation, greedy)]."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        by_context = defaultdict(list)
        for i, (ctx, cont) in enumerate(requests):
            if not cont:
                results[i] = (0.0, True)
            else:
                by_context[tuple(ctx)].append(i)

        # Several continuations of one context (multiple choice): the context and all its
        # continuations are packed into a row, several questions to a row, and run in one
        # pass; a mask lets each continuation see its context and itself only, at the
        # positions it would have alone. Rows are filled to about the same length.
        if self.packing:
            packed = []
            for ctx, idx in list(by_context.items()):
                group = (list(ctx), [(i, requests[i][1]) for i in idx])
                if (len(idx) > 1 and len(ctx) + max(len(c) for _, c in group[1]) <= self.max_length + 1
                        and _packed_length(group) <= self.packable):
                    packed.append(group)
                    del by_context[ctx]
            rows = _fill_rows(packed, self.packable)
            per_batch = max(1, min(4 * self.batch_size, TOKENS_PER_BATCH // max(map(_row_length, rows), default=1)))
            for start in range(0, len(rows), per_batch):
                self._score_rows(rows[start:start + per_batch], results)

        # A row is one model input, (context + continuation)[:-1]. Continuations of a
        # context share a row when one input is a prefix of another: single-token
        # answers (" A", " B", ...) then cost one row, not one each.
        groups = []  # (rows, [(request, row, first scored position, targets)])
        for ctx, idx in by_context.items():
            rows, slots = [], []
            for i in sorted(idx, key=lambda i: (-len(requests[i][1]), i)):
                cont = requests[i][1]
                if len(cont) > self.max_length:
                    raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
                inp = (list(ctx) + cont)[-(self.max_length + 1):][:-1]
                r = next((r for r, row in enumerate(rows) if row[:len(inp)] == inp), None)
                if r is None:
                    rows.append(inp)
                    r = len(rows) - 1
                slots.append((i, r, len(inp) - len(cont), cont))
            groups.append((rows, slots))

        # Longest first (similar lengths batch together, memory peaks early); a
        # context's rows stay in one batch unless they alone exceed batch_size.
        groups.sort(key=lambda g: -len(g[0][0]))
        batch, batch_slots = [], []
        for rows, slots in groups:
            if batch and len(batch) + len(rows) > self.batch_size:
                self._score_batch(batch, batch_slots, results)
                batch, batch_slots = [], []
            for r, row in enumerate(rows):
                if len(batch) == self.batch_size:
                    self._score_batch(batch, batch_slots, results)
                    batch, batch_slots = [], []
                batch.append(row)
                batch_slots += [(i, len(batch) - 1, pos, cont) for i, rr, pos, cont in slots if rr == r]
        if batch:
            self._score_batch(batch, batch_slots, results)
        return results

    @functools.cached_property
    def trunk_and_head(self):
        return trunk_and_head(self.model, self.prefix_token)

    @functools.cached_property
    def packable(self) -> float:
        """The longest packed row: unbounded, or a sliding-window model's window (compat.packable_length)."""
        return compat.packable_length(self.model)

    @functools.cached_property
    def packing(self) -> bool:
        """Whether packed rows score as the model would alone: checked on a probe, with RoPE made position-aware.

        Needs plain KV caches, or a sliding window no row reaches past, and attention modules with a `rope`
        that takes an offset, as mlx-lm's llama-family and gemma3 models have; else rows are not packed.
        """
        ctx, conts = [self.prefix_token, 3, 4, 5, 6], [[7, 8], [9], [10, 11, 12]]
        if self.packable < _packed_length((ctx, list(enumerate(conts)))) or not compat.positioned_rope(self.model):
            return False
        got = [0.0] * len(conts)
        owner, logits, picked, _ = self._packed_graph([[(ctx, list(enumerate(conts)))]])
        for b, lp in zip(owner, (np.array(picked) - cpu.logsumexp_now(logits)).tolist()):
            got[b] += lp
        for cont, lp in zip(conts, got):
            logits = self.model(mx.array([ctx + cont[:-1]]))[0, len(ctx) - 1:].astype(mx.float32)
            want = (mx.take_along_axis(logits, mx.array(cont)[:, None], axis=-1)[:, 0]
                    - mx.logsumexp(logits, axis=-1)).sum().item()
            if not abs(lp - want) <= 1e-3 * max(1.0, abs(want)):
                return False
        return True

    def _score_rows(self, rows: list[list[tuple[list[int], list[tuple[int, list[int]]]]]], results) -> None:
        """rows: [[(context, [(request index, continuation)])]]. Split over the streams, evaluated together."""
        n = max(1, min(len(self.streams), len(rows), sum(map(_row_length, rows)) // MIN_TOKENS_PER_STREAM))
        pending = []
        with cpu.blas_threads(1 if n > 1 else None):
            for stream, part in zip(self.streams, _split(rows, n)):
                with mx.stream(stream):
                    pending.append((part, *self._packed_graph(part)))
            mx.eval([arrays for _, _, *arrays in pending])
        for part, owner, logits, picked, greedy in pending:
            items = [i for row in part for _, its in row for i, _ in its]
            logprobs = np.array(picked, dtype=np.float64) - cpu.logsumexp_now(logits)
            owner, greedy = np.array(owner), np.array(greedy)
            totals = np.bincount(owner, weights=logprobs, minlength=len(items))
            misses = np.bincount(owner, weights=~greedy, minlength=len(items))
            for b, i in enumerate(items):
                results[i] = (float(totals[b]), bool(misses[b] == 0))

    def _packed_graph(self, rows):
        """The lazy graph scoring every continuation in these rows in one forward pass.

        A question in a row is its context followed by each continuation minus its last
        token. Returns (owner, logits, the target's logit, greedy) per scored token, owner numbering
        the continuations in row order; log-prob = target's logit - logsumexp(logits), taken once evaluated.
        """
        trunk, head = self.trunk_and_head
        width = max(map(_row_length, rows))
        tokens = np.zeros((len(rows), width), dtype=np.int32)
        positions = np.zeros((len(rows), width), dtype=np.int32)
        # Per position: its segment (a context or one continuation) and its question's context
        # segment; padding is segment -1, a question of its own.
        segment = np.full((len(rows), width), -1, dtype=np.int32)
        context = np.full((len(rows), width), -1, dtype=np.int32)
        owner, where, targets, item, seg = [], [], [], 0, 0
        for r, row in enumerate(rows):
            end = 0
            for ctx, items in row:
                n, start, ctx_seg = len(ctx), end, seg
                tokens[r, end:end + n], positions[r, end:end + n] = ctx, np.arange(n)
                segment[r, end:end + n] = context[r, end:end + n] = ctx_seg
                end, seg = end + n, seg + 1
                for _, cont in items:
                    k = len(cont) - 1
                    tokens[r, end:end + k], positions[r, end:end + k] = cont[:-1], n + np.arange(k)
                    segment[r, end:end + k], context[r, end:end + k] = seg, ctx_seg
                    # cont[0] is predicted at the context's last position, cont[j] at cont[j-1]'s
                    where += [r * width + start + n - 1] + [r * width + end + j for j in range(k)]
                    targets += cont
                    owner += [item] * len(cont)
                    item, end, seg = item + 1, end + k, seg + 1
        # Causal in packed order; a position sees its own segment and its question's context.
        mask = np.tril(np.ones((width, width), dtype=bool)) & (
            (segment[:, None, :] == segment[:, :, None]) | (segment[:, None, :] == context[:, :, None]))
        mask, positions = mx.array(mask[:, None]), mx.array(positions)
        hidden = trunk(mx.array(tokens), cache=[compat.PackedRowsCache(mask, positions) for _ in self.model.layers])
        logits = head(hidden.reshape(-1, hidden.shape[-1])[mx.array(where)]).astype(mx.float32)
        target = mx.array(targets)
        picked = mx.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
        return owner, logits, picked, mx.argmax(logits, axis=-1) == target

    def _score_batch(self, rows, slots, results) -> None:
        """One right-padded forward pass; gather the log-probs of every scored token."""
        trunk, head = self.trunk_and_head
        tokens = np.zeros((len(rows), max(map(len, rows))), dtype=np.int32)
        for b, row in enumerate(rows):
            tokens[b, :len(row)] = row
        b_idx = np.concatenate([np.full(len(c), b) for _, b, _, c in slots])
        p_idx = np.concatenate([np.arange(pos, pos + len(c)) for _, _, pos, c in slots])
        targets = mx.array(np.concatenate([c for *_, c in slots]).astype(np.int32))

        hidden = trunk(mx.array(tokens))
        picked = head(hidden[mx.array(b_idx), mx.array(p_idx)]).astype(mx.float32)
        target_logit = mx.take_along_axis(picked, targets[:, None], axis=-1)[:, 0]
        greedy = mx.argmax(picked, axis=-1) == targets
        mx.eval(picked, target_logit, greedy)
        logprobs = np.array(target_logit, dtype=np.float64) - cpu.logsumexp_now(picked)
        greedy = np.array(greedy)

        start = 0
        for i, _, _, cont in slots:
            end = start + len(cont)
            results[i] = (float(logprobs[start:end].sum()), bool(greedy[start:end].all()))
            start = end


def _split(rows: list, n: int) -> list[list]:
    """n runs of consecutive rows with about equal token counts."""
    cost = list(map(_row_length, rows))
    target, parts, acc = sum(cost) / n, [[] for _ in range(n)], 0.0
    for row, c in zip(rows, cost):
        parts[min(n - 1, int(acc / target))].append(row)
        acc += c
    return [p for p in parts if p]


def _fill_rows(groups: list, longest: float = float("inf")) -> list[list]:
    """First-fit decreasing: questions into rows of ROW_TOKENS (or the longest question), longest rows first;
    no row longer than `longest` (a sliding window), which no question is.

    Only the last few rows are tried, so that a task of many thousand questions packs in linear time.
    """
    groups = sorted(groups, key=_packed_length, reverse=True)
    width = max([min(ROW_TOKENS, longest)] + [_packed_length(g) for g in groups[:1]])
    rows, room = [], []
    for g in groups:
        n = _packed_length(g)
        r = next((r for r in range(max(0, len(rows) - 32), len(rows)) if room[r] >= n), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(g)
        room[r] -= n
    return rows


def _row_length(row) -> int:
    return sum(map(_packed_length, row))


def _packed_length(group) -> int:
    ctx, items = group
    return len(ctx) + sum(len(cont) - 1 for _, cont in items)
