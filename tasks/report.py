"""`qsweep report`: what a store knows, on one page: per model, the accuracy table, the Pareto plots, the history.

- html: one self-contained `report.html`, its PNGs inline as data URIs (mail it, open it offline).
- md: `report.md` and its PNGs next to it, for a repository or a model card.

Values are each cell's as last computed (the `latest_metrics` view). The history has one
point per run in which a cell's stage was done, computed or cached, with the value of the
artifact that run used, so a cached re-run repeats the value and a return to earlier
settings shows the earlier artifact's value again.
"""

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from tasks.gates import describe
from tasks.tables import human_bytes, markdown_table

FORMATS = ("html", "md")
DPI = 100
FONT = 8  # point size of the recipe labels
PARETO_HOWTO = ("How to read the Pareto plots: each point is a recipe; fewer bits per weight is better, and so "
                "is lower KL divergence from the base / higher mean accuracy. A recipe on the frontier (red) is "
                "beaten by no other recipe on both axes at once; the step line is the best value to be had within "
                "a given number of bits per weight. A recipe off the frontier has a better alternative.")
# (label, stage, metric, format) of the table's columns after the accuracies, shown where some recipe has them
EXTRA = [("KL mean", "fidelity", "kl_mean", ".3g"), ("ppl ratio", "fidelity", "ppl_ratio", ".4f"),
         ("same top", "fidelity", "same_top", ".3f"), ("gen tok/s", "smoke", "generation_tokens_per_s", ".1f"),
         ("peak GB", "smoke", "peak_memory_gb", ".3g")]
HISTORY = [("fidelity", "kl_mean", "KL mean"), ("fidelity", "ppl", "perplexity"),
           ("smoke", "generation_tokens_per_s", "generation tokens/s")]  # after mean acc and each task's acc


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
    each task's acc, HISTORY. One point per run in which the cell's stage was done, from the artifact it used."""
    _, rows = db.query("""
        SELECT s.model, s.recipe, s.stage, m.task, m.metric, m.value, r.started, s.run_id
        FROM stages s JOIN runs r USING (run_id)
        JOIN metrics m ON m.model = s.model AND m.recipe = s.recipe AND m.stage = s.stage AND m.artifact_key = s.key
        WHERE s.status = 'done' AND m.value IS NOT NULL AND ((s.stage = 'benchmark' AND m.metric = 'acc')
           OR (s.stage, m.metric) IN (('fidelity', 'kl_mean'), ('fidelity', 'ppl'), ('smoke', 'generation_tokens_per_s')))
        ORDER BY r.started, s.run_id""")
    names = {(stage, metric): title for stage, metric, title in HISTORY}
    points: dict[tuple, dict] = {}  # (model, panel, recipe) -> {(started, run_id): value}; a repeat in a run: the last
    accs: dict[tuple, dict] = {}  # (model, recipe, started, run_id) -> {task: acc}
    for model, recipe, stage, task, metric, value, started, run_id in rows:
        if stage == "benchmark":
            accs.setdefault((model, recipe, started, run_id), {})[task] = value
            panel = f"acc {task}"
        else:
            panel = names[(stage, metric)]
        points.setdefault((model, panel, recipe), {})[(started, run_id)] = value
    tasks = {(model, task) for model, _, stage, task, *_ in rows if stage == "benchmark"}
    for (model, recipe, started, run_id), by_task in accs.items():
        if sum(m == model for m, _ in tasks) > 1:  # of one task, the mean is that task's panel again
            points.setdefault((model, "mean acc", recipe), {})[(started, run_id)] = sum(by_task.values()) / len(by_task)
    out: dict[str, dict[str, dict[str, list]]] = {}
    for (model, panel, recipe), series in points.items():
        out.setdefault(model, {}).setdefault(panel, {})[recipe] = [(t, v) for (t, _), v in sorted(series.items())]
    titles = [title for _, _, title in HISTORY]
    order = lambda p: (0, "") if p == "mean acc" else (1, p) if p.startswith("acc ") else (2, str(titles.index(p)))
    return {m: {p: dict(sorted(panels[p].items())) for p in sorted(panels, key=order)} for m, panels in sorted(out.items())}


def accuracy_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    tasks = sorted({t for r in rows for t in r.acc})
    extra = [c for c in EXTRA if any(r.get(c[1], c[2]) is not None for r in rows)]
    gates = any(r.gated for r in rows)
    header = ["recipe", "bits/weight", "size", *tasks, "mean acc", *(c[0] for c in extra)] + (["quality gates"] if gates else [])
    fmt = lambda v, spec: "" if v is None else format(v, spec)
    acc = lambda r, t: "" if t not in r.acc else fmt(r.acc[t], ".3f") + (f" ±{r.stderr[t]:.3f}" if t in r.stderr else "")
    body = []
    for r in rows:
        body.append([r.recipe, fmt(r.get("quantize", "bits_per_weight"), ".2f"), human_bytes(r.get("quantize", "disk_bytes")),
                     *(acc(r, t) for t in tasks), fmt(mean_acc(r, tasks), ".3f"),
                     *(fmt(r.get(stage, metric), spec) for _, stage, metric, spec in extra)]
                    + ([f"failed: {r.gated}" if r.gated else "passed"] if gates else []))
    return header, body


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


def frontier_png(title: str, names: list[str], xs: list[float], ys: list[float], ylabel: str,
                 higher_is_better: bool, log: bool = False) -> bytes:
    """Bits per weight against a quality measure, every recipe labelled, the Pareto frontier as a step line."""
    from matplotlib.figure import Figure

    floor = log_floor(ys) if log else None
    if floor is not None:
        ys = [max(y, floor) for y in ys]
        ylabel += "\n(log scale" + (f"; values <= 0 drawn at {floor:g})" if min(ys) <= floor else ")")
    front = pareto_front(list(zip(xs, ys)), higher_is_better)
    fig = Figure(figsize=(7, 4.5))  # fixed margins: constrained layout would double the time per plot
    ax = fig.subplots(gridspec_kw={"left": 0.13, "right": 0.97, "bottom": 0.11, "top": 0.92})
    if floor is not None:
        ax.set_yscale("log")
    ax.scatter(xs, ys, s=22, color="0.55", zorder=2, label="recipe")
    ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="C3", lw=1.5, zorder=1)
    ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=50, color="C3", edgecolor="black", zorder=3,
               label="Pareto frontier")
    ax.set(xlabel="bits per weight (fewer is better)", ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.15, y=0.12)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=FONT)
    _label_points(ax, xs, ys, names)
    return _png(fig)


def history_png(model: str, panels: dict[str, dict[str, list[tuple]]]) -> bytes:
    """One small plot per metric, one line per recipe over run start times; one legend for all."""
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
    for ax, (title, series) in zip(axes, panels.items()):
        floor = log_floor([v for pts in series.values() for _, v in pts])
        for recipe, pts in series.items():
            ax.plot([t for t, _ in pts], [v if floor is None else max(v, floor) for _, v in pts], lw=1.2, ms=4,
                    label=recipe, **style[recipe])
        if floor is not None:
            ax.set_yscale("log")
            title += f" (log; <= 0 at {floor:g})"
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
        times = {t for pts in series.values() for t, _ in pts}
        if len(times) == 1:  # else matplotlib spans years around a single date
            t = times.pop()
            ax.set_xlim(t - timedelta(hours=12), t + timedelta(hours=12))
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [axes[0].plot([], [], label=r, **style[r])[0] for r in recipes]
    fig.legend(handles=handles, loc="lower center", ncols=min(6, len(recipes)), fontsize=FONT)
    fig.suptitle(f"{model}: history over runs (x: run start)", fontsize=10)
    return _png(fig)


def report_blocks(store) -> list[tuple]:
    """The report as a list of blocks, for either format: ('h1'|'h2'|'h3'|'p', text), ('table', header, rows),
    ('img', file name, png bytes, alt text)."""
    from storage.artifacts import Store
    from storage.metrics import MetricStore

    root = Store(store).root
    db = MetricStore(Store(store).metrics_db)
    latest = load_latest(db)
    if not any(r.acc or any(s == "quantize" for s, _ in r.values) for rows in latest.values() for r in rows):
        raise ValueError(f"no benchmark or quantize metrics in {root} yet: run a sweep first (qsweep run SWEEP.yaml)")
    _, runs = db.query("SELECT count(*) OVER (), sweep, started, status, tools FROM runs ORDER BY started DESC LIMIT 1")
    history = load_history(db)
    n_runs = runs[0][0] if runs else 0
    blocks = [("h1", "qsweep report"), ("p", f"Store {root}: {n_runs} run{'s' * (n_runs != 1)}.")]
    if runs:
        _, sweep, started, status, tools = runs[0]
        tools = ", ".join(f"{k} {v}" for k, v in json.loads(tools or "{}").items())
        blocks.append(("p", f"Latest run: sweep {sweep}, started {started:%Y-%m-%d %H:%M:%S %Z}, {status}. Tools: {tools}."))
    blocks.append(("p", PARETO_HOWTO))
    slugs: dict[str, str] = {}
    for model, rows in sorted(latest.items()):
        slug = slugify(model)
        while slug in slugs.values():  # 'a/b' and 'a b': the later one in sort order gets a suffix
            slug += "-"
        slugs[model] = slug
        header, body = accuracy_table(rows)
        blocks += [("h2", model), ("p", "Each recipe as last computed, sorted by bits per weight. Accuracy: the benchmark's acc "
                                        "± its standard error; mean acc: over all the tasks, blank where one is missing. "
                                        f"Measured on {measured_how(rows)}."), ("table", header, body),
                   ("h3", "Pareto frontiers")]
        tasks = sorted({t for r in rows for t in r.acc})
        for kind, stage, what, ylabel, higher, log, values in [
                ("kl", "fidelity", "KL divergence from the base", "mean KL divergence from the base (lower is better)",
                 False, True, lambda r: r.get("fidelity", "kl_mean")),
                ("acc", "benchmark", "mean accuracy", f"mean accuracy over {len(tasks)} task{'s' * (len(tasks) != 1)}"
                 " (higher is better)", True, False, lambda r: mean_acc(r, tasks))]:
            pts = [(r.recipe, r.get("quantize", "bits_per_weight"), values(r)) for r in rows]
            pts = [p for p in pts if p[1] is not None and p[2] is not None]
            if not pts:
                blocks.append(("p", f"No plot of bits per weight against {what}: no recipe has both "
                                    f"(no {stage} metrics yet?)."))
                continue
            names, xs, ys = map(list, zip(*pts))
            title = f"{model}: {what} against bits per weight"
            blocks.append(("img", f"pareto-{kind}-{slug}.png", frontier_png(title, names, xs, ys, ylabel, higher, log),
                           f"{title}, Pareto frontier"))
        if model in history:
            blocks += [("h3", "History"), ("img", f"history-{slug}.png", history_png(model, history[model]),
                                           f"{model}: metrics over runs")]
    return blocks


def render_html(blocks: list[tuple]) -> str:
    e = html.escape
    parts = ["<!doctype html>", '<html><head><meta charset="utf-8"><title>qsweep report</title><style>',
             "body{font-family:sans-serif;margin:2em;max-width:80em} table{border-collapse:collapse;font-size:90%}",
             "th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right} td:first-child,th:first-child{text-align:left}",
             "img{max-width:100%}</style></head><body>"]
    for b in blocks:
        if b[0] == "table":
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b[2]]
            parts.append("</table>")
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
            lines += markdown_table(b[1], b[2])
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
    blocks = report_blocks(store)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "html":
        (out / "report.html").write_text(render_html(blocks), encoding="utf-8")
        return [out / "report.html"]
    text, files = render_md(blocks)
    for name, data in files.items():
        (out / name).write_bytes(data)
    (out / "report.md").write_text(text, encoding="utf-8")
    return [out / "report.md", *(out / name for name in files)]
