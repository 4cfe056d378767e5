"""Which differences between recipes are real: each recipe against a base recipe, per task.

Reads the per-question rows of each cell's latest benchmark (DuckDB's latest_samples) and computes
the paired statistics (tasks/compare.py). `qsweep compare` only prints them; a sweep and
`qsweep publish` also record them in the `comparisons` table, for SQL.
"""

from storage.workspace import history
from tasks.compare import Comparison, compare


def compare_recipes(store: str, base: str, alpha: float = 0.05) -> dict[str, list[Comparison]]:
    """model -> comparisons of its recipes against `base`; reads the store, writes nothing.

    A recipe is compared on a task only where it was measured as the base was (same data and sample,
    backend and number of questions): two random samples of a task share few questions, if any."""
    db = history(store)
    _, rows = db.query("SELECT model, recipe, task, data, backend, n FROM latest_metrics "
                       "WHERE stage = 'benchmark' AND metric = 'acc'")
    how = {(m, r, t): (data, backend, n) for m, r, t, data, backend, n in rows}
    by_model: dict[str, list[dict]] = {}
    for s in db.latest_samples():
        measured = how.get((s["model"], s["recipe"], s["task"]))
        if measured is not None and measured == how.get((s["model"], base, s["task"])):
            by_model.setdefault(s["model"], []).append(s)
    return {model: compare(samples, base, alpha=alpha) for model, samples in by_model.items()
            if any(s["recipe"] == base for s in samples)}


def record_comparisons(store: str, base: str) -> None:
    """The comparisons at the cards' level (0.05) in the `comparisons` table, replacing the last ones."""
    db = history(store)
    for model, rows in compare_recipes(store, base).items():
        db.record_comparisons(model, base, rows)
