"""Quality gates: what a variant must show before qsweep lets it out.

A gate reads what the cell measured: the smoke answer's verdict (tasks/smoke.py), and the mean KL
divergence and perplexity ratio against the base (tasks/fidelity.py). A cell that fails one is
measured, recorded and carded like any other; its card opens with a banner that says which gate
failed and by how much, and the publish step neither exports it for upload nor uploads it, unless
the sweep file's `gates.allow` or `qsweep publish --force-gated` says so. A gate whose measurement
is missing (fidelity turned off) fails: the sweep file must turn the gate off to publish without it.
The defaults are chosen from measurements (README, "Quality gates") and written once, in tasks/specs.py.
"""

from tasks.smoke import PASSING
from tasks.specs import GatesSpec

DEFAULTS = GatesSpec().limits()  # what a sweep file that says nothing of gates gets


def check(limits: dict, verdict: str | None, fidelity: dict) -> list[dict]:
    """One row per gate that is on: gate, what it looks at, requirement, measured (text), value, passed.

    `fidelity` is the cell's fidelity metrics by name ({} when the stage did not run)."""
    limits = {**DEFAULTS, **limits}
    out = []
    if limits["smoke"] == "ok":  # a loop the base's own answer has too is the model's, not the quantization's
        out.append({"gate": "smoke", "what": "smoke answer", "requirement": "ok", "value": None,
                    "measured": verdict or "not measured", "passed": verdict in PASSING})
    for gate, metric, what in (("max_kl_mean", "kl_mean", "mean KL divergence from the base (nats/token)"),
                               ("max_ppl_ratio", "ppl_ratio", "perplexity / the base's")):
        limit, value = limits[gate], fidelity.get(metric)
        if limit is not None:
            out.append({"gate": gate, "what": what, "requirement": f"at most {limit:g}", "value": value,
                        "measured": "not measured (fidelity is off)" if value is None else f"{value:.4g}",
                        "passed": value is not None and value <= limit})
    return out


def failed(results: list[dict]) -> list[dict]:
    return [g for g in results if not g["passed"]]


def describe(results: list[dict]) -> str:
    """The failed gates in one line: 'smoke: not_language (required: ok); max_kl_mean: 14.8 (required: at most 1)'."""
    return "; ".join(f"{g['gate']}: {g['measured']} (required: {g['requirement']})" for g in failed(results))
