"""The report: what a user opens after a sweep, built from a two-run history written by MetricStore itself."""

import base64
import re
from contextlib import contextmanager

import duckdb
import pytest

from storage.artifacts import Store
from storage.metrics import SCHEMA, MetricStore
from tasks.report import load_history, pareto_front, slugify, write_report

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


def record(db, run, model, recipe, stage, key, rows):
    db.record_stage(run, model, recipe, stage, key, "done", False, 0.1)
    db.record_metrics(run, model, recipe, stage, key, rows)


def make_store(root, fidelity=True):
    db = HeldStore(Store(root).metrics_db)
    for run in ("run-1", "run-2"):
        db.start_run(run, "tiny", "sweeps/tiny.yaml", "d1", "host", {"mlx": "0.0.1", "mlx-lm": "0.0.2"}, [])
        for recipe, bits in BITS.items():
            record(db, run, MODEL, recipe, "quantize", f"quant-{recipe}",
                   [{"task": "model", "metric": "bits_per_weight", "value": bits},
                    {"task": "model", "metric": "disk_bytes", "value": bits * 1e8}])
            acc, key = (Q4_RUN2, "bench-q4-b") if (run, recipe) == ("run-2", "q4") else (ACC[recipe], f"bench-{recipe}")
            record(db, run, MODEL, recipe, "benchmark", key,
                   [{"task": t, "metric": m, "value": v, "stderr": 0.02, "n": 100}
                    for t, v in acc.items() for m in ("acc", "acc_norm")])
            if fidelity:
                record(db, run, MODEL, recipe, "fidelity", f"fid-{recipe}",
                       [{"task": "fidelity", "metric": "kl_mean", "value": KL[recipe]},
                        {"task": "fidelity", "metric": "ppl", "value": 10 + 100 * KL[recipe]}])
            record(db, run, MODEL, recipe, "smoke", f"smoke-{recipe}",
                   [{"task": "smoke", "metric": "generation_tokens_per_s", "value": 200 / bits}])
        db.finish_run(run, "completed")
    db.con.close()
    return root


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
        cells = re.findall(r"<td>(.*?)</td>", row)
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


def test_history_has_a_point_per_run_with_that_runs_value(store):
    db = MetricStore(Store(store).metrics_db)
    panels = load_history(db)[MODEL]
    assert list(panels) == ["mean acc", "acc arc_easy", "acc boolq", "KL mean", "perplexity", "generation tokens/s"]
    assert [v for _, v in panels["acc arc_easy"]["q4"]] == [ACC["q4"]["arc_easy"], Q4_RUN2["arc_easy"]]
    assert [v for _, v in panels["acc arc_easy"]["q8"]] == [ACC["q8"]["arc_easy"]] * 2  # cached in run 2
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
