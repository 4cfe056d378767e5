"""Searched recipes against the built-ins and mlx_lm.dynamic_quant, on the demo model (issue 16).

    .venv/bin/python bench/search.py [--store DIR (kept; default /tmp/qsweep-search-bench)] [--bpw 4.5 --bpw 5.5 ...]

In one run, on SmolLM2-135M-Instruct (demo://smollm2-135m-instruct), every recipe measured the same way
(qsweep's fidelity stage: mean KL from the base over the full top-4096 + rest, on Hamlet, 3 windows of 512
tokens as the demo sweep, fp32 on the CPU):
  auto-B   `search:` budgets B: sensitivity measured on tasks/data/calibration.txt, solved exactly (qsweep);
  dq-B     mlx_lm.dynamic_quant: its estimate_sensitivities on the same calibration text, its threshold rule
           between the two affine levels that bracket B (bench/dynamic_quant_peer.py), the threshold set so
           that qsweep's bits-per-weight measure is the largest not above B; quantized by qsweep's path;
  built-ins every built-in rounded recipe whose plan is at most max(B) + 0.05 bits per weight.
Sizes are qsweep's plan measure (bits per weight over the quantizable modules, scales included). Prints,
per budget, the searched recipe's KL against the best built-in within B + 0.05 and against dq-B, the
sensitivity stage's cost in fidelity stages, and writes bench/search_pareto.png.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
MODEL = "SmolLM2-135M-Instruct"


def sweep_file(store: Path, recipes: list, budgets: list[float]) -> Path:
    data = {"name": "search-bench", "models": [{"name": MODEL, "source": "demo://smollm2-135m-instruct"}],
            "recipes": recipes, "search": {"budgets_bpw": budgets},
            "smoke": {"max_tokens": 8}, "benchmark": {"tasks": ["qsweep_demo_mc"], "limit": 10},
            "fidelity": {"windows": 3}, "gates": {"max_kl_mean": None, "max_ppl_ratio": None, "smoke": "any"}}
    path = store / "search-bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(path: Path, store: Path) -> float:
    started = time.time()
    done = subprocess.run([str(BIN / "qsweep"), "run", str(path), "--store", str(store)], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode not in (0, 1):
        sys.exit(f"qsweep run failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    print(f"  qsweep run: {time.time() - started:.0f} s, exit {done.returncode}", flush=True)
    return time.time() - started


def peer_recipes(base: Path, store: Path, budgets: list[float]) -> list[Path]:
    """dq-B and dqw-B recipe files from mlx_lm.dynamic_quant's sensitivities (computed once per level pair, kept
    in the store). dq: its default pairing, adjacent bits at group 64 (q4/q5 for 4.5), which at these budgets is
    the low level alone (q4g64 is 4.5 bpw: no module can go high); dqw: one level either side (q3/q5 for 4.5),
    the narrowest pair that leaves it a choice."""
    sys.path.insert(0, str(ROOT / "bench"))
    from dynamic_quant_peer import PAIRS, fmt, name, peer_assignment, peer_sensitivities

    wide = {4.5: (fmt(3), fmt(5)), 5.5: (fmt(4), fmt(6)), 6.5: (fmt(5), fmt(8))}

    from tasks.plan import model_modules
    from tasks.search import compact, recipe_yaml

    text = (ROOT / "tasks" / "data" / "calibration.txt").read_text()
    modules, n_layers, _, facts = model_modules(base)
    units = [(p, o, i) for p, o, i, _ in modules]
    out = []
    for b, prefix in [(b, p) for b in budgets for p in ("dq", "dqw")]:
        low, high = (PAIRS if prefix == "dq" else wide)[b]
        cache = store / "peer" / f"peer-sensitivities-{name(low)}-{name(high)}.json"
        if cache.is_file():
            sens = dict(json.loads(cache.read_text()))
        else:
            started = time.time()
            sens = peer_sensitivities(base, text, low, high, dtype="float32")  # fp32: BLAS-fast on a CPU
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(sens))
            print(f"  dynamic_quant sensitivities {name(low)}/{name(high)}: {time.time() - started:.0f} s", flush=True)
        assignment = peer_assignment(base, sens, b, low, high)
        recipe = compact(assignment, units, n_layers, f"{prefix}-{b:g}", dtype=facts["dtype"],
                         description=f"mlx_lm.dynamic_quant's choice between {name(low)} and {name(high)} for {b:g} bpw")
        path = store / "peer" / f"{prefix}-{b:g}.yaml"
        path.write_text(recipe_yaml(recipe, [f"{prefix}-{b:g}: mlx_lm.dynamic_quant's assignment (bench/search.py)"]))
        out.append(path)
    return out


def measured(store: Path) -> dict:
    """recipe -> (kl_mean, stderr, seconds of its fidelity stage) as the store's latest metrics say."""
    from storage.metrics import MetricStore

    db = MetricStore(store / "metrics.duckdb")
    _, rows = db.query("SELECT recipe, value, stderr FROM latest_metrics WHERE model = ? AND stage = 'fidelity' "
                       "AND metric = 'kl_mean'", [MODEL])
    return {r: (v, e) for r, v, e in rows}


def stage_seconds(store: Path, stage: str) -> list[float]:
    from storage.metrics import MetricStore

    _, rows = MetricStore(store / "metrics.duckdb").query(
        "SELECT seconds FROM stages WHERE model = ? AND stage = ? AND status = 'done' AND NOT cached", [MODEL, stage])
    return [r[0] for r in rows]


def searched_recipe(store: Path, recipe: str):
    from storage.metrics import MetricStore
    from tasks.recipes import load_recipe

    _, rows = MetricStore(store / "metrics.duckdb").query(
        "SELECT key FROM stages WHERE model = ? AND recipe = ? AND stage = 'quantize' AND status = 'done' "
        "ORDER BY finished DESC LIMIT 1", [MODEL, recipe])
    return load_recipe(store / "artifacts" / "quantize" / rows[0][0] / "recipe.yaml")


def main():
    from flows.blas import reexec_with_blas

    reexec_with_blas(__file__)  # the peer's gradients run in this process: under OpenBLAS, as qsweep's stages do
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=Path("/tmp/qsweep-search-bench"))
    p.add_argument("--bpw", type=float, action="append")
    args = p.parse_args()
    budgets, store = args.bpw or [4.5, 5.5, 6.5], args.store.resolve()
    store.mkdir(parents=True, exist_ok=True)
    print(f"store {store}; budgets {budgets}", flush=True)

    print("1. the searched recipes (sensitivity once, then one solve and one quantize per budget)", flush=True)
    run(sweep_file(store, ["bf16"], budgets), store)
    base = next((store / "artifacts" / "download").iterdir())

    from tasks.plan import plan_for
    from tasks.recipes import builtin_recipes, load_recipe

    builtins = {n: r for n, r in builtin_recipes().items() if not r.method and n != "bf16"
                and plan_for(r, base).bits_per_weight() <= max(budgets) + 0.05}
    print(f"2. the peer ({len(budgets)} budgets) and {len(builtins)} built-ins at most {max(budgets) + 0.05:g} bpw", flush=True)
    peers = peer_recipes(base, store, budgets)
    run(sweep_file(store, ["bf16", *builtins, *[str(p) for p in peers]], budgets), store)

    kl = measured(store)
    size = {n: plan_for(r, base).bits_per_weight() for n, r in builtins.items()}
    size.update({p.stem: plan_for(load_recipe(p), base).bits_per_weight() for p in peers})
    size.update({f"auto-{b:g}": plan_for(searched_recipe(store, f"auto-{b:g}"), base).bits_per_weight() for b in budgets})

    rows, lines = [], []
    for b in budgets:
        auto = f"auto-{b:g}"
        dq = min((f"dq-{b:g}", f"dqw-{b:g}"), key=lambda n: kl[n][0])  # the peer's better pairing
        fits = [n for n in builtins if size[n] <= b + 0.05 and n in kl]
        best = min(fits, key=lambda n: kl[n][0]) if fits else None
        rows.append((b, auto, dq, best))
        vs_best = kl[auto][0] / kl[best][0] if best else float("nan")
        vs_dq = kl[auto][0] / kl[dq][0]
        lines.append(f"{b:>6g}  {auto:>9} {size[auto]:6.3f} {kl[auto][0]:8.4f}±{kl[auto][1]:.4f}   "
                     f"{best or '-':>10} {size.get(best, float('nan')):6.3f} {kl[best][0] if best else float('nan'):8.4f}   "
                     f"{dq:>7} {size[dq]:6.3f} {kl[dq][0]:8.4f}   {vs_best:6.2f}x {'ok' if vs_best <= 0.8 else 'MISSED':>6}   "
                     f"{vs_dq:6.2f}x {'ok' if vs_dq <= 1 else 'MISSED':>6}")
    print("\n".join(f"  {n}: {size[n]:.3f} bpw, KL {kl[n][0]:.4f}" for n in sorted(size) if n.startswith("dq")))
    print("\nbudget  searched    bpw  KL mean            best built-in   bpw  KL mean      peer    bpw  KL mean   "
          "vs best (<=0.8x)   vs the peer's better (<=1x)")
    print("\n".join(lines))
    sens, fid = stage_seconds(store, "sensitivity"), stage_seconds(store, "fidelity")
    if sens and fid:
        per = sorted(fid)[len(fid) // 2]
        print(f"\nsensitivity stage {sens[-1]:.0f} s = {sens[-1] / per:.1f}x a fidelity stage (median {per:.1f} s, "
              f"{len(fid)} computed); target <= 30x")
    from storage.metrics import MetricStore

    _, key = MetricStore(store / "metrics.duckdb").query(
        "SELECT key FROM stages WHERE stage = 'sensitivity' AND status = 'done' ORDER BY finished DESC LIMIT 1")
    table = json.loads((store / "artifacts" / "sensitivity" / key[0][0] / "sensitivity.json").read_text())
    print(f"estimate vs measurement: {table['summary']['check']}")
    print(grain(table))
    plot(size, kl, builtins, budgets, ROOT / "bench" / "search_pareto.png")


def grain(table: dict) -> str:
    """Why per module, not per layer: how far the measured (probe) KL of a layer's projections spread."""
    import numpy as np

    probe = {}
    for r in table["rows"]:
        if r["measured_kl"] is not None and r["format"] == "q3g64" and r["layer"] is not None:
            probe.setdefault(r["layer"], []).append(max(r["measured_kl"], 1e-9))
    spread = [max(v) / min(v) for v in probe.values() if len(v) > 1]
    kinds = {}
    for r in table["rows"]:
        if r["measured_kl"] is not None and r["format"] == "q3g64" and r["layer"] is not None:
            kinds.setdefault(r["path"].rsplit(".", 1)[-1], []).append(r["measured_kl"])
    by_kind = ", ".join(f"{k} {np.median(v):.2g}" for k, v in sorted(kinds.items(), key=lambda kv: -np.median(kv[1])))
    return (f"grain: within one layer, its projections' measured KL at 3 bits spans {np.median(spread):.0f}x "
            f"(median over {len(spread)} layers; max {max(spread):.0f}x); median by projection: {by_kind}")


def plot(size: dict, kl: dict, builtins: dict, budgets: list[float], out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [n for n in builtins if n in kl]
    ax.errorbar([size[n] for n in names], [kl[n][0] for n in names], yerr=[kl[n][1] for n in names], fmt="o",
                color="grey", label="built-in recipes", ms=4, capsize=2)
    for n in names:
        ax.annotate(n, (size[n], kl[n][0]), fontsize=6, xytext=(3, 2), textcoords="offset points", color="grey")
    for prefix, label, style in (("auto", "searched (qsweep search)", "-o"), ("dq", "dynamic_quant, adjacent levels", "--s"),
                                 ("dqw", "dynamic_quant, one level either side", ":^")):
        xs = [size[f"{prefix}-{b:g}"] for b in budgets]
        ys = [kl[f"{prefix}-{b:g}"][0] for b in budgets]
        ax.errorbar(xs, ys, yerr=[kl[f"{prefix}-{b:g}"][1] for b in budgets], fmt=style, label=label, capsize=2)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantizable modules, scales included)")
    ax.set_ylabel("mean KL from the base (nats/token), Hamlet")
    ax.set_title(f"{MODEL}: searched recipes beside the built-ins")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
