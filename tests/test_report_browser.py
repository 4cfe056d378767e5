"""The report opened in a real browser (tests/browser.py), as a reader opens it after a sweep:
every plot drawn, a table row per cell, links that lead somewhere, no error on the page."""

import re
import shutil

import pytest

from browser import check_report, chromium
from conftest import MEASURED_RECIPES
from test_report import BITS, MODEL, NEW, troubled  # noqa: F401  (a fixture: a store with cards, gates and a failure)


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser):
    p = browser.new_page()
    yield p
    p.close()


@pytest.fixture(scope="module")
def report(measured, tmp_path_factory):
    """`qsweep report` on a copy of the measured store (tiny through bf16, q4, qx86-hi by the real cell flow)."""
    from flows.cli import main

    root = shutil.copytree(measured[0].root, tmp_path_factory.mktemp("browsed") / "store")
    assert main(["--store", str(root), "report"]) == 0
    return root / "report" / "report.html"


def test_the_report_of_a_measured_store_shows_every_cell_and_plot(report, page, tmp_path):
    check_report(page, report, [f"tiny/{r}" for r in MEASURED_RECIPES], shots=tmp_path)


def test_cards_gated_and_failed_cells_and_a_model_named_with_a_slash(troubled, page, tmp_path):
    # the cards' links (in the store, and one on the hub) and the failed cell's line, which has no row
    from tasks.report import write_report

    write_report(troubled, troubled / "report", "html")  # under the store: links to its cards
    check_report(page, troubled / "report" / "report.html", [f"{MODEL}/{r}" for r in [*BITS, *NEW]], shots=tmp_path)
    assert page.get_by_text("q3: failed in the latest run at benchmark").is_visible()
    cards = page.locator("table a")
    assert cards.count() == 4 and page.get_by_role("link", name="hub: org/tiny-q8-mlx").is_visible()


@pytest.mark.parametrize("damage, said", [
    (lambda h: re.sub(r"base64,[A-Za-z0-9+/]{200}", "base64,AAAA", h, count=1), r"1 of \d images not drawn: '.*frontier"),
    (lambda h: re.sub(r"<tr><td>q4</td>.*?</tr>", "", h), r"missing \['tiny/q4'\], not asked for \[\], twice \[\]"),
    (lambda h: h.replace("</body>", '<a href="gone/README.md">card</a></body>'), r"links to files that do not exist"),
    (lambda h: h.replace("</body>", "<script>null.x</script></body>"), r"page error: TypeError: Cannot read properties of null"),
    (lambda h: h.replace("</body>", '<img src="missing.png"></body>'), r"request failed: GET file://.*missing\.png"),
], ids=["broken-plot", "missing-row", "dead-link", "script-error", "missing-file"])
def test_a_damaged_report_is_caught_with_a_screenshot(report, page, tmp_path, damage, said):
    damaged = tmp_path / "report.html"
    damaged.write_text(damage(report.read_text()))
    with pytest.raises(AssertionError, match=said) as caught:
        check_report(page, damaged, [f"tiny/{r}" for r in MEASURED_RECIPES], shots=tmp_path / "shots")
    assert "screenshot: " + str(tmp_path / "shots") in str(caught.value) and "visible text" in str(caught.value)
    assert list((tmp_path / "shots").glob("*.png"))
