"""What `qsweep run` (and `qsweep quantize`) show while a sweep runs, and where everything else goes.

The console shows qsweep's own progress only. Everything the libraries say (Prefect's state
lines, lm-eval's warnings, tqdm bars, mlx-lm's prints, the temporary server) goes to a log
file per run, <store>/logs/<time>-<sweep>.log: for the whole run, the process's stdout and
stderr file descriptors point at it (set once here, not swapped around library calls, so no
thread waits for another and nothing is lost), while the view writes to the terminal it was
given. `-v` leaves the descriptors alone and shows it all live; a failed run prints the log's path.

On a terminal the view is a live table (rich) of cells x stages, the stage running, elapsed
time and an ETA; elsewhere (CI, a worker, a pipe) it is plain lines: one per stage computed or
failed, one per cell finished (its cached stages counted), so a fully cached rerun stays short.
The ETA sums, over the stages still to run, the median time that stage took when it was last
computed for the same model (DuckDB's `stages`), else its mean in this run so far; stages the
store already holds count as free.
"""

import contextlib
import os
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from flows import progress

SYMBOLS = {"pending": "·", "running": "…", "done": "done", "cached": "cached", "failed": "FAILED"}


@dataclass
class Cell:
    name: str
    stages: list[str]
    stored: set = field(default_factory=set)
    state: dict = field(default_factory=dict)  # stage -> pending | running | done | cached | failed
    finished: bool = False
    failed: str = ""
    gated: str = ""


class View:
    """The sweep's state as events arrive, and its two renderings (live table, plain lines)."""

    def __init__(self, out, live: bool, history: dict[tuple[str, str], float]):
        self.out, self.live, self.history = out, live, history
        self.cells: dict[str, Cell] = {}
        self.started, self.lock = time.time(), threading.Lock()
        self.took: dict[str, list[float]] = defaultdict(list)  # stage -> seconds computed in this run
        self.report = ""

    # ---- events (any thread)
    def __call__(self, e: progress.Event) -> None:
        with self.lock:
            line = self._apply(e)
        if line and not self.live:
            print(line, file=self.out, flush=True)

    def _apply(self, e: progress.Event) -> str | None:
        if e.kind == "planned":
            stages = e.detail.split(",")
            self.cells[e.cell] = Cell(e.cell, stages, set(e.stored), {s: "pending" for s in stages})
            return None
        if e.kind == "report":
            self.report = e.detail
            return None
        c = self.cells.get(e.cell)
        if c is None:
            return None
        if e.kind == "started":
            c.state[e.stage] = "running"
        elif e.kind == "finished":
            c.state[e.stage] = "cached" if e.cached else "done"
            if not e.cached:
                self.took[e.stage].append(e.seconds)
                return f"{c.name}: {e.stage} done in {_duration(e.seconds)}{self._eta_text()}"
        elif e.kind == "failed":
            c.state[e.stage] = "failed"
            c.failed = f"{e.stage}: {e.detail}"
            return f"{c.name}: {e.stage} FAILED: {e.detail}"
        elif e.kind in ("cell_done", "cell_failed"):
            c.finished = True
            if e.kind == "cell_failed" and not c.failed:
                c.failed = e.detail
            measured = [s for s in c.stages if s != "publish"]
            cached = sum(c.state.get(s) == "cached" for s in measured)
            done = sum(1 for c2 in self.cells.values() if c2.finished)
            how = "failed" if e.kind == "cell_failed" else f"measured ({cached} of {len(measured)} stages cached)"
            return f"cell {done}/{len(self.cells)} {c.name} {how}{self._eta_text()}"
        elif e.kind == "cell_retry":
            return f"{c.name}: its run crashed ({e.detail}); running the cell again"
        elif e.kind == "published":
            c.gated = e.detail
            return f"{c.name}: held back by its quality gates ({e.detail})" if e.detail else None
        return None

    # ---- time left
    def eta(self) -> float | None:
        left = 0.0
        for c in self.cells.values():
            model = c.name.split("/")[0]
            for s in c.stages:
                if c.state.get(s) in ("done", "cached", "failed") or s in c.stored or c.failed or s == "publish":
                    continue  # publishing writes a card: well under a second, left out
                guess = self.history.get((model, s))
                if guess is None and self.took[s]:
                    guess = sum(self.took[s]) / len(self.took[s])
                if guess is None:
                    return None  # a stage never timed: no honest ETA yet
                left += guess
        return left

    def _eta_text(self) -> str:
        eta = self.eta()
        return f"; ETA {_duration(eta)}" if eta else ""

    # ---- the live table
    def table(self):
        from rich.table import Table
        from rich.text import Text

        stages = list(dict.fromkeys(s for c in self.cells.values() for s in c.stages))
        eta = self.eta()
        title = f"{len([c for c in self.cells.values() if c.finished])}/{len(self.cells)} cells · " \
                f"{_duration(time.time() - self.started)} elapsed" + (f" · ETA {_duration(eta)}" if eta else "")
        t = Table(title=Text(title), title_justify="left", box=None, pad_edge=False, padding=(0, 1, 0, 0))
        t.add_column("cell")
        for s in stages:
            t.add_column(s)
        for c in self.cells.values():
            t.add_row(c.name, *(SYMBOLS[c.state.get(s, "pending")] for s in stages))
        return t


def run_sweep(sweep_file: Path | str, store: Path | str, verbose: bool = False, cell_deployment: str | None = None) -> int:
    """Run the (already validated) sweep file on the store; 0 when every cell finished, else 1.
    `cell_deployment` sends the cells to that deployment's workers."""
    from flows.server import ServerDidNotStart
    from tasks.loading import describe_device, gpu_build_without_gpu

    store = Path(store).resolve()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # its heartbeat's traceback, at start
    log_path = store / "logs" / f"{datetime.now():%Y%m%d-%H%M%S}-{Path(sweep_file).stem}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    terminal = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    live = terminal.isatty() and not verbose
    view = View(terminal, live, stage_history(store))
    stop = progress.listen(view)
    saved = _to_log(log_path) if not verbose else None
    where = f"on the workers of {cell_deployment}" if cell_deployment else f"on {describe_device()}"
    print(f"qsweep: running {sweep_file} {where}; " + ("library output shown as it comes (-v)" if verbose else
          f"library output goes to {_short(log_path)} (-v shows it here)"), file=terminal, flush=True)
    if not cell_deployment and (note := gpu_build_without_gpu()):
        print(f"qsweep: {note}", file=terminal, flush=True)
    try:
        ok = _run(sweep_file, store, view, terminal, cell_deployment)
    except ServerDidNotStart as e:  # no run began: nothing to sum up, and no status table of an earlier run after it
        print(f"qsweep: error: {e}", file=terminal)
        raise SystemExit(1) from None
    finally:
        stop()
        if saved is not None:
            _restore(saved)
    summary(view, store, ok, log_path, terminal)
    terminal.close()
    return 0 if ok else 1


def _run(sweep_file, store: Path, view: View, terminal, cell_deployment: str | None) -> bool:
    from flows.server import start_temporary_server
    from flows.sweep import sweep

    start_temporary_server()  # from this thread, so that it dies with the process (flows/server.py)

    def run() -> bool:
        return sweep(sweep_file=str(sweep_file), store=str(store), cell_deployment=cell_deployment,
                     return_state=True).is_completed()

    if not view.live:
        with _without_heartbeats_when_temporary():
            return run()
    from rich.console import Console
    from rich.live import Live

    with Live(view.table(), console=Console(file=terminal), refresh_per_second=2, transient=True) as shown, \
            _without_heartbeats_when_temporary():
        done = threading.Event()

        def refresh():
            while not done.wait(0.5):
                shown.update(view.table())
        painter = threading.Thread(target=refresh, daemon=True)
        painter.start()
        try:
            return run()
        finally:
            done.set()
            shown.update(view.table())


def _without_heartbeats_when_temporary():
    """Flow-run heartbeats off when the sweep runs on Prefect's temporary server: they let a server notice a
    crashed run, and that server ends with this process. Each flow run's end waits up to 1 s for its heartbeat
    thread to wake (prefect/flow_engine.py `_send_heartbeats`): ~0.5 s per cached cell."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    if get_current_settings().api.url is not None:
        return contextlib.nullcontext()
    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def summary(view: View, store: Path, ok: bool, log_path: Path, out) -> None:
    """The closing block: counts, and where things are. (`qsweep run` prints the final table after it:
    the status of the run, with what the store noticed; the live view clears itself for it.)"""
    cells = list(view.cells.values())
    failed = [c for c in cells if c.failed]
    gated = [c for c in cells if c.gated]
    measured = [s for c in cells for s in c.stages if s != "publish"]
    cached = sum(c.state.get(s) == "cached" for c in cells for s in c.stages if s != "publish")
    print(f"\n{len(cells) - len(failed)} of {len(cells)} cells measured "
          f"({cached} of {len(measured)} stages cached), {len(failed)} failed, {len(gated)} held back by their gates; "
          f"{_duration(time.time() - view.started)}", file=out)
    for c in failed:
        print(f"  failed: {c.name}: {c.failed}", file=out)
    for c in gated:
        print(f"  held back: {c.name}: {c.gated}", file=out)
    print(f"cards: {_short(store / 'published')}/*/README.md" + (f", held back: {_short(store / 'gated')}/" if gated else "")
          + (f"; report: {_short(Path(view.report))}" if view.report else "") + f"; store: {_short(store)}", file=out)
    api = os.environ.get("PREFECT_API_URL")
    if api:
        print(f"Prefect UI: {api.removesuffix('/api')}", file=out)
    if not ok and log_path.exists():
        print(f"log: {_short(log_path)}", file=out)


def stage_history(store: Path) -> dict[tuple[str, str], float]:
    """(model, stage) -> median seconds it took when last computed (not cached), from the metric history."""
    from storage.workspace import history

    db = history(store)
    if not db.path.exists():
        return {}
    try:
        _, rows = db.query("SELECT model, stage, median(seconds) FROM (SELECT model, stage, seconds, row_number() OVER "
                           "(PARTITION BY model, stage ORDER BY finished DESC) AS k FROM stages "
                           "WHERE status = 'done' AND NOT cached) WHERE k <= 5 GROUP BY ALL")
    except Exception:  # another run holds the file: no history, the ETA learns from this run
        return {}
    return {(m, s): float(v) for m, s, v in rows}


def _to_log(path: Path) -> tuple[int, int]:
    """Point stdout and stderr (the descriptors, so C code and child processes follow) at the log."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1), os.dup2(fd, 2)
    os.close(fd)
    return saved


def _restore(saved: tuple[int, int]) -> None:
    """Stdout back to the terminal, for what the command prints next. Stderr stays on the log until the
    process ends: Prefect stops its temporary server (and flushes its last log lines) at exit, and
    says so there."""
    sys.stdout.flush()
    os.dup2(saved[0], 1)
    os.close(saved[0])
    os.close(saved[1])


def _short(path: Path) -> str:
    """A path as the user typed it: relative to where qsweep runs when it is under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"
