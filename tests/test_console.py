"""flows/console.py: what the user reads while a sweep runs, fed the events the flows emit."""

import io

from flows import progress
from flows.console import View


def feed(view, *events):
    for kind, cell, stage, info in events:
        view(progress.Event(kind, cell, stage, **info))


def test_plain_lines_one_per_computed_stage_and_one_per_cell():
    out = io.StringIO()
    view = View(out, live=False, history={("tiny", "benchmark"): 30.0})
    stages = "download,quantize,benchmark,publish"
    feed(view,
         ("planned", "tiny/q4", "", {"detail": stages, "stored": ("download",)}),
         ("planned", "tiny/q8", "", {"detail": stages, "stored": ("download",)}),
         ("started", "tiny/q4", "download", {}),
         ("finished", "tiny/q4", "download", {"cached": True, "seconds": 0.1}),
         ("finished", "tiny/q4", "quantize", {"cached": False, "seconds": 4.0}),
         ("failed", "tiny/q4", "benchmark", {"seconds": 1.0, "detail": "ValueError: no room"}),
         ("cell_failed", "tiny/q4", "", {"detail": "benchmark failed"}),
         ("finished", "tiny/q8", "download", {"cached": True, "seconds": 0.1}))
    lines = out.getvalue().splitlines()
    # left: q4's benchmark (30 s, history), q8's quantize (4 s, this run) and benchmark (30 s)
    assert lines[0] == "tiny/q4: quantize done in 4.0 s; ETA 1 min"
    assert lines[1] == "tiny/q4: benchmark FAILED: ValueError: no room"
    assert lines[2].startswith("cell 1/2 tiny/q4 failed")
    assert len(lines) == 3  # cached stages print nothing of their own


def test_no_eta_until_every_stage_left_has_been_timed():
    view = View(io.StringIO(), live=False, history={})
    feed(view, ("planned", "m/r", "", {"detail": "quantize,smoke", "stored": ()}))
    assert view.eta() is None
    feed(view, ("finished", "m/r", "quantize", {"cached": False, "seconds": 2.0}))
    assert view.eta() is None  # smoke never ran: no honest guess
    feed(view, ("planned", "m/s", "", {"detail": "quantize", "stored": ()}))
    assert view.eta() is None


def test_the_live_table_shows_every_cell_and_stage():
    from rich.console import Console

    view = View(io.StringIO(), live=True, history={})
    feed(view, ("planned", "m/r", "", {"detail": "quantize,smoke", "stored": ()}),
         ("started", "m/r", "quantize", {}))
    shown = io.StringIO()
    Console(file=shown, width=100, color_system=None).print(view.table())
    text = shown.getvalue()
    assert "0/1 cells" in text and "m/r" in text and "quantize" in text and "…" in text
