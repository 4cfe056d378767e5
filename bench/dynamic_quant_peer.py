"""mlx-lm's own mixed-precision search (mlx_lm.quant.dynamic_quant) as a peer for qsweep's bit search.

dynamic_quant scores every quantizable module with a gradient-based sensitivity (the
loss's first-order change when the module goes from the low quantization to the high
one, per million weights) and gives the high bits to the modules whose sensitivity is
above a threshold, the threshold set so the model reaches a target bits per weight.

Here only the peer's *assignment* is kept (module path -> format), so that it can be
quantized and measured through qsweep's own path, as any recipe is. Two things differ
from `python -m mlx_lm.dynamic_quant`, both so the comparison is fair:
- the calibration windows come from a local text (load_data downloads one), cut and
  shuffled the way load_data does;
- the threshold is chosen by qsweep's bits-per-weight measure (tasks.plan: the
  quantizable modules only, scales and biases counted in the plan's float type), not by
  mlx_lm.utils.compute_bits_per_weight (the whole model, norms included). Ranking the
  modules by sensitivity and taking the top k is the threshold rule, with the threshold
  between the k-th and the (k+1)-th sensitivity; k is the largest within the budget.

    .venv/bin/python bench/dynamic_quant_peer.py --model /tmp/smol --bpw 4.5 --bpw 5.5 --bpw 6.5 --out /tmp/peer-out
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from flows.blas import reexec_with_blas  # noqa: E402
from tasks.plan import Plan, cast, make_plan, model_modules  # noqa: E402
from tasks.recipes import Recipe, Rule  # noqa: E402

DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "tasks" / "data" / "calibration.txt"
SEED = 123  # dynamic_quant's --seed default: it seeds the shuffle of the windows


def fmt(bits: int, group_size: int = 64) -> dict:
    return {"bits": bits, "group_size": group_size, "mode": "affine"}


def name(f: dict) -> str:
    return f"q{f['bits']}g{f['group_size']}"


def parse_format(text: str) -> dict:
    """q4g64 -> {"bits": 4, "group_size": 64, "mode": "affine"}."""
    m = re.fullmatch(r"q(\d+)g(\d+)", text)
    if not m:
        raise ValueError(f"{text!r}: expected q<bits>g<group size>, e.g. q4g64")
    return fmt(int(m[1]), int(m[2]))


# Budget -> (low, high). dynamic_quant's defaults are low 4-bit / high 5-bit, group size 64.
# With 16-bit scales and biases each low format alone costs exactly its budget (q4g64: 4 + 32/64 = 4.5),
# so these pairs give the peer no room for high bits: --low/--high pick pairs that leave some.
PAIRS = {4.5: (fmt(4), fmt(5)), 5.5: (fmt(5), fmt(6)), 6.5: (fmt(6), fmt(8))}


def calibration_batches(tokenizer, text: str, sequence_length: int = 512, max_sequences: int | None = None,
                        seed: int = SEED) -> mx.array:
    """(windows, sequence_length) token ids as mlx_lm.quant.utils.load_data returns them: the whole text
    tokenized at once, cut into non-overlapping windows (the tail dropped), shuffled; here with a fixed
    key instead of the global random state, so the same text always gives the same windows."""
    tokens = tokenizer.encode(text, return_tensors="mlx")[0]
    n = tokens.size // sequence_length
    if n == 0:
        raise ValueError(f"the text has {tokens.size} tokens, fewer than one window of {sequence_length}")
    tokens = tokens[: n * sequence_length].reshape(n, sequence_length)
    order = mx.random.permutation(n, key=mx.random.key(seed))
    if max_sequences is not None and max_sequences > 0:
        order = order[:max_sequences]
    return tokens[order]


def peer_sensitivities(model_dir: Path, text: str, low: dict, high: dict, batch_size: int = 4, *,
                       sequence_length: int = 512, max_sequences: int | None = None,
                       dtype: str | None = None) -> dict[str, float]:
    """Module path -> dynamic_quant's sensitivity for going from `low` to `high`. Positive: the high
    format lowers the KL to the float model (to first order). The model runs as mlx_lm.load gives it
    (the stored dtype), or cast to `dtype` as qsweep casts before it quantizes."""
    from mlx_lm import load
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities

    for f in (low, high):
        if f.get("mode", "affine") != "affine":
            raise ValueError(f"dynamic_quant quantizes affine only, not {f['mode']}")
    model, tokenizer = load(str(model_dir))
    cast(model, dtype)
    data = calibration_batches(tokenizer, text, sequence_length, max_sequences)
    # As dynamic_quant's main() calls it: float32 gradient accumulation, no gradient checkpointing.
    scored = estimate_sensitivities(model, data, low["bits"], low["group_size"], high["bits"], high["group_size"],
                                   batch_size=batch_size, gradient_accum_dtype=mx.float32, gradient_checkpoint=False)
    return dict(scored)


def _recipe(low: dict, high: dict, high_paths: list[str], label: str) -> Recipe:
    """The low format by default, one exact-path rule per module that gets the high format."""
    rules = tuple(Rule(match=f"^{re.escape(p)}$", bits=high["bits"], group_size=high["group_size"], mode="affine")
                  for p in high_paths)
    return Recipe(name=label, bits=low["bits"], group_size=low["group_size"], mode="affine", rules=rules)


def _plan(model_dir: Path, recipe: Recipe) -> Plan:
    modules, n_layers, predicate, facts = model_modules(model_dir)
    return make_plan(recipe, modules, n_layers, predicate, facts["dtype"], facts["tied"])


def peer_assignment(model_dir: Path, sensitivities: dict, target_bpw: float, low: dict, high: dict) -> dict[str, dict | None]:
    """Every quantizable module's format (None: it stays float, make_plan's fallback) under dynamic_quant's
    threshold rule, with the threshold giving qsweep's largest bits per weight not above target_bpw."""
    modules, n_layers, predicate, facts = model_modules(model_dir)

    def plan(k: int, ranked: list[str]) -> Plan:
        # One alternation rule while searching: 200-odd exact rules per plan would be slow and say the same.
        top = ranked[:k]
        rules = (Rule(match="^(?:" + "|".join(map(re.escape, top)) + ")$", bits=high["bits"],
                      group_size=high["group_size"], mode="affine"),) if top else ()
        recipe = Recipe(name="peer", bits=low["bits"], group_size=low["group_size"], mode="affine", rules=rules)
        return make_plan(recipe, modules, n_layers, predicate, facts["dtype"], facts["tied"])

    paths = [m[0] for m in modules]
    # Modules mlx-lm gave no sensitivity rank last: they get the high bits only if everything else has them.
    ranked = sorted(paths, key=lambda p: (-sensitivities.get(p, float("-inf")), p))
    best = plan(0, ranked)
    if best.bits_per_weight() > target_bpw + 1e-9:
        raise ValueError(f"target {target_bpw} bits per weight is below the low format's "
                         f"{best.bits_per_weight():.4f} ({name(low)} everywhere)")
    for k in range(1, len(ranked) + 1):
        candidate = plan(k, ranked)
        if candidate.bits_per_weight() <= target_bpw + 1e-9:  # largest k within the budget
            best = candidate
    return {p.path: p.quant for p in best.layers}


def summary(model_dir: Path, assignment: dict, sensitivities: dict, low: dict, high: dict) -> dict:
    """What a reader of the peer's choice needs: qsweep's bits per weight for it, the high modules,
    the threshold that separates them, the fallbacks, and the assignment as a qsweep recipe."""
    high_paths = [p for p, q in assignment.items() if q is not None and q["bits"] == high["bits"]
                  and q["group_size"] == high["group_size"]]
    label = f"peer-{name(low)}-{name(high)}-{len(high_paths)}"
    recipe = _recipe(low, high, high_paths, label)
    plan = _plan(model_dir, recipe)
    assert {p.path: p.quant for p in plan.layers} == assignment, "the recipe does not reproduce the assignment"
    chosen = [sensitivities[p] for p in high_paths if p in sensitivities]
    rest = [sensitivities[p] for p, q in assignment.items() if p not in high_paths and q is not None and p in sensitivities]
    threshold = (min(chosen) + max(rest)) / 2 if chosen and rest else (max(rest) if rest else None)
    return {
        "bpw": plan.bits_per_weight(),
        "n_high": len(high_paths),
        "n_modules": len(assignment),
        "threshold": threshold,  # high: sensitivity above it; None: every module is high
        "fallbacks": {p.path: p.note for p in plan.fallbacks()},
        "no_sensitivity": sorted(set(assignment) - set(sensitivities)),
        "not_in_plan": sorted(set(sensitivities) - set(assignment)),
        "recipe": {"name": label, "bits": low["bits"], "group_size": low["group_size"], "mode": "affine",
                   "description": f"mlx-lm dynamic_quant's choice: {len(high_paths)} modules {name(high)}, "
                                  f"the rest {name(low)}",
                   "rules": [{"match": r.match, "bits": r.bits, "group_size": r.group_size} for r in recipe.rules]},
    }


def main():
    reexec_with_blas(__file__)  # mlx's bundled BLAS is ~20x slower on the CPU (flows/blas.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a float model directory (HF layout)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="calibration text")
    parser.add_argument("--bpw", type=float, action="append", required=True,
                        help=f"target bits per weight (repeatable); with the pairs of PAIRS: {', '.join(map(str, PAIRS))}")
    parser.add_argument("--low", type=parse_format, help="low format for every budget, e.g. q4g128 (with --high)")
    parser.add_argument("--high", type=parse_format, help="high format for every budget, e.g. q5g128 (with --low)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--max-sequences", type=int, default=None, help="at most this many windows (default: all)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="cast the model before estimating (default: as mlx_lm.load gives it)")
    parser.add_argument("--reuse", action="store_true",
                        help="read the sensitivities an earlier run wrote to --out instead of estimating them again")
    args = parser.parse_args()
    if (args.low is None) != (args.high is None):
        parser.error("give --low and --high together")
    pairs = {b: (args.low, args.high) for b in args.bpw} if args.low else PAIRS
    unknown = [b for b in args.bpw if b not in pairs]
    if unknown:
        parser.error(f"--bpw {unknown[0]}: no (low, high) pair for it; known: {', '.join(map(str, PAIRS))}")
    args.out.mkdir(parents=True, exist_ok=True)
    text = args.text.read_text()

    cache: dict[tuple[str, str], tuple[dict, float]] = {}
    for bpw in args.bpw:
        low, high = pairs[bpw]
        key = (name(low), name(high))
        saved = args.out / f"peer-sensitivities-{key[0]}-{key[1]}.json"
        if key not in cache and args.reuse and saved.exists():
            cache[key] = json.loads(saved.read_text()), None  # seconds: not known, spent by an earlier run
        if key not in cache:
            start = time.perf_counter()
            sens = peer_sensitivities(args.model, text, low, high, args.batch_size, sequence_length=args.sequence_length,
                                      max_sequences=args.max_sequences, dtype=args.dtype)
            cache[key] = sens, time.perf_counter() - start
            saved.write_text(json.dumps(sens, indent=1))
        sens, sens_seconds = cache[key]
        start = time.perf_counter()
        assignment = peer_assignment(args.model, sens, bpw, low, high)
        assign_seconds = time.perf_counter() - start
        facts = summary(args.model, assignment, sens, low, high)
        record = {"model": str(args.model), "target_bpw": bpw, "low": low, "high": high,
                  "dtype": args.dtype or "as loaded", "text": str(args.text), "sequence_length": args.sequence_length,
                  "max_sequences": args.max_sequences, "batch_size": args.batch_size,
                  **facts, "seconds": {"sensitivities": sens_seconds, "assignment": assign_seconds},
                  "assignment": assignment}
        (args.out / f"peer-{bpw}.json").write_text(json.dumps(record, indent=1))
        print(f"target {bpw}: {name(low)}/{name(high)} -> bpw {facts['bpw']:.4f}, {facts['n_high']} of "
              f"{facts['n_modules']} modules high, {len(facts['fallbacks'])} float; sensitivities "
              f"{'reused' if sens_seconds is None else f'{sens_seconds:.1f} s'}, assignment {assign_seconds:.2f} s", flush=True)


if __name__ == "__main__":
    main()
