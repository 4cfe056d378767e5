"""Metric history in DuckDB: sweep runs, stage executions, metric rows.

DuckDB lets one process hold a file read-write, and while it does nobody can
open it, not even read-only. So there is one writer at a time by design: every
access opens a short-lived connection (milliseconds) and retries while another
process holds the file; within a process, threads (cells running at once) take
turns on a lock. `qsweep sql` does the same with read_only=True: a user can
query while a sweep runs, and several workers can write one store. A connection
costs ~25 ms (open, close, checkpoint of a 4.6 MB store), so what belongs
together (a stage's line and its rows) is written in one: `session()`.
"""

import json
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    sweep VARCHAR,
    sweep_file VARCHAR,
    sweep_digest VARCHAR,
    host VARCHAR,
    tools JSON,
    cells JSON,
    started TIMESTAMPTZ,
    finished TIMESTAMPTZ,
    status VARCHAR
);
CREATE TABLE IF NOT EXISTS stages (
    run_id VARCHAR,
    model VARCHAR,
    recipe VARCHAR,
    stage VARCHAR,
    key VARCHAR,
    status VARCHAR,          -- done | failed
    cached BOOLEAN,          -- true when the artifact already existed
    seconds DOUBLE,
    error VARCHAR,
    finished TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS metrics (
    model VARCHAR,
    recipe VARCHAR,
    stage VARCHAR,
    task VARCHAR,
    metric VARCHAR,
    value DOUBLE,
    stderr DOUBLE,
    n BIGINT,
    artifact_key VARCHAR,
    run_id VARCHAR,          -- the run that first recorded the row
    recorded TIMESTAMPTZ,
    PRIMARY KEY (model, recipe, stage, artifact_key, task, metric)
);
-- how a benchmark number was made: compare rows only where these agree
ALTER TABLE metrics ADD COLUMN IF NOT EXISTS backend VARCHAR;   -- native | fp32
ALTER TABLE metrics ADD COLUMN IF NOT EXISTS data VARCHAR;      -- data source and split (and sample)
ALTER TABLE metrics ADD COLUMN IF NOT EXISTS device VARCHAR;    -- where it ran: cpu | gpu, name, mlx build
-- Each quantized artifact's plan as stored: which module got which bits, and why.
CREATE TABLE IF NOT EXISTS recipe_layers (
    model VARCHAR,
    recipe VARCHAR,
    artifact_key VARCHAR,
    path VARCHAR,            -- module path, e.g. model.layers.3.self_attn.v_proj
    layer INTEGER,           -- its layer index; NULL for embeddings and lm_head
    out_features BIGINT,
    in_features BIGINT,
    bits INTEGER,            -- NULL: left in float
    group_size INTEGER,
    mode VARCHAR,            -- affine | mxfp4 | nvfp4 | mxfp8, or the float dtype
    source VARCHAR,          -- default | rule N | model | fallback
    note VARCHAR,
    PRIMARY KEY (artifact_key, path)
);
-- What each module's quantization costs, per sensitivity artifact (tasks/sensitivity.py): one row per format.
CREATE TABLE IF NOT EXISTS sensitivity (
    model VARCHAR,
    recipe VARCHAR,          -- the searched cell that measured it (the artifact is shared by the model's budgets)
    artifact_key VARCHAR,
    path VARCHAR,
    layer INTEGER,
    out_features BIGINT,
    in_features BIGINT,
    format VARCHAR,          -- q4g64, mxfp4, ...
    bits INTEGER,
    group_size INTEGER,
    mode VARCHAR,
    proxy_error DOUBLE,      -- the module's output error on the calibration activations
    predicted_kl DOUBLE,     -- KL gained with this module alone in this format (what the search minimises)
    measured_kl DOUBLE,      -- the same, measured by a forward pass (the probe format, and the checked ones)
    PRIMARY KEY (artifact_key, path, format)
);
-- Every benchmark question's outcome, per benchmark artifact (lm-eval's logged samples).
CREATE TABLE IF NOT EXISTS samples (
    model VARCHAR,
    recipe VARCHAR,
    artifact_key VARCHAR,
    task VARCHAR,
    doc_id BIGINT,
    target INTEGER,          -- the right choice
    chosen INTEGER,          -- the choice with the highest log-likelihood
    correct BOOLEAN,         -- acc
    correct_norm BOOLEAN,    -- acc_norm
    logliks DOUBLE[],        -- each choice's log-likelihood
    PRIMARY KEY (artifact_key, task, doc_id)
);
-- Each recipe against a base recipe of the same model, task by task (written at the end of every sweep
-- and by `qsweep publish`): paired score interval, McNemar's exact test, significant = p_holm < 0.05.
CREATE TABLE IF NOT EXISTS comparisons (
    model VARCHAR, task VARCHAR, base VARCHAR, recipe VARCHAR, n BIGINT,
    base_acc DOUBLE, acc DOUBLE, diff DOUBLE, low DOUBLE, high DOUBLE,
    only_base BIGINT, only_recipe BIGINT, p_value DOUBLE, significant BOOLEAN,
    PRIMARY KEY (model, task, base, recipe)
);
ALTER TABLE comparisons ADD COLUMN IF NOT EXISTS p_holm DOUBLE;  -- Holm-adjusted across the model's comparisons
-- Each card's quality gates (tasks/gates.py): what was required, what was measured, passed or not.
CREATE TABLE IF NOT EXISTS gates (
    model VARCHAR,
    recipe VARCHAR,
    artifact_key VARCHAR,    -- the publish artifact (the card) that states it
    gate VARCHAR,            -- smoke | max_kl_mean | max_ppl_ratio
    requirement VARCHAR,     -- e.g. 'at most 1'
    measured VARCHAR,        -- as the card prints it, e.g. '14.8' or 'not_language'
    value DOUBLE,
    passed BOOLEAN,
    PRIMARY KEY (artifact_key, gate)
);
-- What the store noticed: an artifact whose files no longer matched its manifest (kind 'corrupt').
CREATE TABLE IF NOT EXISTS events (
    happened TIMESTAMPTZ, kind VARCHAR, stage VARCHAR, key VARCHAR, detail VARCHAR, host VARCHAR
);
-- The metrics of each cell's stages as last done: old rows from earlier settings stay in `metrics`.
CREATE OR REPLACE VIEW latest_metrics AS
WITH latest AS (
    SELECT model, recipe, stage, key FROM stages WHERE status = 'done'
    QUALIFY row_number() OVER (PARTITION BY model, recipe, stage ORDER BY finished DESC) = 1
)
SELECT m.* FROM metrics m JOIN latest l USING (model, recipe, stage) WHERE m.artifact_key = l.key;
CREATE OR REPLACE VIEW latest_samples AS
WITH latest AS (
    SELECT model, recipe, key FROM stages WHERE status = 'done' AND stage = 'benchmark'
    QUALIFY row_number() OVER (PARTITION BY model, recipe ORDER BY finished DESC) = 1
)
SELECT s.* FROM samples s JOIN latest l USING (model, recipe) WHERE s.artifact_key = l.key;
CREATE OR REPLACE VIEW latest_gates AS
WITH latest AS (
    SELECT model, recipe, key FROM stages WHERE status = 'done' AND stage = 'publish'
    QUALIFY row_number() OVER (PARTITION BY model, recipe ORDER BY finished DESC) = 1
)
SELECT g.* FROM gates g JOIN latest l USING (model, recipe) WHERE g.artifact_key = l.key;
"""

# One line per table and view, for someone writing SQL against the store: stored as DuckDB comments
# (duckdb_tables() / duckdb_views(), column `comment`) and read by `qsweep sql --help` / `--schema`.
DESCRIPTIONS = {
    "runs": "one row per sweep run or `qsweep publish`: sweep name and file, host, tool versions, planned cells, "
            "started, finished, status",
    "stages": "every stage a run did, per model and recipe: artifact key, status done|failed, cached, seconds, error, "
              "finished",
    "metrics": "every number ever measured (acc, acc_norm, kl_mean, ppl_ratio, bits_per_weight, "
               "generation_tokens_per_s, ...) by model, recipe, stage, task, artifact_key; rows of older settings "
               "stay: latest_metrics has the current ones",
    "recipe_layers": "each quantized artifact's per-module plan: module path, layer, shape, bits, group size, mode, "
                     "and the rule that chose it",
    "sensitivity": "what each module's quantization costs a base model, per format: KL from the base with that "
                   "module alone quantized, predicted and (for probed formats) measured; what `qsweep search` solves on",
    "samples": "each benchmark question's outcome per benchmark artifact: task, doc_id, target, chosen, correct, "
               "correct_norm, each choice's log-likelihood",
    "comparisons": "each recipe against the base recipe of the same model, per task: paired accuracy difference, "
                   "its 95% interval, McNemar p and Holm-adjusted p",
    "gates": "each card's quality gates per publish artifact: requirement, measured value, passed; latest_gates has "
             "the current ones",
    "events": "what the store noticed, e.g. an artifact whose files no longer matched its manifest (kind 'corrupt')",
    "latest_metrics": "the metrics of each cell's stages as last done: the current numbers, one row per model, "
                      "recipe, stage, task, metric",
    "latest_samples": "the per-question outcomes of each cell's latest benchmark",
    "latest_gates": "the quality gates of each cell's latest card: which it passes or fails now",
}
VIEWS = ("latest_metrics", "latest_samples", "latest_gates")
SCHEMA += "".join(f"COMMENT ON {'VIEW' if name in VIEWS else 'TABLE'} {name} IS $${text}$$;\n"
                  for name, text in DESCRIPTIONS.items())


# How every read-only connection opens the store (DuckDB 2.0): read_only=True alone does not stop
# COPY TO, read_csv('/any/file'), ATTACH ... (READ_WRITE) or EXPORT DATABASE.
SANDBOX = {
    "enable_external_access": False,        # no file but the store's own: COPY, readers, ATTACH, EXPORT, INSTALL, LOAD
    "autoinstall_known_extensions": False,  # a query naming an extension's function neither fetches it
    "autoload_known_extensions": False,     # nor loads one installed in ~/.duckdb
    "allow_community_extensions": False,
    "allow_persistent_secrets": False,      # no credentials read from or written to ~/.duckdb/stored_secrets
    "lock_configuration": True,             # and no SET, RESET, PRAGMA or CALL can change any setting afterwards
}
ALLOWED = "SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN"


_turns = threading.RLock()  # one connection at a time per process: DuckDB refuses a second with other settings
_schema_ready: set[str] = set()
_held = threading.local()  # .cons: path -> the read-write connection a session of this thread holds open


class MetricStore:
    def __init__(self, path: Path | str, lock_timeout: float = 60.0):
        self.path = Path(path)
        self.lock_timeout = lock_timeout

    @contextmanager
    def connect(self, read_only: bool = False):
        held = getattr(_held, "cons", {}).get((str(self.path), read_only))
        if held is not None:  # inside session(): its connection
            yield held
            return
        if read_only and not self.path.exists():
            raise FileNotFoundError(f"no metric history at {self.path}: run a sweep first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout
        with _turns:
            while True:
                try:
                    # readers (`qsweep sql`, cards, report, status) also get no file but this one: SANDBOX
                    con = duckdb.connect(str(self.path), read_only=read_only, config=SANDBOX if read_only else {})
                    break
                except duckdb.IOException as e:
                    if "lock" not in str(e).lower() or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            try:
                if not read_only and str(self.path) not in _schema_ready:
                    con.execute(SCHEMA)
                    _schema_ready.add(str(self.path))
                yield con
            finally:
                con.close()

    @contextmanager
    def session(self, read_only: bool = False):
        """One connection for everything inside (any MetricStore of this path, this thread), as each costs
        ~25 ms, ~100 ms on a busy machine. Writes: one transaction, all of it lands or none. Reads
        (read_only=True: query, failed_gates, ...): one sandboxed connection; writes do not work inside
        it, nor reads inside a write session (DuckDB opens no second connection with other settings in
        one process). Nested sessions join the outer one. Keep it short: while it lasts no other process
        can write the store, and none can open it during a write session."""
        cons, at = _held.__dict__.setdefault("cons", {}), (str(self.path), read_only)
        if at in cons:
            yield self
            return
        with self.connect(read_only) as con:
            if not read_only:
                con.execute("BEGIN TRANSACTION")
            cons[at] = con
            try:
                yield self
            except BaseException:
                if not read_only:
                    con.execute("ROLLBACK")
                raise
            else:
                if not read_only:
                    con.execute("COMMIT")
            finally:
                del cons[at]

    def record_stage_outputs(self, run_id, model, recipe, stage, key, status, cached, seconds, error=None,
                             metrics=(), layers=(), gates=(), samples=(), sensitivity=()):
        """A stage's line in `stages` and its artifact's rows, in one connection (each costs ~25 ms; one per
        call was 3.6 s of a 6-cell cached rerun). Rows already recorded for the artifact stay as they are."""
        with self.session():
            if key is not None:
                self.record_outputs(run_id, model, recipe, stage, key, metrics, layers, gates, samples, sensitivity)
            self.record_stage(run_id, model, recipe, stage, key, status, cached, seconds, error)

    def record_outputs(self, run_id, model, recipe, stage, key, metrics=(), layers=(), gates=(), samples=(),
                       sensitivity=()):
        """An artifact's rows (metrics, plan, gates, samples, sensitivity) in one connection; those already
        recorded stay."""
        with self.session():
            self.record_metrics(run_id, model, recipe, stage, key, list(metrics))
            self.record_layers(model, recipe, key, list(layers))
            self.record_gates(model, recipe, key, list(gates))
            self.record_samples(model, recipe, key, list(samples))
            self._record_once("sensitivity", ("path", "layer", "out_features", "in_features", "format", "bits",
                                              "group_size", "mode", "proxy_error", "predicted_kl", "measured_kl"),
                              model, recipe, key, list(sensitivity))

    def start_run(self, run_id: str, sweep: str, sweep_file: str, sweep_digest: str, host: str, tools: dict, cells: list):
        with self.connect() as con:
            con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, now(), NULL, 'running')",
                [run_id, sweep, sweep_file, sweep_digest, host, json.dumps(tools), json.dumps(cells)],
            )

    def finish_run(self, run_id: str, status: str):
        with self.connect() as con:
            con.execute("UPDATE runs SET finished = now(), status = ? WHERE run_id = ?", [status, run_id])

    def record_stage(self, run_id, model, recipe, stage, key, status, cached, seconds, error=None):
        with self.connect() as con:
            con.execute(
                "INSERT INTO stages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                [run_id, model, recipe, stage, key, status, cached, seconds, error],
            )

    def record_event(self, kind: str, stage: str, key: str, detail: str):
        import socket

        with self.connect() as con:
            con.execute("INSERT INTO events VALUES (now(), ?, ?, ?, ?, ?)", [kind, stage, key, detail, socket.gethostname()])

    def record_metrics(self, run_id, model, recipe, stage, artifact_key, rows: list[dict]):
        """Insert metric rows; rows already recorded for this artifact stay as they are."""
        if not rows:
            return
        with self.connect() as con:
            held = con.execute("SELECT count(*) FROM metrics WHERE model = ? AND recipe = ? AND stage = ? AND artifact_key = ?",
                               [model, recipe, stage, artifact_key])
            if held.fetchone()[0] >= len(rows):  # a cached rerun: every row is there already
                return
            con.executemany(
                "INSERT INTO metrics (model, recipe, stage, task, metric, value, stderr, n, artifact_key, run_id, recorded,"
                " backend, data, device) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), ?, ?, ?) ON CONFLICT DO NOTHING",
                [[model, recipe, stage, r["task"], r["metric"], r["value"], r.get("stderr"), r.get("n"), artifact_key, run_id,
                  r.get("backend"), r.get("data"), r.get("device")] for r in rows],
            )

    def record_layers(self, model, recipe, artifact_key, rows: list[dict]):
        """A quantized artifact's per-module plan; recorded once per artifact."""
        self._record_once("recipe_layers", ("path", "layer", "out_features", "in_features", "bits", "group_size",
                                            "mode", "source", "note"), model, recipe, artifact_key, rows)

    def record_samples(self, model, recipe, artifact_key, rows: list[dict]):
        """A benchmark artifact's per-question rows; recorded once per artifact."""
        self._record_once("samples", ("task", "doc_id", "target", "chosen", "correct", "correct_norm", "logliks"),
                          model, recipe, artifact_key, rows)

    def record_gates(self, model, recipe, artifact_key, rows: list[dict]):
        """A card's quality gates; recorded once per publish artifact."""
        self._record_once("gates", ("gate", "requirement", "measured", "value", "passed"), model, recipe, artifact_key, rows)

    def _record_once(self, table: str, fields: tuple, model, recipe, artifact_key, rows: list[dict]):
        """Rows of a table keyed by artifact: model, recipe, artifact_key, then `fields` in column order."""
        if not rows:
            return
        marks = ", ".join("?" * (3 + len(fields)))
        with self.connect() as con:
            if con.execute(f"SELECT count(*) FROM {table} WHERE artifact_key = ?", [artifact_key]).fetchone()[0]:
                return  # a cached rerun: inserting 880 rows that all conflict costs half a second
            con.executemany(f"INSERT INTO {table} VALUES ({marks}) ON CONFLICT DO NOTHING",
                            [[model, recipe, artifact_key, *(r[f] for f in fields)] for r in rows])

    def record_comparisons(self, model: str, base: str, rows: list):
        """Replace the comparisons of `model` against `base` (tasks.compare.Comparison rows)."""
        with self.connect() as con:
            con.execute("DELETE FROM comparisons WHERE model = ? AND base = ?", [model, base])
            if rows:
                con.executemany(
                    "INSERT INTO comparisons VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [[model, c.task, c.base, c.recipe, c.n, c.base_acc, c.acc, c.diff, c.low, c.high,
                      c.only_base, c.only_recipe, c.p_value, c.significant, c.p_holm] for c in rows],
                )

    def latest_samples(self, model: str | None = None) -> list[dict]:
        """Each cell's per-question outcomes from its latest benchmark: model, recipe, task, doc_id, correct."""
        _, rows = self.query("SELECT model, recipe, task, doc_id, correct FROM latest_samples WHERE correct IS NOT NULL"
                             + (" AND model = ?" if model is not None else "") + " ORDER BY model, recipe, task, doc_id",
                             [model] if model is not None else [])
        return [dict(zip(("model", "recipe", "task", "doc_id", "correct"), r)) for r in rows]

    def failed_gates(self) -> dict[tuple[str, str], list[dict]]:
        """(model, recipe) -> the quality gates its latest card failed, for the cells that failed one."""
        try:
            _, rows = self.query("SELECT model, recipe, gate, requirement, measured, value, passed FROM latest_gates "
                                 "WHERE NOT passed ORDER BY model, recipe, gate")
        except duckdb.CatalogException:  # a store last written before qsweep had gates
            return {}
        cells: dict[tuple[str, str], list[dict]] = {}
        for m, r, *gate in rows:
            cells.setdefault((m, r), []).append(dict(zip(("gate", "requirement", "measured", "value", "passed"), gate)))
        return cells

    def query(self, sql: str, params=None) -> tuple[list[str], list[tuple]]:
        with self.connect(read_only=True) as con:
            cur = con.execute(sql, params or [])
            columns = [d[0] for d in cur.description] if cur.description else []
            return columns, cur.fetchall()

    def read(self, sql: str) -> tuple[list[str], list[tuple]]:
        """A statement a user typed (`qsweep sql`): one query that only reads, else ReadRefused."""
        check_query(sql)
        try:
            return self.query(sql)
        except duckdb.PermissionException as e:  # SANDBOX stopped a file reader: read_csv, glob, ...
            detail = str(e).splitlines()[0]
            raise ReadRefused(f"{_culprit(str(e))} reads files: not allowed, qsweep sql reads only the store's tables "
                              f"({detail})") from None


def cell_summary(db: "MetricStore", cells: list[tuple[str, str]]) -> list[dict]:
    """One row per (model, recipe): size, accuracy per task and its mean, KL, speed, as last measured."""
    wanted = {"bits_per_weight": "bits/weight", "disk_bytes": "MB", "kl_mean": "KL mean", "ppl_ratio": "ppl ratio",
              "generation_tokens_per_s": "tokens/s"}
    if not cells:
        return []
    _, rows = db.query("SELECT model, recipe, stage, task, metric, value FROM latest_metrics "
                         "WHERE list_contains(?, model || '/' || recipe) AND (metric = 'acc' OR metric IN ?) "
                         "ORDER BY model, recipe, task", [[f"{m}/{r}" for m, r in cells], list(wanted)])
    summary = {cell: {"model": cell[0], "recipe": cell[1]} for cell in cells}
    for model, recipe, stage, task, metric, value in rows:
        row = summary[(model, recipe)]
        if metric == "acc":
            row[task] = round(value, 3)
        elif stage != "reference":
            row[wanted[metric]] = round(value / 1e6, 1) if metric == "disk_bytes" else round(value, 4)
    ordered = []
    for row in summary.values():
        tasks = sorted(k for k in row if k not in ("model", "recipe", *wanted.values()))
        if tasks:
            row["mean acc"] = round(sum(row[t] for t in tasks) / len(tasks), 3)
        order = ["model", "recipe", "bits/weight", "MB", *tasks, "mean acc", "KL mean", "ppl ratio", "tokens/s"]
        ordered.append({k: row[k] for k in order if k in row})
    return ordered


class ReadRefused(Exception):
    """A statement `qsweep sql` does not run, and why (one line)."""


def check_query(sql: str) -> None:
    """Exactly one statement that only reads, as DuckDB's parser types it: DESCRIBE, SHOW, SUMMARIZE,
    FROM-first, VALUES and PIVOT with an IN list are SELECTs to it; EXPLAIN only of one of those."""
    statements = duckdb.extract_statements(sql)
    if len(statements) != 1:
        raise ReadRefused(f"one statement per call (got {len(statements)})" if statements else "no statement given")
    statement = statements[0]
    try:
        kind = statement.type.name
    except ValueError:  # a type newer than the Python client's enum: UPDATE EXTENSIONS in duckdb 2.0.1
        kind = "?"
    if kind == "EXPLAIN" and _explains_a_query(statement.query):
        return
    if kind != "SELECT":
        word = _keyword(statement.query)  # COPY, INSTALL, RESET, CHECKPOINT: DuckDB's type says less
        what = {"MULTI": "PIVOT without an IN list (it runs several statements; name the values: ON col IN (...))",
                "EXPLAIN": "EXPLAIN of anything but a query"}.get(kind, kind if word in ALLOWED.split(", ") else word)
        raise ReadRefused(_refused(what))


def _refused(what: str) -> str:
    return f"{what} is not allowed: qsweep sql is read-only and reads only the store's tables (allowed: {ALLOWED})"


def _words(sql: str) -> list[int]:
    """Where each token of `sql` starts, comments left out."""
    return [at for at, kind in duckdb.tokenize(sql) if kind != duckdb.token_type.comment]


def _keyword(sql: str) -> str:
    """The statement's first word, e.g. COPY, INSTALL, CHECKPOINT; FORCE CHECKPOINT in full."""
    words = [re.match(r"\w*", sql[at:]).group().upper() for at in _words(sql)[:2]]
    return " ".join(words[:2] if words[:1] == ["FORCE"] else words[:1]) or "?"


def _explains_a_query(sql: str) -> bool:
    """EXPLAIN [ANALYZE] [(options)] followed by one SELECT."""
    at = _words(sql)[1:3]
    if len(at) > 1 and re.match(r"\w*", sql[at[0]:]).group().upper() in ("ANALYZE", "ANALYSE"):
        at = at[1:]
    rest = sql[at[0]:] if at else ""
    for inner in (rest, re.sub(r"^\([^()]*\)", "", rest)):  # "(FORMAT json) SELECT" or "(SELECT 1)"
        try:
            statements = duckdb.extract_statements(inner)
        except (duckdb.Error, ValueError):
            continue
        if len(statements) == 1 and statements[0].type.name == "SELECT":
            return True
    return False


def _culprit(message: str) -> str:
    """The function DuckDB's error points at (its ^^^ under LINE n:), e.g. read_csv; else 'the query'."""
    lines = message.splitlines()
    for line, marks in zip(lines, lines[1:]):
        if line.startswith("LINE ") and "^" in marks:
            name = re.match(r"[\w.]*", line[marks.index("^"):]).group()
            if name:
                return name
    return "the query"
