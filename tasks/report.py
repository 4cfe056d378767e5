"""`qsweep report`: what a store knows, on one page: per model, the accuracy table, the Pareto plots, the history.

- html: one self-contained `report.html`, its PNGs inline as data URIs (mail it, open it offline).
- md: `report.md` and its PNGs next to it, for a repository or a model card.

Values are each cell's as last computed (the `latest_metrics` view). The history has one
point per artifact a cell's stage computed, at the start of the run that computed it: a cached
rerun adds no point, so the history shows what changed, not how often it was looked at.

The page names no local path: cards are linked relative to the report (when it is written under
the store, its default) or on the hub, and paths in error messages are cut to their last part.
"""

import base64
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from statistics import NormalDist, median

from tasks.gates import describe
from tasks.tables import human_bytes, markdown_table

FORMATS = ("html", "md")
DPI = 100
FONT = 8  # point size of the recipe labels
Z95 = NormalDist().inv_cdf(0.975)  # the accuracy bars are 95% intervals
PARETO_HOWTO = ("How to read the Pareto plots: each point is a recipe; fewer bits per weight is better, and so "
                "is lower KL divergence from the base / higher mean accuracy. A recipe on the frontier (red) is "
                "beaten by no other recipe on both axes at once; the step line is the best value to be had within "
                "a given number of bits per weight. On the accuracy plot each point carries its 95% interval: a "
                "recipe off the frontier whose interval reaches the step line (hollow) is within noise of it, "
                "not shown to be worse; only one whose interval stays below it (grey) is called dominated.")
# (label, stage, metric, format) of the table's columns after the accuracies, shown where some recipe has them
EXTRA = [("KL mean", "fidelity", "kl_mean", ".3g"), ("ppl ratio", "fidelity", "ppl_ratio", ".5g"),
         ("same top", "fidelity", "same_top", ".3f"), ("gen tok/s", "smoke", "generation_tokens_per_s", ".1f"),
         ("peak GB", "smoke", "peak_memory_gb", ".3g")]
HISTORY = [("fidelity", "kl_mean", "KL mean"), ("fidelity", "ppl", "perplexity"),
           ("smoke", "generation_tokens_per_s", "generation tokens/s")]  # after mean acc and each task's acc
NUMBER = re.compile(r"[-+]?[\d.]+(e[-+]?\d+)?( ±[\d.]+)?( [kMG]?B)?")  # a table cell that must not wrap


@dataclass
class Row:
    """One recipe of one model, as last computed."""
    recipe: str
    acc: dict[str, float] = field(default_factory=dict)  # task -> acc
    values: dict[tuple[str, str], float] = field(default_factory=dict)  # (stage, metric) -> value
    stderr: dict[str, float] = field(default_factory=dict)  # task -> acc's standard error
    how: dict[str, tuple] = field(default_factory=dict)  # task -> (questions, data, backend)
    gated: str | None = None  # the quality gates its latest card failed (tasks/gates.py), if any

    def get(self, stage: str, metric: str):
        return self.values.get((stage, metric))


@dataclass
class Card:
    """Where a cell's latest card can be read: `href` relative to the report or on the hub (None: no link)."""
    text: str
    href: str | None
    held: bool  # held back by its quality gates (under <store>/gated/)


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats: x no larger and y no worse, one of them strictly.
    Fewer x is better. Equal points do not beat each other, so duplicates are all kept. Sorted by x."""
    sign = -1 if higher_is_better else 1
    pts = [(x, sign * y) for x, y in points]  # both to minimise
    front = [i for i, p in enumerate(pts) if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)]
    return sorted(front, key=lambda i: (pts[i], i))


def slugify(name: str) -> str:
    """A file-name-safe form of a model name: 'org/My Model' -> 'org-My-Model'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def log_floor(values: list[float]) -> float | None:
    """Where a log axis is called for (positive values spanning two decades or more), the floor that values <= 0
    are drawn at: half a decade or more below the smallest positive value. None: use a linear axis."""
    pos = [v for v in values if v > 0]
    if not pos or max(pos) / min(pos) < 100:
        return None
    return 10.0 ** math.floor(math.log10(min(pos)) - 0.5)


def clip_cap(values: list[float]) -> float | None:
    """Where a few values sit over a hundred times the median and the others span less than two decades (one
    cell's perplexity at 4e6 among others near 30), the largest of the others: the axis stops there, linear, and
    the few are drawn above it with their value written. On a log axis the others would be one flat band.
    None: no such outliers (a log axis or a linear one reads well)."""
    pos = [v for v in values if v > 0]
    if len(pos) < 3:  # of two values, which is the outlier? a log axis shows both
        return None
    rest = [v for v in values if v <= 100 * median(pos)]
    if len(rest) == len(values) or log_floor(rest) is not None:
        return None
    return max(rest)


def mean_acc_halfwidth(row: Row, tasks: list[str]) -> float | None:
    """Half the 95% interval of a recipe's mean accuracy, from each task's standard error (the table's ±), the
    tasks' questions taken as independent samples; None where the mean or a task's standard error is missing."""
    if mean_acc(row, tasks) is None or not all(t in row.stderr for t in tasks):
        return None
    return Z95 * math.sqrt(sum(row.stderr[t] ** 2 for t in tasks)) / len(tasks)


def frontier_status(xs: list[float], ys: list[float], halves: list[float | None],
                    higher_is_better: bool) -> list[tuple[str, int | None]]:
    """Per point: ('frontier', None); ('within noise', j): off the frontier, but its interval (y +- half) reaches
    the step line at its bits, whose value point j sets, so the data do not show it worse; ('dominated', j): its
    interval stays clear of the step line. Without an interval (half None) a point off the frontier is dominated."""
    front = set(pareto_front(list(zip(xs, ys)), higher_is_better))
    sign = 1 if higher_is_better else -1
    out = []
    for i, (x, y, half) in enumerate(zip(xs, ys, halves)):
        if i in front:
            out.append(("frontier", None))
            continue
        # the step line at x: the best value among the recipes with no more bits (the fewer bits on a tie)
        j = max((k for k in range(len(xs)) if xs[k] <= x), key=lambda k: (sign * ys[k], -xs[k]))
        reaches = half is not None and sign * (y - ys[j]) + half >= 0
        out.append(("within noise" if reaches else "dominated", j))
    return out


def load_latest(db) -> dict[str, list[Row]]:
    """model -> its recipes' current rows, sorted by bits per weight, highest first."""
    stages = ("benchmark", "quantize", "fidelity", "smoke")
    _, rows = db.query("SELECT model, recipe, stage, task, metric, value, stderr, n, data, backend FROM latest_metrics "
                       "WHERE stage IN (?, ?, ?, ?) AND value IS NOT NULL ORDER BY model, recipe, stage, task, metric",
                       list(stages))
    models: dict[str, dict[str, Row]] = {}
    for model, recipe, stage, task, metric, value, stderr, n, data, backend in rows:
        row = models.setdefault(model, {}).setdefault(recipe, Row(recipe))
        if stage == "benchmark" and metric == "acc":
            row.acc[task], row.how[task] = value, (n, data, backend)
            if stderr is not None:
                row.stderr[task] = stderr
        elif task in ("model", "fidelity", "smoke"):
            row.values[(stage, metric)] = value
    for (model, recipe), failed in db.failed_gates().items():
        if recipe in models.get(model, {}):
            models[model][recipe].gated = describe(failed)
    by_bits = lambda r: (-(r.get("quantize", "bits_per_weight") or -1.0), r.recipe)
    return {m: sorted(recipes.values(), key=by_bits) for m, recipes in models.items()}


def load_history(db) -> dict[str, dict[str, dict[str, list[tuple]]]]:
    """model -> panel title -> recipe -> [(run start, value)] in time order: mean acc (of two tasks or more),
    each task's acc, HISTORY. One point per artifact a cell's stage made, at the start of the run that computed it
    (the `stages` table says which runs only found it cached; where no run computed it, pulled from a
    mirror, the first run that used it)."""
    _, rows = db.query("""
        WITH made AS (
            SELECT s.model, s.recipe, s.stage, s.key,
                   coalesce(min(r.started) FILTER (WHERE NOT s.cached), min(r.started)) AS computed
            FROM stages s JOIN runs r USING (run_id)
            WHERE s.status = 'done' AND s.stage IN ('benchmark', 'fidelity', 'smoke')
            GROUP BY ALL)
        SELECT a.model, a.recipe, a.stage, m.task, m.metric, m.value, a.computed, a.key
        FROM made a JOIN metrics m ON m.model = a.model AND m.recipe = a.recipe AND m.stage = a.stage
                                  AND m.artifact_key = a.key
        WHERE m.value IS NOT NULL AND ((a.stage = 'benchmark' AND m.metric = 'acc')
           OR (a.stage, m.metric) IN (('fidelity', 'kl_mean'), ('fidelity', 'ppl'), ('smoke', 'generation_tokens_per_s')))
        ORDER BY a.computed, a.key""")
    names = {(stage, metric): title for stage, metric, title in HISTORY}
    points: dict[tuple, dict] = {}  # (model, panel, recipe) -> {(computed, artifact key): value}
    accs: dict[tuple, dict] = {}  # (model, recipe, computed, key) -> {task: acc}
    for model, recipe, stage, task, metric, value, computed, key in rows:
        if stage == "benchmark":
            accs.setdefault((model, recipe, computed, key), {})[task] = value
            panel = f"acc {task}"
        else:
            panel = names[(stage, metric)]
        points.setdefault((model, panel, recipe), {})[(computed, key)] = value
    tasks = {(model, task) for model, _, stage, task, *_ in rows if stage == "benchmark"}
    for (model, recipe, computed, key), by_task in accs.items():
        if sum(m == model for m, _ in tasks) > 1:  # of one task, the mean is that task's panel again
            points.setdefault((model, "mean acc", recipe), {})[(computed, key)] = sum(by_task.values()) / len(by_task)
    out: dict[str, dict[str, dict[str, list]]] = {}
    for (model, panel, recipe), series in points.items():
        out.setdefault(model, {}).setdefault(panel, {})[recipe] = [(t, v) for (t, _), v in sorted(series.items())]
    titles = [title for _, _, title in HISTORY]
    order = lambda p: (0, "") if p == "mean acc" else (1, p) if p.startswith("acc ") else (2, str(titles.index(p)))
    return {m: {p: dict(sorted(panels[p].items())) for p in sorted(panels, key=order)} for m, panels in sorted(out.items())}


def latest_failures(db) -> dict[tuple[str, str], str]:
    """(model, recipe) -> what failed in the latest run: the stage and the first line of its error."""
    _, rows = db.query("SELECT model, recipe, stage, error FROM stages WHERE status = 'failed' AND run_id = "
                       "(SELECT run_id FROM runs ORDER BY started DESC LIMIT 1) ORDER BY finished")
    out = {}
    for model, recipe, stage, error in rows:
        lines = [line.strip() for line in (error or "").splitlines() if line.strip()] or ["no error recorded"]
        out.setdefault((model, recipe), f"{stage}: {lines[0][:300]}")
    return out


def card_links(db, root: Path, out: Path | None) -> dict[tuple[str, str], Card]:
    """(model, recipe) -> its latest card: on the hub where its receipt says it was uploaded, else the card in
    <store>/published/ or <store>/gated/ (an export elsewhere: the card artifact), linked relative to `out`
    when the report is under the store; from elsewhere a relative link would name the store's path."""
    from tasks.publish import RECEIPT
    from storage.settings import settings

    _, rows = db.query("SELECT model, recipe, key FROM stages WHERE status = 'done' AND stage = 'publish' "
                       "QUALIFY row_number() OVER (PARTITION BY model, recipe ORDER BY finished DESC) = 1")
    receipts = {}
    for folder in sorted([*root.glob("published/*"), *root.glob("gated/*")]):
        try:
            receipt = json.loads((folder / RECEIPT).read_text())
        except (OSError, ValueError):
            continue
        receipts[receipt.get("card")] = (folder, receipt)
    under = out is not None and Path(out).resolve().is_relative_to(root)
    cards = {}
    for model, recipe, key in rows:
        folder, receipt = receipts.get(key, (None, {}))
        held = bool(receipt.get("held_at"))
        repo = (receipt.get("uploaded") or {}).get("repo")
        if repo:
            cards[model, recipe] = Card(f"hub: {repo}", f"{settings().hub_endpoint}/{repo}", held)
            continue
        card = folder / "README.md" if folder is not None else root / "artifacts" / "publish" / key / "README.md"
        if not card.exists():
            continue
        where = "held back" if held else "exported" if receipt.get("exported_to") else "in the store"
        href = os.path.relpath(card, Path(out).resolve()).replace(os.sep, "/") if under else None
        cards[model, recipe] = Card(f"card ({where})", href, held)
    return cards


def no_paths(text: str) -> str:
    """`text` with every absolute path cut to its last part: '/home/me/.qsweep/x/README.md' -> '…/README.md'.
    A URL's path and a relative path stay."""
    return re.sub(r"(?<![\w.:/~-])~?/(?:[^/\s'\"`()\[\]<>]+/)+", "…/", text)


def accuracy_table(rows: list[Row], cards: dict[str, Card] | None = None,
                   failures: dict[str, str] | None = None) -> tuple[list[str], list[list]]:
    """The table's header and rows; a cell is text, or a Card (a link). `cards` and `failures` by recipe."""
    cards, failures = cards or {}, failures or {}
    tasks = sorted({t for r in rows for t in r.acc})
    extra = [c for c in EXTRA if any(r.get(c[1], c[2]) is not None for r in rows)]
    gates, failing = any(r.gated for r in rows), any(r.recipe in failures for r in rows)
    fmt = lambda v, spec: "" if v is None else format(v, spec)
    acc = lambda r, t: "" if t not in r.acc else fmt(r.acc[t], ".3f") + (f" ±{r.stderr[t]:.3f}" if t in r.stderr else "")
    status = dict(zip([r.recipe for r in rows], accuracy_status(rows, tasks)))
    header = ["recipe", "bits/weight", "size", *tasks, "mean acc", "accuracy frontier", *(c[0] for c in extra)]
    header += (["quality gates"] if gates else []) + (["latest run"] if failing else []) + (["card"] if cards else [])
    body = []
    for r in rows:
        body.append([r.recipe, fmt(r.get("quantize", "bits_per_weight"), ".2f"), human_bytes(r.get("quantize", "disk_bytes")),
                     *(acc(r, t) for t in tasks), fmt(mean_acc(r, tasks), ".3f"), status[r.recipe],
                     *(fmt(r.get(stage, metric), spec) for _, stage, metric, spec in extra)]
                    + ([f"failed: {r.gated}" if r.gated else "passed"] if gates else [])
                    + ([f"failed: {failures[r.recipe]}" if r.recipe in failures else "done"] if failing else [])
                    + ([cards.get(r.recipe, "")] if cards else []))
    return header, body


def accuracy_status(rows: list[Row], tasks: list[str]) -> list[str]:
    """Each row's place on the accuracy frontier, as the table says it ('' without a mean accuracy)."""
    points = [(i, r.get("quantize", "bits_per_weight"), mean_acc(r, tasks)) for i, r in enumerate(rows)]
    points = [p for p in points if p[1] is not None and p[2] is not None]
    out = [""] * len(rows)
    if not points:
        return out
    idx, xs, ys = map(list, zip(*points))
    halves = [mean_acc_halfwidth(rows[i], tasks) for i in idx]
    for i, (what, j) in zip(idx, frontier_status(xs, ys, halves, True)):
        out[i] = ("on the frontier" if what == "frontier" else f"within noise of {rows[idx[j]].recipe}"
                  if what == "within noise" else f"dominated by {rows[idx[j]].recipe}")
    return out


def measured_how(rows: list[Row]) -> str:
    """How the table's accuracies were measured: questions, data and backend per task, as the rows say."""
    how = {}
    for r in rows:
        for task, (n, data, backend) in r.how.items():
            how.setdefault(task, set()).add((n, data, backend))
    parts = []
    for task, ways in sorted(how.items()):
        parts += [f"{task}: {n} questions, {data or 'lm-eval data'}, {backend} weights" for n, data, backend in sorted(ways, key=str)]
    return "; ".join(parts)


def mean_acc(row: Row, tasks: list[str]) -> float | None:
    """Over all the model's tasks, or none: a mean over fewer tasks would not compare."""
    return sum(row.acc[t] for t in tasks) / len(tasks) if tasks and all(t in row.acc for t in tasks) else None


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})  # no version stamp: same data, same bytes
    return buf.getvalue()


def _label_points(ax, xs, ys, names):
    """Recipe names beside their points, each at the spot, of a few, that covers the least of the points and of
    the labels placed so far (nearest spots first); a label moved away from its point gets a leader line."""
    ax.autoscale_view()  # the final limits, so data -> pixels is final
    k = DPI / 72  # pixels per point
    spots = [(dx, dy) for dy in (3, -3, 11, -11, 19, -19) for dx in (5, -5)]
    pix = [ax.transData.transform(p) for p in zip(xs, ys)]
    placed = [(px - 5 * k, py - 5 * k, 10 * k, 10 * k) for px, py in pix]  # the markers
    cover = lambda x0, y0, w, h: sum(max(0, min(x0 + w, a + bw) - max(x0, a)) * max(0, min(y0 + h, b + bh) - max(y0, b))
                                     for a, b, bw, bh in placed)
    for i in sorted(range(len(names)), key=lambda i: (xs[i], ys[i])):
        (px, py), w, h = pix[i], 0.6 * FONT * len(names[i]) * k, FONT * k
        boxes = [(px + dx * k - (w if dx < 0 else 0), py + dy * k - (h if dy < 0 else 0), w, h) for dx, dy in spots]
        covered = [cover(*box) for box in boxes]
        fits = [j for j, c in enumerate(covered) if c <= 0.1 * w * h]
        j = fits[0] if fits else min(range(len(spots)), key=covered.__getitem__)
        placed.append(boxes[j])
        dx, dy = spots[j]
        ax.annotate(names[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", fontsize=FONT,
                    ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"} if abs(dy) > 3 else None)


def frontier_figure(title: str, names: list[str], xs: list[float], ys: list[float], ylabel: str,
                    higher_is_better: bool, log: bool = False, halves: list[float | None] | None = None):
    """Bits per weight against a quality measure, every recipe labelled, the Pareto frontier as a step line.
    With `halves` (95% interval half-widths), each point's interval as a bar, and a point off the frontier whose
    bar reaches the step line drawn hollow: within noise of the frontier, not called dominated."""
    from matplotlib.figure import Figure

    halves = halves or [None] * len(xs)
    floor = log_floor(ys) if log else None
    if floor is not None:
        ys = [max(y, floor) for y in ys]
        ylabel += "\n(log scale" + (f"; values <= 0 drawn at {floor:g})" if min(ys) <= floor else ")")
    status = [s for s, _ in frontier_status(xs, ys, halves, higher_is_better)]
    front = pareto_front(list(zip(xs, ys)), higher_is_better)
    fig = Figure(figsize=(7, 4.5))  # fixed margins: constrained layout would double the time per plot
    ax = fig.subplots(gridspec_kw={"left": 0.13, "right": 0.97, "bottom": 0.11, "top": 0.92})
    if floor is not None:
        ax.set_yscale("log")
    bars = [i for i, h in enumerate(halves) if h is not None]
    if bars:
        ax.errorbar([xs[i] for i in bars], [ys[i] for i in bars], yerr=[halves[i] for i in bars], fmt="none",
                    ecolor="0.45", elinewidth=0.9, capsize=3, zorder=1, label="95% interval")
    ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="C3", lw=1.5, zorder=1)
    searched = sorted((xs[i], ys[i]) for i, n in enumerate(names) if n.startswith("auto-"))  # `search:` budgets
    if len(searched) > 1:
        ax.plot(*zip(*searched), color="C0", lw=1.2, ls="--", zorder=1, label="searched recipes (auto-<budget>)")
    for what, style, label in [
            ("dominated", {"s": 22, "color": "0.55"}, "dominated: interval below the frontier" if bars else "recipe"),
            ("within noise", {"s": 34, "facecolor": "white", "edgecolor": "C3", "linewidths": 1.3},
             "within noise of the frontier"),
            ("frontier", {"s": 50, "color": "C3", "edgecolor": "black"}, "Pareto frontier")]:
        pick = [i for i, s in enumerate(status) if s == what]
        if pick:
            ax.scatter([xs[i] for i in pick], [ys[i] for i in pick], zorder=3 if what == "frontier" else 2, label=label,
                       **style)
    _finish(ax, title, "bits per weight (fewer is better)", ylabel, xs, ys, names)
    return fig


def _finish(ax, title: str, xlabel: str, ylabel: str, xs, ys, names) -> None:
    """What every Pareto plot ends with: axes, title, grid, legend and each point's recipe label."""
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.15, y=0.12)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=FONT)
    _label_points(ax, xs, ys, names)


def frontier_png(*args, **kwargs) -> bytes:
    return _png(frontier_figure(*args, **kwargs))


def history_figure(model: str, panels: dict[str, dict[str, list[tuple]]]):
    """One small plot per metric, one line per recipe over the start times of the runs that computed each value;
    one legend for all. A panel of values spanning decades is drawn on a log axis, unless a few outliers alone
    span them (clip_cap): then those are drawn above a linear axis with their value written."""
    import matplotlib
    from matplotlib import dates
    from matplotlib.figure import Figure

    recipes = sorted({r for series in panels.values() for r in series})
    cmap = matplotlib.colormaps["tab20"]
    style = {r: {"color": f"C{i}" if len(recipes) <= 10 else cmap(i % 20), "marker": "osD^v"[i // 20 % 5]}
             for i, r in enumerate(recipes)}
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    pw, ph, gw, gh = 3.6, 2.0, 0.7, 0.8  # panel width and height, gaps between them (inches); fixed, not constrained:
    left, top, bottom = 0.65, 0.7, 0.6 + 0.22 * math.ceil(len(recipes) / 6)  # it would double the time
    width, height = left + ncols * pw + (ncols - 1) * gw + 0.2, top + bottom + nrows * ph + (nrows - 1) * gh
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw={
        "left": left / width, "right": 1 - 0.2 / width, "top": 1 - top / height, "bottom": bottom / height,
        "wspace": gw / pw, "hspace": gh / ph}).ravel()
    times = [t for series in panels.values() for pts in series.values() for t, _ in pts]
    pad = (max(times) - min(times)) / 25 or timedelta(minutes=30)  # one time alone: else matplotlib spans years
    span = (min(times) - pad, max(times) + pad)  # the same on every panel, so that a run is one x everywhere
    for ax, (title, series) in zip(axes, panels.items()):
        values = [v for pts in series.values() for _, v in pts]
        cap = clip_cap(values)
        floor = None if cap is not None else log_floor(values)
        if cap is not None:  # the others on a linear axis up to `cap`; the outliers in a band above it
            low = min(v for v in values if v <= cap)
            pad = 0.12 * (cap - low) or 0.12 * abs(cap) or 1.0
            band = cap + 1.5 * pad
            ax.set_ylim(low - pad, cap + 3 * pad)
            title += f" (▲: above {cap:.3g}, value written)"
        for recipe, pts in series.items():
            ys = [v if floor is None else max(v, floor) for _, v in pts]
            if cap is not None:
                ys = [band if v > cap else v for v in ys]
            ax.plot([t for t, _ in pts], ys, lw=1.2, ms=4, label=recipe, **style[recipe])
            for t, v in pts if cap is not None else []:
                if v > cap:
                    ax.plot([t], [band], ls="none", marker="^", ms=7, color=style[recipe]["color"], label="_clipped")
                    right = t > span[0] + (span[1] - span[0]) / 2  # the text towards the middle: in the panel
                    ax.annotate(f"{v:.2g}", (t, band), xytext=(-6 if right else 6, -3), textcoords="offset points",
                                fontsize=7, ha="right" if right else "left", color=style[recipe]["color"])
        if floor is not None:
            ax.set_yscale("log")
            title += f" (log; <= 0 at {floor:g})" if min(values) <= 0 else " (log scale)"
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        locator = dates.AutoDateLocator(minticks=2, maxticks=4)  # a few times; the date once, at the axis' end
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator))
        ax.set_xlim(*span)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [axes[0].plot([], [], label=r, **style[r])[0] for r in recipes]
    fig.legend(handles=handles, loc="lower center", ncols=min(6, len(recipes)), fontsize=FONT)
    fig.suptitle(f"{model}: history, one point per computed result (x: start of the run that computed it)", fontsize=10)
    return fig


def history_png(model: str, panels: dict[str, dict[str, list[tuple]]]) -> bytes:
    return _png(history_figure(model, panels))


def report_blocks(store, out: Path | None = None) -> list[tuple]:
    """The report as a list of blocks, for either format: ('h1'|'h2'|'h3'|'p', text), ('table', header, rows),
    ('ul', items), ('img', file name, png bytes, alt text). A table cell or an item is text or a Card (a link).
    `out`: where the report goes, for relative links to the cards."""
    from storage.artifacts import Store
    from storage.metrics import MetricStore

    root = Store(store).root
    db = MetricStore(Store(store).metrics_db)
    latest = load_latest(db)
    if not any(r.acc or any(s == "quantize" for s, _ in r.values) for rows in latest.values() for r in rows):
        raise ValueError(f"no benchmark or quantize metrics in {root} yet: run a sweep first (qsweep run SWEEP.yaml)")
    _, runs = db.query("SELECT count(*) OVER (), sweep, started, status, tools FROM runs ORDER BY started DESC LIMIT 1")
    history = load_history(db)
    failures, cards = latest_failures(db), card_links(db, root, out)
    n_runs = runs[0][0] if runs else 0
    # "as of": a sweep that computed nothing leaves the report as it was (flows/sweep.py), so say when it was made
    blocks = [("h1", "qsweep report"), ("p", f"Store {root.name} as of {datetime.now():%Y-%m-%d %H:%M:%S}: "
                                             f"{n_runs} run{'s' * (n_runs != 1)}.")]
    if runs:
        _, sweep, started, status, tools = runs[0]
        tools = ", ".join(f"{k} {v}" for k, v in json.loads(tools or "{}").items())
        blocks.append(("p", f"Latest run then: sweep {sweep}, started {started:%Y-%m-%d %H:%M:%S %Z}, {status}. "
                            f"Tools: {tools}."))
    blocks.append(("p", PARETO_HOWTO))
    slugs: dict[str, str] = {}
    for model in sorted({*latest, *(m for m, _ in failures)}):
        rows = latest.get(model, [])
        slug = slugify(model)
        while slug in slugs.values():  # 'a/b' and 'a b': the later one in sort order gets a suffix
            slug += "-"
        slugs[model] = slug
        mine = lambda d: {r: v for (m, r), v in d.items() if m == model}
        header, body = accuracy_table(rows, mine(cards), mine(failures))
        blocks += [("h2", model)]
        if rows:
            blocks += [("p", "Each recipe as last computed, sorted by bits per weight. Accuracy: the benchmark's acc "
                             "± its standard error; mean acc: over all the tasks, blank where one is missing; accuracy "
                             "frontier: where its mean acc stands on the accuracy Pareto plot, its 95% interval "
                             f"considered. Measured on {measured_how(rows)}."), ("table", header, body)]
        blocks += trouble_blocks(rows, mine(cards), mine(failures))
        if rows:
            blocks += frontier_blocks(model, slug, rows)
        if model in history:
            blocks += [("h3", "History"), ("img", f"history-{slug}.png", history_png(model, history[model]),
                                           f"{model}: metrics over runs, one point per computed result")]
    blocks += models_blocks(latest)
    return [(*b[:3], no_paths(b[3])) if b[0] == "img" else (b[0], *map(_no_paths_in, b[1:])) for b in blocks]


def models_blocks(latest: dict[str, list[Row]]) -> list[tuple]:
    """Several models on one plot: mean accuracy against size on disk, each model's own frontier, over the tasks
    every one of them measured the same way (questions, data, backend); none when fewer than two models have them."""
    hows = [h for h in ({t: h for r in rows for t, h in r.how.items()} for rows in latest.values()) if h]
    shared = sorted(t for t in set.intersection(*(set(h) for h in hows)) if len({h[t] for h in hows}) == 1) if hows else []
    series = {}
    for model, rows in latest.items():
        pts = [(r.recipe + " (gated)" * bool(r.gated), r.get("quantize", "disk_bytes"), mean_acc(r, shared), r)
               for r in rows]
        pts = [(n, b / 1e9, y, mean_acc_halfwidth(r, shared)) for n, b, y, r in pts if b and y is not None]
        if pts:
            series[model] = pts
    if len(series) < 2:
        return []
    n, data, backend = hows[0][shared[0]]
    tasks = f"{len(shared)} task{'s' * (len(shared) != 1)}"
    title = f"mean accuracy over {tasks} against size on disk"
    text = (f"Every model's recipes on one plot, for choosing a model and a recipe for a size budget: mean accuracy "
            f"over the {tasks} all of them measured on the same questions ({', '.join(shared)}; "
            f"{n} each, {data}, backend {backend}) with its 95% interval, against the model's bytes on disk; the step "
            f"line is each model's own accuracy frontier.")
    return [("h2", "Models side by side"), ("p", text),
            ("img", "models.png", _png(models_figure(title, series)), f"{title}, one frontier per model")]


def models_figure(title: str, series: dict[str, list[tuple]]):
    """series: model -> [(recipe, GB on disk, mean acc, 95% half-width or None)]."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots(gridspec_kw={"left": 0.11, "right": 0.97, "bottom": 0.11, "top": 0.92})
    names, xs, ys = [], [], []
    for i, (model, pts) in enumerate(sorted(series.items())):
        color = f"C{i % 10}"
        front = pareto_front([(x, y) for _, x, y, _ in pts], True)
        ax.step([pts[j][1] for j in front], [pts[j][2] for j in front], where="post", color=color, lw=1.3, zorder=1)
        bars = [p for p in pts if p[3] is not None]
        if bars:
            ax.errorbar([p[1] for p in bars], [p[2] for p in bars], yerr=[p[3] for p in bars], fmt="none",
                        ecolor=color, alpha=0.45, elinewidth=0.9, capsize=3, zorder=1)
        ax.scatter([p[1] for p in pts], [p[2] for p in pts], s=36, color=color, edgecolor="black", zorder=3, label=model)
        names += [p[0] for p in pts]
        xs += [p[1] for p in pts]
        ys += [p[2] for p in pts]
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.1, not 10^-1
    ax.xaxis.set_minor_formatter(FuncFormatter(  # 0.2, 0.3, 0.5 between them; the others unlabelled
        lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 3, 5) else ""))
    _finish(ax, title, "size on disk, GB (log scale; smaller is better)", "mean accuracy (higher is better)", xs, ys, names)
    return fig


def _no_paths_in(part):
    """no_paths over a table's header, rows or a list's items; links and PNG bytes as they are."""
    if isinstance(part, list):
        return [_no_paths_in(p) for p in part]
    if isinstance(part, Card):
        return Card(no_paths(part.text), part.href, part.held)
    return no_paths(part) if isinstance(part, str) else part


def trouble_blocks(rows: list[Row], cards: dict[str, Card], failures: dict[str, str]) -> list[tuple]:
    """The cells held back by their quality gates and those that failed in the latest run, each with what failed."""
    items = []
    for r in rows:
        if r.gated:
            card = cards.get(r.recipe)
            what = "held back by its quality gates (not exported, not uploaded)" if card is None or card.held else \
                "failed its quality gates, published anyway (allowed by the sweep file or --force-gated)"
            items.append([f"{r.recipe}: {what}; failed: {r.gated}." + (" Its card: " if card else ""), *([card] if card else [])])
    for recipe, failure in sorted(failures.items()):
        shown = " (the table shows its values from an earlier run)" if any(r.recipe == recipe for r in rows) else ""
        items.append([f"{recipe}: failed in the latest run at {failure}{shown}."])
    return [("h3", "Failed and held-back cells"), ("ul", items)] if items else []


def frontier_blocks(model: str, slug: str, rows: list[Row]) -> list[tuple]:
    blocks = [("h3", "Pareto frontiers")]
    tasks = sorted({t for r in rows for t in r.acc})
    for kind, stage, what, ylabel, higher, log, values in [
            ("kl", "fidelity", "KL divergence from the base", "mean KL divergence from the base (lower is better)",
             False, True, lambda r: r.get("fidelity", "kl_mean")),
            ("acc", "benchmark", "mean accuracy", f"mean accuracy over {len(tasks)} task{'s' * (len(tasks) != 1)}"
             " (higher is better)", True, False, lambda r: mean_acc(r, tasks))]:
        pts = [(r.recipe + " (gated)" * bool(r.gated), r.get("quantize", "bits_per_weight"), values(r), r) for r in rows]
        pts = [p for p in pts if p[1] is not None and p[2] is not None]
        if not pts:
            blocks.append(("p", f"No plot of bits per weight against {what}: no recipe has both "
                                f"(no {stage} metrics yet?)."))
            continue
        names, xs, ys, picked = map(list, zip(*pts))
        halves = [mean_acc_halfwidth(r, tasks) for r in picked] if kind == "acc" else None
        title = f"{model}: {what} against bits per weight"
        alt = f"{title}, Pareto frontier" + (", each recipe with its 95% interval" if kind == "acc" else "")
        blocks.append(("img", f"pareto-{kind}-{slug}.png", frontier_png(title, names, xs, ys, ylabel, higher, log,
                                                                      halves=halves), alt))
    return blocks


def _cell_html(c) -> str:
    if isinstance(c, Card):
        return f'<a href="{html.escape(c.href)}">{html.escape(c.text)}</a>' if c.href else html.escape(c.text)
    return html.escape(c)


def _cell_md(c) -> str:
    if isinstance(c, Card):
        text = c.text.replace("[", "\\[").replace("]", "\\]")
        return f"[{text}]({c.href.replace(' ', '%20')})" if c.href else text
    return c


def render_html(blocks: list[tuple]) -> str:
    e = html.escape
    parts = ["<!doctype html>", '<html><head><meta charset="utf-8"><title>qsweep report</title><style>',
             "body{font-family:sans-serif;margin:2em;max-width:80em} table{border-collapse:collapse;font-size:90%}",
             "th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right} td:first-child,th:first-child{text-align:left}",
             "td.num,th{white-space:nowrap} img{max-width:100%}</style></head><body>"]
    for b in blocks:
        if b[0] == "table":
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr>")
            td = lambda c: '<td class="num">' if isinstance(c, str) and NUMBER.fullmatch(c) else "<td>"
            parts += ["<tr>" + "".join(f"{td(c)}{_cell_html(c)}</td>" for c in row) + "</tr>" for row in b[2]]
            parts.append("</table>")
        elif b[0] == "ul":
            parts.append("<ul>" + "".join("<li>" + "".join(map(_cell_html, item)) + "</li>" for item in b[1]) + "</ul>")
        elif b[0] == "img":
            data = base64.b64encode(b[2]).decode()
            parts.append(f'<p><img alt="{e(b[3])}" src="data:image/png;base64,{data}"></p>')
        else:
            parts.append(f"<{b[0]}>{e(b[1])}</{b[0]}>")
    return "\n".join(parts + ["</body></html>", ""])


def render_md(blocks: list[tuple]) -> tuple[str, dict[str, bytes]]:
    """The markdown text and the PNG files it references by relative path."""
    lines, files = [], {}
    for b in blocks:
        if b[0] == "table":
            lines += markdown_table(b[1], [[_cell_md(c) for c in row] for row in b[2]])
        elif b[0] == "ul":
            lines += ["- " + "".join(map(_cell_md, item)) for item in b[1]]
        elif b[0] == "img":
            files[b[1]] = b[2]
            lines.append(f"![{b[3]}]({b[1]})")
        else:
            lines.append({"h1": "# ", "h2": "## ", "h3": "### ", "p": ""}[b[0]] + b[1])
        lines.append("")
    return "\n".join(lines), files


def write_report(store: str | Path, out: Path, fmt: str = "html") -> list[Path]:
    """Write the report of a store into directory `out`: report.html (self-contained), or report.md and its PNGs.
    Returns the files written."""
    if fmt not in FORMATS:
        raise ValueError(f"report format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    out = Path(out)
    blocks = report_blocks(store, out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "html":
        (out / "report.html").write_text(render_html(blocks), encoding="utf-8")
        return [out / "report.html"]
    text, files = render_md(blocks)
    for name, data in files.items():
        (out / name).write_bytes(data)
    (out / "report.md").write_text(text, encoding="utf-8")
    return [out / "report.md", *(out / name for name in files)]
