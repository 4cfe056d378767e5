"""Benchmark stage: run lm-eval tasks on an MLX model directory.

`MLXLM` adapts an mlx-lm model to lm-eval's LM interface. It subclasses lm-eval's
TemplateLM so that context/continuation tokenisation (trailing-space handling, the
empty-context prefix token) is lm-eval's own code, exactly as HFLM does it.
"""

import functools
import hashlib
import json
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from lm_eval.api.model import TemplateLM
from prefect import task

from storage.artifacts import ArtifactRef, Store, artifact_key
from tasks import cpu
from tasks.remote_code import load_options
from tasks.stage import artifact_cache

CODE_VERSION = "7"  # 5: per-question samples.jsonl; 6: scored in checkpointed chunks (resume);
# 7: `limit` evaluates a seeded random sample of each task's documents, not the first ones
LOCAL_TASKS = Path(__file__).parent / "data" / "lm_eval"

DEFAULTS = {"tasks": [], "limit": None, "num_fewshot": 0, "chat_template": False, "seed": 0, "batch_size": 16,
            "backend": "native"}
# native: mlx's quantized kernels, as the model runs for users (fast on Metal/CUDA).
# fp32: dequantized weights, the same numbers at dense speed (fast on a CPU with a real BLAS).
BACKENDS = ("auto", "native", "fp32")


def load_as(model_dir: Path, backend: str):
    """mlx_lm.load, with the weights as the backend runs them."""
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    if backend not in ("native", "fp32"):
        raise ValueError(f"backend {backend!r} is not allowed; allowed: {', '.join(BACKENDS)}")
    model, tokenizer = load(str(model_dir), **load_options())
    if backend == "fp32":
        # The same quantized weights, expanded: a CPU runs dense fp32 matmuls
        # through BLAS far faster than quantized_matmul or bf16.
        model = dequantize_model(model)
        model.set_dtype(mx.float32)
    return model, tokenizer


def resolve_backend(backend: str) -> str:
    """'auto' is native on a GPU and fp32 on a CPU; resolved before keying, since results differ slightly."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not allowed; allowed: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "native" if mx.default_device() == mx.gpu else "fp32"
# Mean metrics (acc, acc_norm) get a closed-form stderr; this only drives the
# bootstrapped ones (perplexity, f1, ...), whose resampling is seeded by lm-eval.
BOOTSTRAP_ITERS = 1000
# Token positions (padding included) in one forward pass: bounds memory, keeps GEMMs large.
TOKENS_PER_BATCH = 4096
# Questions share a row up to this many tokens: long enough to pack well, short enough that
# attention (quadratic in the row) stays small beside the matmuls.
ROW_TOKENS = 64
# Requests scored between two checkpoint writes: a resume redoes at most this many.
CHECKPOINT_EVERY = 512
# A stream gets at least this many context tokens, or matmuls get too thin to pay for the split.
MIN_TOKENS_PER_STREAM = 128
# Top-level fields of lm-eval's results that change with the clock, machine or
# checkout, not with the inputs.
VOLATILE_KEYS = {"date", "start_time", "end_time", "total_evaluation_time_seconds",
                 "git_hash", "upper_git_hash", "pretty_env_info"}


class MLXLM(TemplateLM):
    backend = "causal"

    def __init__(self, model_dir: Path, batch_size: int = 16, max_length: int | None = None, backend: str = "native",
                 checkpoint: Path | None = None):
        super().__init__()
        self.checkpoint = Path(checkpoint) if checkpoint else None  # scored requests so far: see _loglikelihood_tokens
        self.resumed = 0  # requests taken from the checkpoint instead of scored
        self.model_dir = Path(model_dir)
        self.model, self.tokenizer = load_as(self.model_dir, backend)
        cpu.fast_swiglu(self.model)
        self._streams = cpu.streams()
        self.weights = backend  # not `self.backend`: lm-eval reads that as "causal" or "seq2seq"
        self.tokens_fed = 0  # token positions run through the model, padding excluded: for throughput
        self.batch_size = batch_size
        config = json.loads((self.model_dir / "config.json").read_text())
        self._max_length = max_length or _context_length(config)

    # ---- tokenisation, as lm-eval's HFLM does it
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        # A chat-templated prompt already starts with BOS; do not add a second one.
        if add_special_tokens is None and string.startswith(self.tokenizer.decode([self.prefix_token_id])):
            kw["add_special_tokens"] = False
        return self.tokenizer.encode(string, **kw)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    # ---- scoring
    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        """requests: [((context, continuation), context_tokens, continuation_tokens)].

        With a checkpoint file, requests are scored in fixed chunks and each chunk's results
        are appended to it; a benchmark killed halfway resumes from what it had finished.
        The chunks are the same with or without a resume, so the numbers are too.
        """
        if self.checkpoint is None:
            return self._score(requests)
        keys = [_request_key(ctx, cont) for _, ctx, cont in requests]
        done = {}
        if self.checkpoint.exists():
            for line in self.checkpoint.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the kill
                    continue
                done[row["key"]] = (row["logprob"], row["greedy"])
        todo = [i for i, k in enumerate(keys) if k not in done]
        self.resumed += len(requests) - len(todo)
        for start in range(0, len(todo), CHECKPOINT_EVERY):
            chunk = todo[start:start + CHECKPOINT_EVERY]
            scored = self._score([requests[i] for i in chunk])
            with self.checkpoint.open("a") as f:
                for i, (logprob, greedy) in zip(chunk, scored):
                    done[keys[i]] = (logprob, greedy)
                    f.write(json.dumps({"key": keys[i], "logprob": logprob, "greedy": greedy}) + "\n")
        return [done[k] for k in keys]

    def _score(self, requests) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        by_context = defaultdict(list)
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                results[i] = (0.0, True)
            else:
                by_context[tuple(ctx)].append(i)

        # Several continuations of one context (multiple choice): the context and all its
        # continuations are packed into a row, several questions to a row, and run in one
        # pass; a mask lets each continuation see its context and itself only, at the
        # positions it would have alone. Rows are filled to about the same length.
        if self._packing:
            packed = []
            for ctx, idx in list(by_context.items()):
                conts = [requests[i][2] for i in idx]
                if len(idx) > 1 and len(ctx) + max(map(len, conts)) <= self.max_length + 1:
                    packed.append((list(ctx), list(zip(idx, conts))))
                    del by_context[ctx]
            rows = _fill_rows(packed)
            per_batch = max(1, min(4 * self.batch_size, TOKENS_PER_BATCH // max(map(_row_length, rows), default=1)))
            for start in range(0, len(rows), per_batch):
                self._score_rows(rows[start:start + per_batch], results)

        # A row is one model input, (context + continuation)[:-1]. Continuations of a
        # context share a row when one input is a prefix of another: single-token
        # answers (" A", " B", ...) then cost one row, not one each.
        groups = []  # (rows, [(request, row, first scored position, targets)])
        for ctx, idx in by_context.items():
            rows, slots = [], []
            for i in sorted(idx, key=lambda i: (-len(requests[i][2]), i)):
                cont = requests[i][2]
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
    def _trunk_and_head(self):
        return trunk_and_head(self.model, self.prefix_token_id)

    @functools.cached_property
    def _packing(self) -> bool:
        """Whether packed rows score as the model would alone: checked on a probe, with RoPE made position-aware.

        Needs plain KV caches (no sliding window) and attention modules with a `rope`
        that takes an offset, as mlx-lm's llama-family models have; else rows are not packed.
        """
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        attention = [getattr(layer, "self_attn", None) for layer in self.model.layers]
        if not all(type(c) is KVCache for c in make_prompt_cache(self.model)) or not all(
                hasattr(a, "rope") for a in attention):
            return False
        for a in attention:
            if not isinstance(a.rope, _PositionedRoPE):
                a.rope = _PositionedRoPE(a.rope)
        ctx, conts = [self.prefix_token_id, 3, 4, 5, 6], [[7, 8], [9], [10, 11, 12]]
        got, fed = [0.0] * len(conts), self.tokens_fed
        owner, logprobs, _ = self._packed_graph([[(ctx, list(enumerate(conts)))]])
        for b, lp in zip(owner, np.array(logprobs).tolist()):
            got[b] += lp
        self.tokens_fed = fed  # the probe is not throughput
        for cont, lp in zip(conts, got):
            logits = self.model(mx.array([ctx + cont[:-1]]))[0, len(ctx) - 1:].astype(mx.float32)
            want = (mx.take_along_axis(logits, mx.array(cont)[:, None], axis=-1)[:, 0]
                    - mx.logsumexp(logits, axis=-1)).sum().item()
            if not abs(lp - want) <= 1e-3 * max(1.0, abs(want)):
                return False
        return True

    def _score_rows(self, rows: list[list[tuple[list[int], list[tuple[int, list[int]]]]]], results) -> None:
        """rows: [[(context, [(request index, continuation)])]]. Split over the streams, evaluated together."""
        n = max(1, min(len(self._streams), len(rows), sum(map(_row_length, rows)) // MIN_TOKENS_PER_STREAM))
        pending = []
        with cpu.blas_threads(1 if n > 1 else None):
            for stream, part in zip(self._streams, _split(rows, n)):
                with mx.stream(stream):
                    pending.append((part, *self._packed_graph(part)))
            mx.eval([arrays for _, *arrays in pending])
        for part, owner, logprobs, greedy in pending:
            items = [i for row in part for _, its in row for i, _ in its]
            owner, logprobs, greedy = np.array(owner), np.array(logprobs, dtype=np.float64), np.array(greedy)
            totals = np.bincount(owner, weights=logprobs, minlength=len(items))
            misses = np.bincount(owner, weights=~greedy, minlength=len(items))
            for b, i in enumerate(items):
                results[i] = (float(totals[b]), bool(misses[b] == 0))

    def _packed_graph(self, rows):
        """The lazy graph scoring every continuation in these rows in one forward pass.

        A question in a row is its context followed by each continuation minus its last
        token. Returns (owner, log-prob, greedy) per scored token, owner numbering the
        continuations in row order.
        """
        trunk, head = self._trunk_and_head
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
        self.tokens_fed += int((segment >= 0).sum())
        # Causal in packed order; a position sees its own segment and its question's context.
        mask = np.tril(np.ones((width, width), dtype=bool)) & (
            (segment[:, None, :] == segment[:, :, None]) | (segment[:, None, :] == context[:, :, None]))
        hidden = trunk(mx.array(tokens), cache=[_PackedRows(mx.array(mask[:, None]), mx.array(positions))
                                                 for _ in self.model.layers])
        logits = head(hidden.reshape(-1, hidden.shape[-1])[mx.array(where)]).astype(mx.float32)
        target = mx.array(targets)
        logprobs = mx.take_along_axis(logits, target[:, None], axis=-1)[:, 0] - cpu.logsumexp(logits)
        return owner, logprobs, mx.argmax(logits, axis=-1) == target

    def _score_batch(self, rows, slots, results) -> None:
        """One right-padded forward pass; gather the log-probs of every scored token."""
        trunk, head = self._trunk_and_head
        tokens = np.zeros((len(rows), max(map(len, rows))), dtype=np.int32)
        for b, row in enumerate(rows):
            tokens[b, :len(row)] = row
        b_idx = np.concatenate([np.full(len(c), b) for _, b, _, c in slots])
        p_idx = np.concatenate([np.arange(pos, pos + len(c)) for _, _, pos, c in slots])
        targets = mx.array(np.concatenate([c for *_, c in slots]).astype(np.int32))

        hidden = trunk(mx.array(tokens))
        self.tokens_fed += sum(map(len, rows))
        picked = head(hidden[mx.array(b_idx), mx.array(p_idx)]).astype(mx.float32)
        logprobs = mx.take_along_axis(picked, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(picked, axis=-1)
        greedy = mx.argmax(picked, axis=-1) == targets
        mx.eval(logprobs, greedy)
        logprobs, greedy = np.array(logprobs, dtype=np.float64), np.array(greedy)

        start = 0
        for i, _, _, cont in slots:
            end = start + len(cont)
            results[i] = (float(logprobs[start:end].sum()), bool(greedy[start:end].all()))
            start = end

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            # The prefix token conditions the first window, so no BOS from the tokenizer.
            tokens = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(((text, ""), ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[n] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from mlx_lm import stream_generate

        outputs = []
        for req in requests:
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(gen_kwargs.get("max_gen_toks", 256))
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_gen):]
            text = ""
            # The default sampler is argmax: greedy whatever the task asks. EOS stops it too.
            for response in stream_generate(self.model, self.tokenizer, prompt, max_tokens=max_gen):
                text += response.text
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u, 1)[0]
            outputs.append(text)
        return outputs


def _split(rows: list, n: int) -> list[list]:
    """n runs of consecutive rows with about equal token counts."""
    cost = list(map(_row_length, rows))
    target, parts, acc = sum(cost) / n, [[] for _ in range(n)], 0.0
    for row, c in zip(rows, cost):
        parts[min(n - 1, int(acc / target))].append(row)
        acc += c
    return [p for p in parts if p]


def _fill_rows(groups: list) -> list[list]:
    """First-fit decreasing: questions into rows of ROW_TOKENS (or the longest question), longest rows first.

    Only the last few rows are tried, so that a task of many thousand questions packs in linear time.
    """
    groups = sorted(groups, key=_packed_length, reverse=True)
    width = max([ROW_TOKENS] + [_packed_length(g) for g in groups[:1]])
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


class _PackedRows:
    """Stands in for every layer's KV cache in a packed pass: keeps nothing, gives the mask and positions.

    mlx-lm's attention asks its cache for the mask (make_mask) and passes cache.offset
    to RoPE; here the offset is a (batch, length) array of per-token positions.
    """

    def __init__(self, mask: mx.array, positions: mx.array):
        self.mask, self.offset = mask, positions

    def update_and_fetch(self, keys, values):
        return keys, values

    def make_mask(self, *args, **kwargs):
        return self.mask


class _PositionedRoPE(nn.Module):
    """A model's RoPE, also taking per-token positions: each token rotated as a batch row of its own."""

    def __init__(self, rope):
        super().__init__()
        self.inner = rope

    def __call__(self, x, offset=0):
        if isinstance(offset, mx.array) and offset.ndim == 2:
            B, H, L, D = x.shape
            rows = x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)
            return self.inner(rows, offset=offset.reshape(-1)).reshape(B, L, H, D).transpose(0, 2, 1, 3)
        return self.inner(x, offset=offset)


def trunk_and_head(model, token: int = 0):
    """(trunk, head) with model(x) == head(trunk(x)), checked on a probe; else (model, identity).

    The vocabulary projection (and the log-softmax after it) then runs only at the
    positions whose log-probs are read, not at every context token.
    """
    trunk, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if head is None and trunk is not None and hasattr(getattr(trunk, "embed_tokens", None), "as_linear"):
        head = trunk.embed_tokens.as_linear
    if trunk is not None and head is not None:
        probe = mx.array([[token, 0, 1, 2]])
        try:
            if mx.array_equal(model(probe), head(trunk(probe))).item():
                return trunk, head
        except Exception:  # a model built another way: score it whole
            pass
    return model, lambda h: h


def _request_key(ctx: list[int], cont: list[int]) -> str:
    return hashlib.sha256(json.dumps([list(ctx), list(cont)]).encode()).hexdigest()[:32]


def _context_length(config: dict) -> int:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if value:
            return int(value)
    return 2048


@functools.cache
def _task_manager(include_defaults: bool):
    # Indexing lm-eval's ~10k built-in task YAMLs takes seconds; skip it when the
    # local tasks suffice, and build each kind once per process.
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(LOCAL_TASKS), include_defaults=include_defaults)


def task_manager_for(tasks: list[str]):
    local = _task_manager(False)
    return local if all(t in local.all_tasks for t in tasks) else _task_manager(True)


def benchmark(model_dir: Path, params: dict, out: Path, checkpoint: Path | None = None) -> list[dict]:
    """Run lm-eval on the model in model_dir; write out/results.json and samples.jsonl; return metric rows."""
    import lm_eval

    p = {**DEFAULTS, **params}
    # The sweep's plan says which lm-eval task runs for each requested name (an offline copy or the
    # official task) and where its data came from; rows carry the requested name and that source.
    plan = p.get("plan") or [{"task": t, "run": t, "data": None} for t in p["tasks"]]
    tasks, seed, chat = [t["run"] for t in plan], int(p["seed"]), bool(p["chat_template"])
    manager, limit = task_manager_for(tasks), p["limit"]
    # Built once and handed to lm-eval built (building maps every document: hellaswag's 10,042).
    # A group stays a group; with a limit each of its tasks is sampled on its own.
    built, leaves, groups = [], {}, {}  # leaves: lm-eval task -> (Task, the name its sample is drawn for)
    for t in plan:
        loaded = manager.load(t["run"])
        group = loaded["groups"].get(t["run"])
        built += [group] if group is not None else list(loaded["tasks"].values())
        groups.update(loaded["groups"])
        for obj in loaded["tasks"].values():
            _pin_eval_docs(obj)
        # Drawn for the requested name: the offline copy and the hub task pick the same documents.
        leaves.update({name: (obj, t["task"] if name == t["run"] else name) for name, obj in loaded["tasks"].items()})
    drawn = {}  # lm-eval task -> its sample, recorded in results.json
    if limit is not None:
        for name, (obj, drawn_for) in leaves.items():
            n = len(obj.eval_docs)
            drawn[name] = {"task": drawn_for, "n_docs": n, "seed": seed,
                           "doc_ids": draw_docs(seed, drawn_for, n, min(int(limit), n))}
    notes = {name: sample_note([d]) for name, d in drawn.items()}
    if drawn:
        notes.update({name: sample_note([drawn[t.task_name] for t in g.get_all_tasks()]) for name, g in groups.items()})

    lm = MLXLM(Path(model_dir), batch_size=int(p["batch_size"]), backend=p["backend"], checkpoint=checkpoint)
    if chat and not lm.tokenizer.has_chat_template:
        raise ValueError(f"chat_template=True but the tokenizer in {model_dir} has no chat template")
    # lm-eval takes either a limit (the first documents) or the indices to evaluate; a task whose
    # whole split was drawn is left out of `samples` and runs whole.
    indices = None if limit is None else {
        name: d["doc_ids"] for name, d in drawn.items() if len(d["doc_ids"]) < d["n_docs"]}
    results = lm_eval.simple_evaluate(
        model=lm, tasks=built, task_manager=manager,
        samples=indices, num_fewshot=int(p["num_fewshot"]),
        apply_chat_template=chat, fewshot_as_multiturn=chat,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS)
    named = {t["run"]: t for t in plan}
    samples = sample_rows(results.pop("samples", {}), {run: t["task"] for run, t in named.items()})

    quantization = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization")
    results["config"].update({
        "model": "MLXLM", "code_version": CODE_VERSION, "params": p, "batch_size": lm.batch_size,
        "apply_chat_template": chat,
        "chat_template": lm.chat_template(True) if chat else None,
        "quantization": quantization,
        # With a limit: per lm-eval task, the split's size, the seed and the doc ids evaluated.
        **({"sample": drawn} if drawn else {}),
        "library_versions": {name: version(name) for name in ("mlx", "mlx-lm", "lm_eval", "transformers")},
    })
    for config in results.get("configs", {}).values():
        meta = config.get("metadata") or {}
        if "config_source" in meta:
            meta["config_source"] = _portable_path(meta["config_source"])
    results = {k: v for k, v in results.items() if k not in VOLATILE_KEYS}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=_json_default) + "\n")
    (out / "samples.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in samples))
    return [{**row, "task": named.get(row["task"], row)["task"],
             "data": _join(named.get(row["task"], {}).get("data"), notes.get(row["task"])),
             "backend": lm.weights} for row in metric_rows(results)]


def draw_docs(seed: int, name: str, n: int, k: int) -> list[int]:
    """k of a split's n document indices: a uniform random sample without replacement, sorted.

    Each index i is ranked by sha256(f"{seed}:{name}:{i}") and the k lowest are taken. Written out
    rather than left to a numpy generator, whose methods may change between versions: the same
    (seed, task name, n) gives the same documents anywhere, so every recipe answers the same questions.
    """
    return sorted(sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{name}:{i}".encode()).digest())[:k])


def _pin_eval_docs(task) -> None:
    """Run the evaluated split's process_docs once: lm-eval calls it on every read of eval_docs (five or
    more a run), and for hellaswag each call maps its 10,042 documents again (seconds)."""
    split = "test_docs" if task.has_test_docs() else "validation_docs"
    docs = getattr(task, split)()
    if hasattr(docs, "__len__"):  # a generator must be made anew each time
        setattr(task, split, lambda: docs)


def sample_note(parts: list[dict]) -> str | None:
    """How a row's documents were chosen (parts: the drawn samples under it); None when all were evaluated."""
    k, n = sum(len(d["doc_ids"]) for d in parts), sum(d["n_docs"] for d in parts)
    if k == n:
        return None
    tasks = f" in {len(parts)} tasks" if len(parts) > 1 else ""
    return f"{k} random documents of {n}{tasks} (seed {parts[0]['seed']})"


def _join(data: str | None, note: str | None) -> str | None:
    return f"{data}; {note}" if data and note else note or data


def sample_rows(samples: dict, names: dict) -> list[dict]:
    """One row per question: lm-eval's logged sample reduced to what comparisons need.

    names maps the lm-eval task that ran to the name the sweep asked for. Multiple-choice
    rows keep every choice's log-likelihood; `chosen` is the argmax, as acc scores it.
    """
    rows = []
    for run, task_samples in sorted(samples.items()):
        for sample in sorted(task_samples, key=lambda x: x["doc_id"]):
            logliks = [float(r[0]) for r in sample.get("filtered_resps", []) if isinstance(r, (list, tuple))]
            target = sample.get("target")
            rows.append({
                "task": names.get(run, run), "doc_id": int(sample["doc_id"]),
                "target": target if isinstance(target, int) else None,
                "chosen": int(np.argmax(logliks)) if logliks else None,
                "correct": bool(sample["acc"]) if "acc" in sample else None,
                "correct_norm": bool(sample["acc_norm"]) if "acc_norm" in sample else None,
                "logliks": logliks,
            })
    return rows


def metric_rows(results: dict) -> list[dict]:
    """One row per (task, metric) for each numeric metric; lm-eval keys them 'metric,filter'."""
    samples, subtasks = results.get("n-samples", {}), results.get("group_subtasks", {})

    def size(task: str) -> int:  # a group's size is that of its (nested) subtasks
        if task in samples:
            return samples[task]["effective"]
        return sum(size(t) for t in subtasks.get(task, []))

    rows = []
    for task, metrics in results["results"].items():
        n = size(task)
        for key, value in metrics.items():
            name, sep, flt = key.partition(",")
            if not sep or "_stderr" in name or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{name}_stderr,{flt}")
            rows.append({
                "task": task,
                "metric": name if flt == "none" else key,
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "n": int(n),
            })
    return sorted(rows, key=lambda r: (r["task"], r["metric"]))


def _portable_path(path: str) -> str:
    """A task YAML's path relative to its task root, so results.json does not depend on the checkout."""
    import lm_eval.tasks

    for prefix, root in (("qsweep", LOCAL_TASKS), ("lm_eval", Path(lm_eval.tasks.__file__).parent)):
        try:
            return f"{prefix}:{Path(path).resolve().relative_to(root.resolve()).as_posix()}"
        except ValueError:
            continue
    return path


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if callable(obj):  # a task's process_docs and the like: its name, not its address
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    raise TypeError(f"{type(obj).__name__} in lm-eval results is not JSON-serialisable")


@task(name="benchmark", cache_policy=artifact_cache("benchmark", CODE_VERSION, loads_model=True), persist_result=True)
def benchmark_task(store: str, params: dict, inputs: list[ArtifactRef]) -> ArtifactRef:
    s = Store(store)
    model_dir = s.path(inputs[0])
    # Outside the artifact's temporary folder, which a crashed run leaves to be cleaned away.
    checkpoint = s.root / "partial" / "benchmark" / f"{artifact_key('benchmark', CODE_VERSION, params, inputs)}.jsonl"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    ref = s.produce("benchmark", CODE_VERSION, params, inputs,
                    lambda out: {"metrics": benchmark(model_dir, params, out, checkpoint)})
    checkpoint.unlink(missing_ok=True)
    return ref
