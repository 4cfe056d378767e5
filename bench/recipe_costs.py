"""What each built-in recipe costs one base model: KL divergence and perplexity ratio against the base, per recipe.

The fidelity stage's own code (tasks/fidelity.py: llama-perplexity's windows, top-4096 KL) on N windows of 512
tokens of Hamlet, after the quantize stage's own code, for each recipe named; one line per recipe. What the
README's quality-gate defaults and the demo's recipes were chosen from ("Quality gates", "Two models, checked").

    .venv/bin/python bench/recipe_costs.py demo://smollm2-135m-instruct q8 qx86-hi q4 [--windows 6] [--work DIR]
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.blas import reexec_with_blas  # noqa: E402

if __name__ == "__main__":
    reexec_with_blas(__file__)

from tasks.download import download, resolve_source  # noqa: E402
from tasks.fidelity import fidelity, reference  # noqa: E402
from tasks.quantize import quantize  # noqa: E402
from tasks.recipes import BUILTINS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="a model source as a sweep file names it (demo://gemma3-270m, hf://..., a folder)")
    p.add_argument("recipes", nargs="+", choices=sorted(BUILTINS), metavar="recipe")
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--work", type=Path, help="keep the base, reference and quantized models here (default: a temp dir)")
    args = p.parse_args()
    params = {"corpus": "qsweep:data/hamlet.txt", "window": 512, "windows": args.windows, "top_k": 4096, "backend": "fp32"}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.work or Path(tmp)
        base, ref = root / "base", root / "ref"
        for d in (base, ref):
            d.mkdir(parents=True, exist_ok=True)
        if not (base / "config.json").exists():
            download(resolve_source(args.source), base)
        base_ppl = reference(base, params, ref)["metrics"][0]
        print(f"{args.source}: base perplexity {base_ppl['value']:.3f} over {base_ppl['n']} tokens ({args.windows} "
              f"windows of 512 of hamlet.txt, fp32)")
        print(f"{'recipe':<10} {'bits/weight':>11} {'KL mean':>8} {'KL p99':>7} {'ppl ratio':>9} {'same top':>8}")
        for name in args.recipes:
            q, f = root / "q" / name, root / "f" / name
            q.mkdir(parents=True, exist_ok=True)
            f.mkdir(parents=True, exist_ok=True)
            bpw = next(r["value"] for r in quantize(base, BUILTINS[name], q)["metrics"] if r["metric"] == "bits_per_weight")
            rows = {r["metric"]: r["value"] for r in fidelity(q, ref, params, f)["metrics"]}
            print(f"{name:<10} {bpw:>11.3f} {rows['kl_mean']:>8.4f} {rows['kl_p99']:>7.3f} {rows['ppl_ratio']:>9.4f} "
                  f"{rows['same_top']:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
