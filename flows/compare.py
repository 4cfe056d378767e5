"""Which differences between recipes are real: each recipe against a base recipe, per task.

Reads the per-question rows of each cell's latest benchmark (DuckDB's latest_samples),
computes the paired statistics (tasks/compare.py) and writes them to the
`comparisons` table, so they can be asked for in SQL as well as printed.
"""

from storage.artifacts import Store
from storage.metrics import MetricStore
from tasks.compare import Comparison, compare


def compare_recipes(store: str, base: str, alpha: float = 0.05) -> dict[str, list[Comparison]]:
    """model -> comparisons of its recipes against `base`, also recorded in DuckDB."""
    db = MetricStore(Store(store).metrics_db)
    columns, rows = db.query("SELECT model, recipe, task, doc_id, correct FROM latest_samples "
                             "WHERE correct IS NOT NULL ORDER BY model, recipe, task, doc_id")
    by_model: dict[str, list[dict]] = {}
    for row in rows:
        by_model.setdefault(row[0], []).append(dict(zip(columns, row)))
    out = {}
    for model, samples in by_model.items():
        if not any(s["recipe"] == base for s in samples):
            continue
        tasks_with_base = {s["task"] for s in samples if s["recipe"] == base}
        out[model] = compare([s for s in samples if s["task"] in tasks_with_base], base, alpha=alpha)
        db.record_comparisons(model, base, out[model])
    return out
