"""The report: what a user opens after a sweep, built from a two-run history written by MetricStore itself."""

import base64
import html
import json
import re
from contextlib import contextmanager

import duckdb
import pytest

from storage.artifacts import Store
from storage.metrics import SCHEMA, MetricStore
from tasks.report import frontier_figure, frontier_status, history_figure, load_history, pareto_front, slugify, write_report

MODEL = "org/tiny model"  # a slash and a space: file names must still be safe
BITS = {"bf16": 16.0, "q8": 8.5, "q4": 4.5}
ACC = {"bf16": {"arc_easy": 0.6254, "boolq": 0.7001}, "q8": {"arc_easy": 0.6181, "boolq": 0.6938},
       "q4": {"arc_easy": 0.3717, "boolq": 0.5555}}
Q4_RUN2 = {"arc_easy": 0.4123, "boolq": 0.5876}  # q4's benchmark recomputed in run 2
KL = {"bf16": 0.0, "q8": 2.1e-4, "q4": 3.3e-2}
PNG = b"\x89PNG\r\n\x1a\n"


class HeldStore(MetricStore):
    """MetricStore's own writes through one held connection: opening the file per write costs 0.1 s each."""

    def __init__(self, path):
        super().__init__(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.con = duckdb.connect(str(path))
        self.con.execute(SCHEMA)

    @contextmanager
    def connect(self, read_only=False):
        yield self.con


def record(db, run, model, recipe, stage, key, rows, cached=False):
    db.record_stage(run, model, recipe, stage, key, "done", cached, 0.1)
    db.record_metrics(run, model, recipe, stage, key, rows)


def make_store(root, fidelity=True):
    db = HeldStore(Store(root).metrics_db)
    for run in ("run-1", "run-2"):
        db.start_run(run, "tiny", "sweeps/tiny.yaml", "d1", "host", {"mlx": "0.0.1", "mlx-lm": "0.0.2"}, [])
        for recipe, bits in BITS.items():
            cached = run == "run-2"  # a rerun finds every artifact but q4's new benchmark
            acc, key = (Q4_RUN2, "bench-q4-b") if (run, recipe) == ("run-2", "q4") else (ACC[recipe], f"bench-{recipe}")
            add_cell(db, run, recipe, bits, acc, KL[recipe] if fidelity else None, 10 + 100 * KL[recipe], cached,
                     bench_cached=cached and key != "bench-q4-b", bench_key=key)
        db.finish_run(run, "completed")
    db.con.close()
    return root


def add_cell(db, run, recipe, bits, acc, kl, ppl, cached=False, bench_cached=None, bench_key=None, stderr=0.02):
    record(db, run, MODEL, recipe, "quantize", f"quant-{recipe}",
           [{"task": "model", "metric": "bits_per_weight", "value": bits},
            {"task": "model", "metric": "disk_bytes", "value": bits * 1e8}], cached)
    record(db, run, MODEL, recipe, "benchmark", bench_key or f"bench-{recipe}",
           [{"task": t, "metric": m, "value": v, "stderr": stderr, "n": 100}
            for t, v in acc.items() for m in ("acc", "acc_norm")], cached if bench_cached is None else bench_cached)
    if kl is not None:
        record(db, run, MODEL, recipe, "fidelity", f"fid-{recipe}",
               [{"task": "fidelity", "metric": "kl_mean", "value": kl}, {"task": "fidelity", "metric": "ppl", "value": ppl}],
               cached)
    record(db, run, MODEL, recipe, "smoke", f"smoke-{recipe}",
           [{"task": "smoke", "metric": "generation_tokens_per_s", "value": 200 / bits}], cached)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def html_report(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    assert write_report(store, out, "html") == [out / "report.html"]
    return (out / "report.html").read_text()


def test_pareto_front_on_known_points():
    # bits, KL: (6.6, 6e-4) loses to (6.5, 5e-4) on both; the others trade bits for KL
    kl = [(16, 0.0), (8, 1e-4), (6.5, 5e-4), (6.6, 6e-4), (4.5, 1e-2)]
    assert pareto_front(kl, higher_is_better=False) == [4, 2, 1, 0]
    acc = [(16, 0.70), (8, 0.69), (6.5, 0.60), (6.6, 0.71), (4.5, 0.40)]  # 6.6 bits beats 8 and 16 on both
    assert pareto_front(acc, higher_is_better=True) == [4, 2, 3]


def test_pareto_front_ties_duplicates_and_a_single_point():
    assert pareto_front([(4, 0.5), (4, 0.6)], higher_is_better=True) == [1]  # same bits: the better one
    assert pareto_front([(4, 0.5), (8, 0.5)], higher_is_better=True) == [0]  # same accuracy: the fewer bits
    assert pareto_front([(4, 0.5), (8, 0.5)], higher_is_better=False) == [0]
    assert pareto_front([(8, 0.1), (4, 0.5), (4, 0.5)], higher_is_better=False) == [1, 2, 0]  # equals beat no one
    assert pareto_front([(3, 0.2)], higher_is_better=True) == [0]
    assert pareto_front([], higher_is_better=True) == []


def test_sizes_read_in_decimal_units():
    from tasks.tables import human_bytes

    assert [human_bytes(n) for n in (None, 850, 12_345, 269_123_456, 999_960_000, 1.6e9)] == [
        "", "850 B", "12.3 kB", "269.1 MB", "1.0 GB", "1.6 GB"]


def test_slugify_keeps_file_names_safe():
    assert slugify("org/tiny model") == "org-tiny-model"
    assert slugify("SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert slugify("../..") == "model"


def test_html_is_one_self_contained_file_with_the_table_and_plots(html_report):
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html_report)
    assert len(refs) == 3  # KL frontier, accuracy frontier, history
    assert all(r.startswith("data:image/png;base64,") for r in refs)
    assert all(base64.b64decode(r.split(",", 1)[1]).startswith(PNG) for r in refs)
    assert not re.search(r"https?://|<script|<link", html_report)

    table = html_report[html_report.index("<table>"):html_report.index("</table>")]
    assert [re.sub("<.*?>", "", r) for r in re.findall(r"<tr><td>(.*?)</td>", table)] == ["bf16", "q8", "q4"]  # bits, desc
    for recipe, acc in [("bf16", ACC["bf16"]), ("q8", ACC["q8"]), ("q4", Q4_RUN2)]:
        row = re.search(rf"<tr><td>{recipe}</td>(.*?)</tr>", table).group(1)
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        assert f"{acc['arc_easy']:.3f} ±0.020" in cells and f"{acc['boolq']:.3f} ±0.020" in cells  # with its stderr
        assert f"{(acc['arc_easy'] + acc['boolq']) / 2:.3f}" in cells  # mean acc
        assert f"{BITS[recipe]:.2f}" in cells
    assert "0.372" not in table  # q4's run-1 accuracy is history, not the current value
    assert "org/tiny model" in html_report and "mlx-lm 0.0.2" in html_report and "2 runs" in html_report
    assert "arc_easy: 100 questions" in html_report  # how it was measured
    assert "quality gates" not in table  # no card has failed a gate here


def test_md_references_png_files_that_exist(store, html_report, tmp_path):
    files = write_report(store, tmp_path / "a", "md")
    md = (tmp_path / "a" / "report.md").read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(refs) == ["history-org-tiny-model.png", "pareto-acc-org-tiny-model.png", "pareto-kl-org-tiny-model.png"]
    assert files == [tmp_path / "a" / "report.md", *(tmp_path / "a" / r for r in refs)]
    for ref in refs:
        assert (tmp_path / "a" / ref).read_bytes().startswith(PNG)
    assert "| q4 | 4.50 |" in md and f"{Q4_RUN2['arc_easy']:.3f}" in md
    # the same history drawn twice, once for the html: the same bytes
    embedded = [base64.b64decode(r) for r in re.findall(r'src="data:image/png;base64,([^"]*)"', html_report)]
    assert embedded == [(tmp_path / "a" / r).read_bytes() for r in refs]


def test_history_has_a_point_per_computed_artifact_with_its_value(store):
    db = MetricStore(Store(store).metrics_db)
    panels = load_history(db)[MODEL]
    assert list(panels) == ["mean acc", "acc arc_easy", "acc boolq", "KL mean", "perplexity", "generation tokens/s"]
    assert [v for _, v in panels["acc arc_easy"]["q4"]] == [ACC["q4"]["arc_easy"], Q4_RUN2["arc_easy"]]
    assert [v for _, v in panels["acc arc_easy"]["q8"]] == [ACC["q8"]["arc_easy"]]  # only found cached in run 2
    (t1, m1), (t2, m2) = panels["mean acc"]["q4"]
    assert t1 < t2 and m1 == pytest.approx(sum(ACC["q4"].values()) / 2) and m2 == pytest.approx(sum(Q4_RUN2.values()) / 2)


def test_without_fidelity_the_kl_plot_is_a_note(tmp_path):
    store = make_store(tmp_path / "store", fidelity=False)
    write_report(store, tmp_path / "out", "md")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "No plot of bits per weight against KL divergence" in md
    assert "pareto-kl-" not in md and (tmp_path / "out" / "pareto-acc-org-tiny-model.png").exists()
    assert "KL mean" not in md.split("### Pareto")[0]  # no empty fidelity columns in the table


def test_bad_format_and_empty_stores_are_refused(store, tmp_path):
    with pytest.raises(ValueError, match="format must be one of html, md, not 'pdf'"):
        write_report(store, tmp_path / "out", "pdf")
    with pytest.raises(FileNotFoundError, match="run a sweep first"):
        write_report(tmp_path / "none", tmp_path / "out")
    empty = tmp_path / "empty"
    db = MetricStore(Store(empty).metrics_db)
    db.start_run("run-1", "tiny", "sweeps/tiny.yaml", "d1", "host", {}, [])
    record(db, "run-1", MODEL, "q4", "smoke", "smoke-q4", [{"task": "smoke", "metric": "generation_tokens_per_s", "value": 1.0}])
    with pytest.raises(ValueError, match="no benchmark or quantize metrics"):
        write_report(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# A third run on the same store: the old cells found cached, q6 and q7 new (q6 beats bf16 and q8 on both axes by
# more than their intervals; q7 a little below q6 at more bits, well within its interval), q2 with a broken
# perplexity, held back by its gates, and q3 failing at its benchmark with a local path in the error.
NEW = {"q6": (6.5, {"arc_easy": 0.70, "boolq": 0.74}, 0.005), "q7": (7.0, {"arc_easy": 0.70, "boolq": 0.73}, 0.02),
       "q2": (2.5, {"arc_easy": 0.30, "boolq": 0.40}, 0.02)}
BROKEN_PPL = 1e8
HUB_REPO = "org/tiny-q8-mlx"


def receipt(folder, card, **fields):
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(f"# card {card}\n")
    (folder / ".qsweep-publish.json").write_text(json.dumps({"card": card, **fields}))


@pytest.fixture(scope="module")
def troubled(tmp_path_factory):
    root = make_store(tmp_path_factory.mktemp("troubled"))
    db = HeldStore(Store(root).metrics_db)
    db.start_run("run-3", "tiny", "sweeps/tiny.yaml", "d1", "host", {"mlx": "0.0.1"}, [])
    for recipe, bits in BITS.items():
        add_cell(db, "run-3", recipe, bits, Q4_RUN2 if recipe == "q4" else ACC[recipe], KL[recipe], 10 + 100 * KL[recipe],
                 cached=True, bench_key="bench-q4-b" if recipe == "q4" else None)
    for recipe, (bits, acc, stderr) in NEW.items():
        add_cell(db, "run-3", recipe, bits, acc, 12.0 if recipe == "q2" else 0.01,
                 BROKEN_PPL if recipe == "q2" else 10.5, stderr=stderr)
    db.record_stage("run-3", MODEL, "q3", "benchmark", None, "failed", False, 0.1,
                    f"OSError: cannot read {root}/artifacts/quantize/abc/weights.safetensors: truncated\nTraceback (...)")
    for recipe in ("bf16", "q8", "q2", "q6"):
        db.record_stage("run-3", MODEL, recipe, "publish", f"card-{recipe}", "done", False, 0.1)
    db.record_gates(MODEL, "q2", "card-q2", [
        {"gate": "smoke", "requirement": "ok", "measured": "ok", "value": None, "passed": True},
        {"gate": "max_ppl_ratio", "requirement": "at most 1.5", "measured": "1e+07", "value": 1e7, "passed": False}])
    db.finish_run("run-3", "failed")
    db.con.close()
    receipt(root / "published" / "tiny-bf16-mlx", "card-bf16", exported_to=str(root / "published" / "tiny-bf16-mlx"),
            uploaded=None)
    receipt(root / "published" / "tiny-q8-mlx", "card-q8", exported_to=str(root / "published" / "tiny-q8-mlx"),
            uploaded={"repo": HUB_REPO, "commit": None})
    receipt(root / "gated" / "tiny-q2-mlx", "card-q2", exported_to=None, uploaded=None,
            held_at=str(root / "gated" / "tiny-q2-mlx"))
    (root / "artifacts" / "publish" / "card-q6").mkdir(parents=True)  # exported outside the store: the card artifact
    (root / "artifacts" / "publish" / "card-q6" / "README.md").write_text("# card q6\n")
    return root


@pytest.fixture(scope="module")
def troubled_html(troubled):
    write_report(troubled, troubled / "report", "html")  # the default place: under the store
    return (troubled / "report" / "report.html").read_text()


def table_rows(page: str) -> dict[str, list[str]]:
    """recipe -> its table cells as a reader sees them (tags dropped), with the header as '' ."""
    table = page[page.index("<table>"):page.index("</table>")]
    rows = [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r) for r in re.findall(r"<tr>(.*?)</tr>", table)]
    return {("" if i == 0 else re.sub("<.*?>", "", r[0])): [html.unescape(re.sub("<.*?>", "", c)) for c in r]
            for i, r in enumerate(rows)}


def test_gated_and_failed_cells_are_listed_with_what_failed(troubled_html):
    section = troubled_html.split("Failed and held-back cells")[1].split("</ul>")[0]
    items = {re.sub("<.*?>", "", i).split(":")[0]: html.unescape(re.sub("<.*?>", "", i))
             for i in re.findall(r"<li>(.*?)</li>", section)}
    assert set(items) == {"q2", "q3"}
    assert "held back by its quality gates" in items["q2"] and "max_ppl_ratio: 1e+07 (required: at most 1.5)" in items["q2"]
    assert "smoke" not in items["q2"]  # a gate it passed is not named
    assert "failed in the latest run at benchmark: OSError: cannot read" in items["q3"] and "truncated" in items["q3"]
    assert "Traceback" not in items["q3"]  # the first line of the error only
    rows = table_rows(troubled_html)
    assert rows["q2"][rows[""].index("quality gates")].startswith("failed: max_ppl_ratio")
    assert rows["q8"][rows[""].index("quality gates")] == "passed"


def test_cards_are_linked_relative_to_the_report_or_on_the_hub(troubled, troubled_html, tmp_path):
    from storage.settings import settings

    links = dict((html.unescape(re.sub("<.*?>", "", text)), href)
                 for href, text in re.findall(r'<a href="([^"]*)">(.*?)</a>', troubled_html))
    rows = table_rows(troubled_html)
    card = lambda recipe: rows[recipe][rows[""].index("card")]
    assert links[card("q8")] == f"{settings().hub_endpoint}/{HUB_REPO}"  # uploaded: its hub page
    local = {r: re.search(rf"<tr><td>{r}</td>.*?<a href=\"([^\"]*)\"", troubled_html).group(1) for r in ("bf16", "q2", "q6")}
    for recipe, href in local.items():
        assert not href.startswith("/") and (troubled / "report" / href).resolve().read_text().startswith("# card")
    assert (troubled / "report" / local["q2"]).resolve().parent.parent.name == "gated"
    assert card("q4") == ""  # never published: no card
    # written outside the store, the page can link only the hub: a relative link would name the store's path
    write_report(troubled, tmp_path / "elsewhere", "md")
    md = (tmp_path / "elsewhere" / "report.md").read_text()
    assert re.findall(r"\]\(([^)]+)\)", md.split("### Pareto")[0]) == [f"{settings().hub_endpoint}/{HUB_REPO}"]
    assert "card (held back)" in md


def test_the_page_names_no_local_path(troubled, troubled_html, tmp_path):
    write_report(troubled, tmp_path / "md", "md")
    for page in (troubled_html, (tmp_path / "md" / "report.md").read_text()):
        text = re.sub(r'src="data:[^"]*"', "", page)
        assert str(troubled) not in text and str(tmp_path) not in text
        assert not re.findall(r'(?<![\w.:/])/(?:[\w.-]+/)+', text), "an absolute path"
        assert "…/weights.safetensors" in text  # what the error was about stays readable
        assert re.search(rf"Store {troubled.name} as of [\d-]+ [\d:]+: 3 runs", text)


def test_accuracy_frontier_calls_dominated_only_what_its_interval_clears(troubled_html):
    xs, ys = [16.0, 8.0, 6.0, 4.0], [0.70, 0.69, 0.71, 0.50]
    status = frontier_status(xs, ys, [0.005, 0.05, 0.01, None], higher_is_better=True)
    assert status == [("dominated", 2), ("within noise", 2), ("frontier", None), ("frontier", None)]
    assert frontier_status(xs, ys, [None] * 4, True)[1] == ("dominated", 2)  # no interval: as before
    rows = table_rows(troubled_html)
    column = rows[""].index("accuracy frontier")
    assert {r: rows[r][column] for r in ("bf16", "q8", "q7", "q6", "q4", "q2")} == {
        "bf16": "dominated by q6", "q8": "dominated by q6", "q7": "within noise of q6", "q6": "on the frontier",
        "q4": "on the frontier", "q2": "on the frontier"}
    fig = frontier_figure("t", ["a", "b", "c", "d"], xs, ys, "acc", True, halves=[0.005, 0.05, 0.01, None])
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "dominated: interval below the frontier", "within noise of the frontier", "Pareto frontier", "95% interval"]
    (bars,) = ax.containers
    assert len(bars.lines[2][0].get_segments()) == 3  # a bar for each point with an interval


def test_numbers_do_not_wrap_in_the_html_table(troubled_html):
    assert re.search(r"td\.num[^{]*\{[^}]*white-space:\s*nowrap", troubled_html)
    table = troubled_html[troubled_html.index("<table>"):troubled_html.index("</table>")]
    numbers = re.findall(r"<td([^>]*)>([-\d.e+]+(?: ±[\d.]+)?|[\d.]+ [kMG]?B)</td>", table)
    assert len(numbers) > 30 and all(attrs == ' class="num"' for attrs, _ in numbers)


def test_history_plot_has_one_point_per_computed_artifact_and_clips_the_outlier(troubled):
    import io

    db = MetricStore(Store(troubled).metrics_db)
    panels = load_history(db)[MODEL]
    fig = history_figure(MODEL, panels)
    fig.savefig(io.BytesIO(), format="png")  # draws: tick labels exist from here on
    axes = {ax.get_title().split(" (")[0]: ax for ax in fig.axes if ax.get_visible()}
    _, made = db.query("SELECT recipe, count(DISTINCT key) FROM stages WHERE stage = 'benchmark' AND status = 'done' "
                       "GROUP BY recipe")
    drawn = {r: sum(len(line.get_xdata()) for line in axes["acc arc_easy"].lines if line.get_label() == r) for r, _ in made}
    assert drawn == dict(made) and sum(drawn.values()) == len(BITS) + len(NEW) + 1  # q4's two benchmarks
    ppl = axes["perplexity"]
    assert ppl.get_yscale() == "linear" and ppl.get_ylim()[1] < 100  # the other cells readable near 10
    assert [t.get_text() for t in ppl.texts] == [f"{BROKEN_PPL:.2g}"]  # the clipped one, with its value
    assert axes["KL mean"].get_yscale() == "log"  # values that span decades on their own stay on a log axis
    for ax in axes.values():
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert 2 <= len(labels) <= 5
        dated = [text for text in labels + [ax.xaxis.get_offset_text().get_text()] if re.search(r"\d{4}", text)]
        assert len(dated) <= 1  # the date once per axis


def test_two_models_are_also_shown_side_by_side_on_the_tasks_both_measured_the_same_way(tmp_path):
    """A second model, measured on the same questions for one task and on other ones for another: the report adds
    one plot of both models' recipes against size on disk, over the shared task only; one model alone gets none."""
    root = make_store(tmp_path / "store")
    db = HeldStore(Store(root).metrics_db)
    db.start_run("run-3", "two", "sweeps/two.yaml", "d3", "host", {}, [])
    for recipe, bits, acc in (("bf16", 16.0, 0.70), ("q4", 4.5, 0.61)):
        record(db, "run-3", "other", recipe, "quantize", f"other-quant-{recipe}",
               [{"task": "model", "metric": "bits_per_weight", "value": bits},
                {"task": "model", "metric": "disk_bytes", "value": bits * 3e8}])
        record(db, "run-3", "other", recipe, "benchmark", f"other-bench-{recipe}",
               [{"task": "arc_easy", "metric": "acc", "value": acc, "stderr": 0.02, "n": 100},
                {"task": "boolq", "metric": "acc", "value": acc, "stderr": 0.02, "n": 50}])  # 50, not 100: not shared
    db.finish_run("run-3", "completed")
    db.con.close()
    write_report(root, tmp_path / "md", "md")
    page = (tmp_path / "md" / "report.md").read_text()
    assert "## Models side by side" in page and "(models.png)" in page
    assert "over the 1 task all of them measured on the same questions (arc_easy; 100 each" in page
    assert (tmp_path / "md" / "models.png").read_bytes().startswith(PNG)

    write_report(make_store(tmp_path / "one"), tmp_path / "one-md", "md")
    assert "side by side" not in (tmp_path / "one-md" / "report.md").read_text()
