"""The pages qsweep makes or points to, opened in a real browser: Debian's headless Chromium
(/usr/bin/chromium, `make system`) driven by Playwright, which never downloads a browser of its own.
Checks wait for the content they look for, never for a fixed time; a failed one says what it saw,
with a screenshot and the page's visible text."""

import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# Loopback only here: nothing that phones home, updates itself or waits for a first-run dialog.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions"]
WAIT_MS = 60_000  # for content to appear: the Prefect UI draws from several API calls, slow under load


def missing(what: str):
    """A system dependency is missing: under CI a failure, elsewhere a skip that says what to install."""
    (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(f"{what} (`make system` installs it)")


@contextmanager
def chromium():
    """A headless Chromium browser for the duration of the block."""
    if not CHROMIUM.exists():
        missing(f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


class Watch:
    """What went wrong while a page was open: console errors, uncaught exceptions, requests that failed
    or were answered with an error status. `only`: a pattern the request's URL must match to count;
    `busy`: statuses noted but not counted (Prefect's server answers 503 while its database is busy)."""

    def __init__(self, page, only: str = "", busy: tuple = ()):
        self.page, self.errors, self.notes = page, [], []
        keep = lambda url: re.search(only, url)
        page.on("console", lambda m: m.type == "error" and keep(m.location.get("url", "")) and
                self.errors.append(f"console error: {m.text} ({m.location.get('url')})"))
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e.name}: {e.message}"))
        page.on("requestfailed", lambda r: keep(r.url) and "ERR_ABORTED" not in (r.failure or "") and
                self.errors.append(f"request failed: {r.method} {r.url[:200]}: {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and keep(r.url) and (self.notes if r.status in busy else
                self.errors).append(f"HTTP {r.status}: {r.request.method} {r.url[:200]}"))

    def fail(self, what: str, shots: Path):
        """An AssertionError that says `what`, where the page was, its errors, a screenshot and its text."""
        shots.mkdir(parents=True, exist_ok=True)
        shot = shots / f"{len(list(shots.glob('*.png'))):02d}-{re.sub(r'[^A-Za-z0-9]+', '-', what)[:60]}.png"
        try:
            self.page.screenshot(path=str(shot), full_page=True)
            text = self.page.inner_text("body", timeout=5000)
        except Exception as e:  # the page itself is gone: say so instead
            shot, text = f"(no screenshot: {e})", ""
        text = re.sub(r"\n\s*\n+", "\n", text).strip()
        errors = "".join(f"\n  {e}" for e in self.errors) or " none"
        errors += "".join(f"\n  (not counted) {e}" for e in self.notes)
        raise AssertionError(f"{what}\nurl: {self.page.url}\nscreenshot: {shot}\nerrors seen:{errors}\n"
                             f"visible text (first 2000 characters):\n{text[:2000]}")


def as_url(url_or_path) -> str:
    s = str(url_or_path)
    return s if re.match(r"(https?|file)://", s) else Path(s).resolve().as_uri()


def check_report(page, url_or_path, cells: list[str], shots: Path | None = None) -> None:
    """The qsweep report page as a reader sees it: every plot drawn (decoded, nonzero size), one table
    row per cell ("model/recipe": the row whose first column is the recipe, in the table under the
    model's heading) and no other, every link to a local file pointing at one that exists, and no
    console error, script error or failed request."""
    shots = Path(shots or tempfile.mkdtemp(prefix="qsweep-report-shots-"))
    watch = Watch(page)
    page.goto(as_url(url_or_path), wait_until="load")
    images = page.evaluate("""() => Promise.all([...document.images].map(i => i.decode().then(() => null, e => String(e))
        .then(err => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight, err}))))""")
    if not images:
        watch.fail("the report has no images", shots)
    broken = [i for i in images if not (i["w"] > 0 and i["h"] > 0) or i["err"]]
    if broken:
        watch.fail(f"{len(broken)} of {len(images)} images not drawn: " +
                   "; ".join(f"{i['alt']!r} ({i['w']}x{i['h']}, {i['err']})" for i in broken), shots)
    # each model's heading, then the first column of the rows of the tables up to the next heading
    rows = page.evaluate("""() => {
        const out = [];
        let model = null;
        for (const el of document.body.querySelectorAll('h2, table')) {
            if (el.tagName === 'H2') { model = el.innerText.trim(); continue; }
            for (const tr of el.querySelectorAll('tr')) {
                const td = tr.querySelector('td');
                if (td && tr.checkVisibility()) out.push(model + '/' + td.innerText.trim());
            }
        }
        return out;
    }""")
    if sorted(rows) != sorted(cells):
        extra, lacking = sorted(set(rows) - set(cells)), sorted(set(cells) - set(rows))
        twice = sorted({r for r in rows if rows.count(r) > 1})
        watch.fail(f"table rows are not one per cell: missing {lacking}, not asked for {extra}, twice {twice}", shots)
    links = page.evaluate("() => [...document.links].map(a => a.href)")
    dead = [h for h in links if h.startswith("file://") and not Path(unquote(urlparse(h).path)).exists()]
    if dead:
        watch.fail(f"links to files that do not exist: {dead}", shots)
    if watch.errors:
        watch.fail(f"{len(watch.errors)} errors while loading the report", shots)


def check_prefect_ui(page, ui_url: str, sweep_run_name: str, cell_run_names: list[str], cached_task_names: list[str],
                     flow_run_id: str | None = None, shots: Path | None = None) -> dict[str, list[str]]:
    """The Prefect UI (`prefect server start`, at `ui_url`) as someone watching a sweep uses it: the sweep's
    flow run in the runs list (`flow_run_id`, else the newest run of that name: the list puts it first);
    opened, its Subflow Runs tab lists every cell's flow run; each cell's Task Runs tab (and the sweep's own)
    shows every task in `cached_task_names` as "Cached". No call to the API fails meanwhile (a UI started
    without PREFECT_API_URL or PREFECT_UI_API_URL calls port 4200). Returns {task name: states seen}."""
    shots = Path(shots or tempfile.mkdtemp(prefix="qsweep-ui-shots-"))
    from playwright.sync_api import TimeoutError

    watch = Watch(page, only=r"/api/", busy=(503,))
    ui = ui_url.rstrip("/")

    def shown(locator, what: str):
        """The locator once visible; a failure as soon as the API has failed (the page will not fill in)."""
        start = time.monotonic()
        while True:
            try:
                return locator.wait_for(state="visible", timeout=1000) or locator
            except TimeoutError:
                waited = time.monotonic() - start
                if watch.errors or waited > WAIT_MS / 1000:
                    watch.fail(f"not shown after {waited:.0f} s: {what}", shots)

    def link(name: str, href: str = ""):
        return page.locator(f"a[href*='/runs/flow-run/{href}']", has_text=re.compile(rf"^\s*{re.escape(name)}\s*$"))

    def open_tab(name: str):
        shown(page.locator("li.p-tab", has_text=re.compile(rf"^{name}$")), f"the {name} tab").click()
        return page.locator(f"#{name.lower().replace(' ', '-')}-content")

    def task_states(flow_run: str) -> list[tuple[str, str]]:
        panel = open_tab("Task Runs")
        shown(panel.locator(".state-list-item").first, f"the task runs of {flow_run}")
        return panel.evaluate("""p => [...p.querySelectorAll('.state-list-item')].map(i => [
            i.querySelector('.state-list-item__name a')?.innerText.trim(),
            i.querySelector('.state-badge')?.innerText.trim()])""")

    page.goto(ui + "/runs")
    sweep = shown(link(sweep_run_name, flow_run_id or "").first, f"flow run {sweep_run_name!r} in the runs list")
    href = sweep.get_attribute("href")
    sweep_id = href.rstrip("/").rsplit("/", 1)[-1]
    # the link the list shows, followed as the cells' are below: a click can land while the list refreshes
    # (it polls) and navigate nowhere (seen once in CI: no navigation in 30 s)
    page.goto(ui + href)
    page.wait_for_url(f"**/runs/flow-run/{sweep_id}**")
    seen = task_states(sweep_run_name)
    open_tab("Subflow Runs")
    cells = {name: shown(link(name).first, f"cell flow run {name!r} in the Subflow Runs tab of {sweep_run_name!r}")
             .get_attribute("href") for name in cell_run_names}
    for name, href in cells.items():
        page.goto(ui + href)
        shown(page.get_by_text(sweep_run_name, exact=True).first, f"{name!r}'s parent run {sweep_run_name!r}")
        seen += task_states(name)
    states = {}
    for task, state in seen:
        states.setdefault(task, []).append(state)
    wrong = {t: states.get(t, "not shown") for t in cached_task_names if set(states.get(t, [])) != {"Cached"}}
    if wrong:
        unseen = [t for t, s in wrong.items() if s == "not shown"]
        watch.fail(f"task runs not all Cached: {wrong}" + (f"; the task runs shown: {sorted(states)}" if unseen else ""),
                   shots)
    if watch.errors:
        watch.fail(f"{len(watch.errors)} errors from the API while using the UI", shots)
    return states
