"""`qsweep sql` runs one statement that only reads the store's tables: nothing it is given writes a
file, reads a file past the store's database, changes a setting or touches another database."""

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from flows.cli import main
from storage.metrics import MetricStore

ROWS = [
    {"task": "arc", "metric": "acc", "value": 0.5, "stderr": 0.1, "n": 10},
    {"task": "arc", "metric": "acc_norm", "value": 0.625, "stderr": 0.1, "n": 10},
]
ALLOWED = "(allowed: SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN)"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A store with a finished run and its metrics, and a folder beside it with files of its own
    (made once: each test gets a copy)."""
    root = tmp_path_factory.mktemp("made") / "store"
    db = MetricStore(root / "metrics.duckdb")
    db.start_run("r1", "demo", "sweeps/demo.yaml", "abc", "host", {"mlx": "x"}, [{"model": "m", "recipe": "q4"}])
    db.record_metrics("r1", "m", "q4", "benchmark", "k1", ROWS)
    db.record_stage("r1", "m", "q4", "benchmark", "k1", "done", False, 1.0)
    db.finish_run("r1", "completed")
    elsewhere = root.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.csv").write_text("secret,value\nhunter2,1\n")
    (elsewhere / "secret.json").write_text('{"secret": "hunter2"}\n')
    with duckdb.connect() as scratch:  # a Parquet file to aim read_parquet at
        scratch.execute(f"COPY (SELECT 'hunter2' AS secret) TO '{elsewhere / 'secret.parquet'}'")
    return root


@pytest.fixture
def store(made, tmp_path) -> Path:
    shutil.copytree(made.parent, tmp_path, dirs_exist_ok=True)
    return tmp_path / "store"


def sql(store: Path, query: str, *options) -> tuple[int, str, str]:
    """`qsweep --store STORE sql QUERY` in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", out)
        mp.setattr(sys, "stderr", err)
        status = main(["--store", str(store), "sql", query, *options])
    return status, out.getvalue(), err.getvalue()


def snapshot(store: Path) -> tuple[dict, dict]:
    """Every path under the store's parent (files with their bytes), and the store's rows per table."""
    top = store.parent
    paths = {str(p.relative_to(top)): p.read_bytes() if p.is_file() else None for p in sorted(top.rglob("*"))}
    with duckdb.connect(str(store / "metrics.duckdb"), read_only=True) as con:
        tables = [t for (t,) in con.execute("SELECT table_name FROM duckdb_tables() ORDER BY ALL").fetchall()]
        counts = {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    return paths, counts


# Each: the statement ({store} and {elsewhere} filled in), what the one-line refusal says, and the
# paths it aimed at, which must not exist afterwards.
REFUSED = [
    ("COPY (SELECT 'x') TO '{elsewhere}/out.csv'", "COPY is not allowed", ["{elsewhere}/out.csv"]),
    ("COPY (SELECT 'x') TO '{store}/out.csv'", "COPY is not allowed", ["{store}/out.csv"]),
    ("COPY metrics TO '{store}/metrics.duckdb' (FORMAT csv)", "COPY is not allowed", []),
    ("COPY metrics FROM '{elsewhere}/secret.csv'", "COPY is not allowed", []),
    ("ATTACH '{elsewhere}/x.db' (READ_WRITE)", "ATTACH is not allowed", ["{elsewhere}/x.db"]),
    ("ATTACH '{store}/metrics.duckdb' AS m2 (READ_WRITE)", "ATTACH is not allowed", []),
    ("USE y", "USE is not allowed", []),
    ("DETACH metrics", "DETACH is not allowed", []),
    ("EXPORT DATABASE '{elsewhere}/export'", "EXPORT is not allowed", ["{elsewhere}/export"]),
    ("INSTALL httpfs", "INSTALL is not allowed", []),
    ("LOAD httpfs", "LOAD is not allowed", []),
    ("SET enable_external_access = true", "SET is not allowed", []),
    ("RESET lock_configuration", "RESET is not allowed", []),
    ("SET VARIABLE v = 1", "SET is not allowed", []),
    ("PRAGMA enable_profiling = 'json'", "PRAGMA is not allowed", []),
    ("PRAGMA profile_output = '{elsewhere}/profile.json'", "PRAGMA is not allowed", ["{elsewhere}/profile.json"]),
    ("CALL enable_logging(storage = 'file', storage_path = '{elsewhere}/logs')", "CALL is not allowed",
     ["{elsewhere}/logs"]),
    ("CHECKPOINT", "CHECKPOINT is not allowed", []),
    ("FORCE CHECKPOINT", "FORCE CHECKPOINT is not allowed", []),
    ("CREATE TABLE t (a INT)", "CREATE is not allowed", []),
    ("CREATE TEMP TABLE t AS SELECT * FROM metrics", "CREATE is not allowed", []),
    ("INSERT INTO metrics (model, recipe, stage, task, metric, artifact_key) VALUES ('x', 'x', 'x', 'x', 'x', 'x')",
     "INSERT is not allowed", []),
    ("WITH x AS (SELECT 1) INSERT INTO runs (run_id) SELECT 'r2'", "INSERT is not allowed", []),
    ("DELETE FROM metrics", "DELETE is not allowed", []),
    ("UPDATE metrics SET value = 0", "UPDATE is not allowed", []),
    ("DROP TABLE metrics", "DROP is not allowed", []),
    ("-- a comment first\n/* and another */ copy metrics TO '{elsewhere}/out.csv'", "COPY is not allowed",
     ["{elsewhere}/out.csv"]),
    ("EXPLAIN ANALYZE COPY (SELECT 'x') TO '{elsewhere}/out.csv'", "EXPLAIN of anything but a query is not allowed",
     ["{elsewhere}/out.csv"]),
    ("PIVOT metrics ON metric USING first(value)", "PIVOT without an IN list", []),
]


@pytest.mark.parametrize("query, says, aimed", REFUSED, ids=[q.split("(")[0][:40] for q, _, _ in REFUSED])
def test_a_statement_that_is_not_a_query_is_refused_and_changes_nothing(store, query, says, aimed):
    fill = {"store": store, "elsewhere": store.parent / "elsewhere"}
    before = snapshot(store)
    status, out, err = sql(store, query.format(**fill))
    assert status == 2 and out == ""
    assert err.startswith(f"qsweep: error: {says}") and err.count("\n") == 1, err
    assert "read-only" in err and ALLOWED in err
    assert snapshot(store) == before
    for path in aimed:
        assert not Path(path.format(**fill)).exists()


READERS = [
    ("SELECT * FROM read_csv('{elsewhere}/secret.csv')", "read_csv", "secret.csv"),
    ("SELECT * FROM read_parquet('{elsewhere}/secret.parquet')", "read_parquet", "secret.parquet"),
    ("SELECT * FROM read_json('{elsewhere}/secret.json')", "read_json", "secret.json"),
    ("SELECT * FROM metrics, read_text('{elsewhere}/secret.csv')", "read_text", "secret.csv"),
    ("SELECT * FROM glob('{elsewhere}/*')", "glob", "*"),
    ("SELECT * FROM read_csv('/etc/passwd')", "read_csv", "/etc/passwd"),
    ("SELECT * FROM '{elsewhere}/secret.csv'", "the query", "secret.csv"),
]


@pytest.mark.parametrize("query, culprit, file", READERS, ids=[q[14:40] for q, _, _ in READERS])
def test_a_query_that_reads_files_is_refused_by_duckdb(store, query, culprit, file):
    before = snapshot(store)
    status, out, err = sql(store, query.format(elsewhere=store.parent / "elsewhere"))
    assert status == 2 and out == "" and "hunter2" not in err
    assert err.startswith(f"qsweep: error: {culprit} reads files: not allowed, qsweep sql reads only the store's tables")
    assert "file system operations are disabled by configuration" in err and file in err  # DuckDB's own detail
    assert err.count("\n") == 1
    assert snapshot(store) == before


def test_one_statement_per_call(store):
    before = snapshot(store)
    assert sql(store, "SELECT 1; SELECT 2; SELECT 3") == (2, "", "qsweep: error: one statement per call (got 3)\n")
    assert sql(store, "SELECT count(*) FROM metrics; DELETE FROM metrics")[2] == \
        "qsweep: error: one statement per call (got 2)\n"
    assert sql(store, " ; ") == (2, "", "qsweep: error: no statement given\n")
    assert snapshot(store) == before
    status, out, _ = sql(store, "SELECT count(*) AS n FROM metrics;")  # a trailing semicolon is one statement
    assert status == 0 and out.split()[-1] == str(len(ROWS))


def test_the_issue_s_attack_through_the_real_cli(store):
    """The statements of the report, as a user types them: each refused, the history intact."""
    before = snapshot(store)
    elsewhere = store.parent / "elsewhere"
    attacks = {
        f"COPY (SELECT 'x') TO '{elsewhere}/written.txt'": "COPY is not allowed",
        f"SELECT * FROM read_csv('{elsewhere}/secret.csv')": "read_csv reads files: not allowed",
        f"ATTACH '{elsewhere}/x.db' (READ_WRITE)": "ATTACH is not allowed",
        f"ATTACH '{elsewhere}/y.db' (READ_WRITE); USE y; DETACH metrics; "
        f"ATTACH '{store}/metrics.duckdb' AS m2 (READ_WRITE); DELETE FROM m2.metrics": "one statement per call (got 5)",
    }
    for query, says in attacks.items():
        done = subprocess.run([sys.executable, "-m", "flows.cli", "--store", str(store), "sql", query],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stdout == "", (query, done.stderr)
        assert done.stderr.startswith(f"qsweep: error: {says}"), done.stderr
    assert snapshot(store) == before
    assert sorted(p.name for p in elsewhere.iterdir()) == ["secret.csv", "secret.json", "secret.parquet"]


def test_every_reader_of_the_store_is_sandboxed(store):
    """Cards, report and status read through MetricStore.query: DuckDB itself refuses there too,
    with no statement check in front."""
    db, elsewhere = MetricStore(store / "metrics.duckdb"), store.parent / "elsewhere"
    before = snapshot(store)
    for statement in [f"COPY (SELECT 'x') TO '{elsewhere}/out.csv'",
                      f"SELECT * FROM read_csv('{elsewhere}/secret.csv')",
                      f"ATTACH '{elsewhere}/x.db' (READ_WRITE)", f"EXPORT DATABASE '{elsewhere}/export'",
                      "SET enable_external_access = true", "SET lock_configuration = false",
                      "SET autoload_known_extensions = true", f"SET profiling_output = '{elsewhere}/p.json'",
                      "INSTALL httpfs", "DELETE FROM metrics"]:
        with pytest.raises(duckdb.Error):
            db.query(statement)
    assert snapshot(store) == before
    assert db.query("SELECT current_setting('enable_external_access'), current_setting('lock_configuration')")[1] \
        == [(False, True)]


def test_queries_that_read_the_store(store):
    def rows(query, *options):
        status, out, err = sql(store, query, *options)
        assert status == 0 and err == "", err
        return out

    before = snapshot(store)
    table = rows("SELECT recipe, metric, value FROM metrics ORDER BY metric").splitlines()
    assert table[0].split() == ["recipe", "metric", "value"]
    assert [line.split() for line in table[2:]] == [["q4", r["metric"], str(r["value"])] for r in ROWS]
    assert rows("WITH m AS (SELECT * FROM metrics) SELECT count(*) AS n FROM m").split()[-1] == str(len(ROWS))
    assert rows("FROM latest_metrics SELECT metric ORDER BY metric").split()[2:] == [r["metric"] for r in ROWS]
    described = {line.split()[0] for line in rows("DESCRIBE metrics").splitlines()[2:]}
    assert {"model", "recipe", "task", "metric", "value", "stderr", "artifact_key"} <= described
    shown = set(rows("SHOW TABLES").split())
    assert {"metrics", "runs", "stages", "latest_metrics", "latest_samples"} <= shown
    summary = rows("SUMMARIZE metrics", "--format", "json")
    assert {r["column_name"] for r in json.loads(summary)} == described
    plan = rows("EXPLAIN SELECT count(*) FROM metrics WHERE metric = 'acc'")
    assert plan.splitlines()[0].split() == ["explain_key", "explain_value"]
    assert rows("EXPLAIN ANALYZE (FORMAT json) SELECT * FROM metrics").split()[:2] == ["explain_key", "explain_value"]
    pivoted = rows("PIVOT metrics ON metric IN ('acc', 'acc_norm') USING first(value) GROUP BY recipe",
                   "--format", "json")
    assert json.loads(pivoted) == [{"recipe": "q4", **{r["metric"]: r["value"] for r in ROWS}}]

    csv_out = rows("SELECT metric, value FROM metrics ORDER BY metric", "--format", "csv")
    assert list(csv.reader(io.StringIO(csv_out))) == [["metric", "value"]] + [[r["metric"], str(r["value"])]
                                                                             for r in ROWS]
    json_out = rows("SELECT metric, value, n FROM latest_metrics ORDER BY metric", "--format", "json")
    assert json.loads(json_out) == [{"metric": r["metric"], "value": r["value"], "n": r["n"]} for r in ROWS]
    assert snapshot(store) == before


def test_a_sql_error_is_duckdb_s_own_message(store):
    status, out, err = sql(store, "SELEC 1")
    assert status == 2 and out == "" and err.startswith("qsweep: error: Parser Error: syntax error at or near")
    status, _, err = sql(store, "SELECT * FROM nowhere")
    assert status == 2 and "Table with name nowhere does not exist" in err


HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
con.execute("INSERT INTO metrics (model, recipe, stage, task, metric, value, artifact_key, run_id) "
            "VALUES ('m', 'q4', 'smoke', 'smoke', 'x', 1, 'k', 'r')")
print("held", flush=True)
time.sleep(1.0)
con.close()
"""


def test_a_query_waits_while_another_process_writes(store):
    writer = subprocess.Popen([sys.executable, "-c", HOLDER, str(store / "metrics.duckdb")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "held"
        status, out, err = sql(store, "SELECT count(*) AS n FROM metrics")
    finally:
        writer.kill()
        writer.wait()
    assert status == 0 and err == "" and out.split()[-1] == str(len(ROWS) + 1)  # sees what the writer added


def test_every_table_and_view_says_what_it_holds(store):
    """The one-line descriptions `qsweep sql` users read (and its --help / --schema print) are in the store."""
    status, out, err = sql(store, "SELECT table_name AS name, comment FROM duckdb_tables() UNION ALL "
                                  "SELECT view_name, comment FROM duckdb_views() WHERE NOT internal ORDER BY name",
                           "--format", "json")
    assert status == 0 and err == "", err
    described = {r["name"]: r["comment"] for r in json.loads(out)}
    assert {"runs", "stages", "metrics", "samples", "gates", "latest_metrics", "latest_samples", "latest_gates"} \
        <= set(described)
    for name, comment in described.items():
        assert comment and "\n" not in comment, name
