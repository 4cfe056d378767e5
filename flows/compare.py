"""Which differences between recipes are real: each recipe against a base recipe, per task.

Reads the per-question rows of each cell's latest benchmark (DuckDB's latest_samples) and computes
the paired statistics (tasks/compare.py). `qsweep compare` only prints them; a sweep and
`qsweep publish` also record them in the `comparisons` table, for SQL.
"""

from storage.artifacts import Store
from storage.metrics import MetricStore
from tasks.compare import Comparison, compare


def compare_recipes(store: str, base: str, alpha: float = 0.05) -> dict[str, list[Comparison]]:
    """model -> comparisons of its recipes against `base`; reads the store, writes nothing."""
    by_model: dict[str, list[dict]] = {}
    for row in MetricStore(Store(store).metrics_db).latest_samples():
        by_model.setdefault(row["model"], []).append(row)
    out = {}
    for model, samples in by_model.items():
        tasks_with_base = {s["task"] for s in samples if s["recipe"] == base}
        if tasks_with_base:
            out[model] = compare([s for s in samples if s["task"] in tasks_with_base], base, alpha=alpha)
    return out


def record_comparisons(store: str, base: str) -> None:
    """The comparisons at the cards' level (0.05) in the `comparisons` table, replacing the last ones."""
    db = MetricStore(Store(store).metrics_db)
    for model, rows in compare_recipes(store, base).items():
        db.record_comparisons(model, base, rows)
