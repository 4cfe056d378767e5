"""End to end: the `qsweep` command on generated models, as a user runs it.

Real Prefect (ephemeral), mlx, mlx-lm, lm-eval and DuckDB, each run in its own
process, like a user at a terminal. Crashes, faults and two sweeps at once: test_faults.py.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_runs import RECIPES, artifact_dirs, qsweep, rows, stages_of_last_run, write_sweep


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    """One sweep run twice on a clean store, its cells all at once, at most two models loaded at a
    time: (store, sweep file, first run, its stages, its artifacts, second run)."""
    tmp = tmp_path_factory.mktemp("sweep")
    sweep = write_sweep(tmp / "sweep.yaml", {"tiny": tiny_model}, concurrency={"cells": 3, "model_slots": 2})
    store, home = tmp / "store", tmp / "prefect"
    first = qsweep(store, "run", sweep, prefect_home=home)
    first_stages = stages_of_last_run(store)
    first_artifacts = artifact_dirs(store)
    second = qsweep(store, "run", sweep, prefect_home=home)
    return store, sweep, first, first_stages, first_artifacts, second


def test_first_run_computes_every_cell_and_records_metrics(finished):
    store, _, first, first_stages, _, _ = finished
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(first_stages) == len(RECIPES) * 7
    assert all(status == "done" for *_, status, _ in first_stages)
    # the base's reference pass is one artifact for all cells: computed by the first, found by the others
    references = [cached for _, _, stage, _, cached in first_stages if stage == "reference"]
    assert sorted(references) == [False] + [True] * (len(RECIPES) - 1)
    # one base model: downloaded once, found in the store by the other cells
    downloads = [cached for _, _, stage, _, cached in first_stages if stage == "download"]
    assert sorted(downloads) == [False] + [True] * (len(RECIPES) - 1)
    for recipe in RECIPES:
        found = {m for (m,) in rows(store, f"SELECT metric FROM metrics WHERE recipe = '{recipe}' AND task = 'qsweep_demo_mc'")}
        assert {"acc", "acc_norm"} <= found
    assert (store / "published" / "tiny-q4-mlx" / "README.md").exists()


def test_every_metric_row_and_model_stage_says_where_it_ran(finished):
    from tasks.loading import describe_device
    from tasks.registry import STAGES

    loads_model = [s.name for s in STAGES.values() if s.loads_model]
    store, _, first, *_ = finished
    here = describe_device()  # e.g. "cpu: AMD EPYC (mlx-cpu 0.32.4)"
    assert first.stdout.startswith(f"qsweep: running {finished[1]} on {here};")
    stages = ", ".join(f"'{s}'" for s in loads_model)
    assert {d for (d,) in rows(store, f"SELECT DISTINCT device FROM metrics WHERE stage IN ({stages})")} == {here}
    manifests = [json.loads(m.read_text()) for m in store.glob("artifacts/*/*/manifest.json")]
    assert {m["info"].get("device") for m in manifests if m["stage"] in loads_model} == {here}


def test_cells_run_at_once_but_never_hold_more_models_than_slots(finished):
    store = finished[0]
    loads = [(m["started"], m["started"] + m["seconds"]) for stage in ("quantize", "smoke", "benchmark", "reference",
                                                                       "fidelity")
             for m in map(json.loads, map(Path.read_text, (store / "artifacts" / stage).glob("*/manifest.json")))]
    assert len(loads) == 4 * len(RECIPES) + 1
    assert max(sum(start <= t < end for start, end in loads) for t, _ in loads) <= 2


def test_recipe_layers_are_queryable(finished):
    """Which module got which bits, per quantized artifact, as SQL."""
    store = finished[0]
    got = dict(rows(store, "SELECT recipe, count(*) FROM recipe_layers GROUP BY recipe"))
    assert got == {"bf16": 30, "q4": 30, "qx86-hi": 30}  # 4 layers x 7 projections, embeddings, lm_head
    attention = rows(store, "SELECT DISTINCT bits FROM recipe_layers WHERE recipe = 'qx86-hi' AND path LIKE '%self_attn%'")
    mlp = rows(store, "SELECT DISTINCT bits FROM recipe_layers WHERE recipe = 'qx86-hi' AND path LIKE '%.mlp.%'")
    assert attention == [(8,)] and mlp == [(6,)]
    assert rows(store, "SELECT DISTINCT bits, mode FROM recipe_layers WHERE recipe = 'bf16'") == [(None, "bfloat16")]


def test_fidelity_and_comparisons_per_recipe(finished, capsys):
    """KL rows for every cell, per-question rows for every benchmark, and `qsweep compare` against bf16."""
    from flows.cli import main

    store = finished[0]
    kl = dict(rows(store, "SELECT recipe, value FROM latest_metrics WHERE stage = 'fidelity' AND metric = 'kl_mean'"))
    assert set(kl) == set(RECIPES) and kl["bf16"] < kl["q4"]
    per_question = dict(rows(store, "SELECT recipe, count(*) FROM latest_samples WHERE task = 'qsweep_demo_mc' GROUP BY recipe"))
    assert per_question == {r: 8 for r in RECIPES}  # limit 8
    assert main(["--store", str(store), "compare", "--base", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "q4" in out and "qx86-hi" in out and "comparisons" in out
    compared = rows(store, "SELECT recipe, n, p_value FROM comparisons WHERE base = 'bf16' ORDER BY recipe")
    assert [(r, n) for r, n, _ in compared] == [("q4", 8), ("qx86-hi", 8)] and all(0 < p <= 1 for *_, p in compared)


def test_second_run_computes_nothing(finished):
    store, _, _, _, first_artifacts, second = finished
    assert second.returncode == 0, second.stderr[-3000:]
    assert all(cached for *_, cached in stages_of_last_run(store))
    # the console: qsweep's own lines only; Prefect's (Cached, as the UI shows each stage) are in the run's log
    shown = second.stdout + second.stderr
    assert len(shown.splitlines()) <= 40 and "Traceback" not in shown and "Cached" not in shown, shown
    assert f"{len(RECIPES)} of {len(RECIPES)} cells measured ({6 * len(RECIPES)} of {6 * len(RECIPES)} stages cached)" in shown
    [log] = [p for p in sorted((store / "logs").glob("*.log")) if p.name in shown]
    assert "Cached" in log.read_text()
    assert artifact_dirs(store) == first_artifacts
    # metric rows written again are not duplicated
    total, distinct = rows(store, "SELECT count(*), count(DISTINCT (model, recipe, stage, task, metric)) FROM metrics")[0]
    assert total == distinct


def test_a_deleted_artifact_or_export_is_rebuilt_though_prefect_remembers_it(finished, tiny_model, tmp_path):
    store = finished[0]
    home = store.parent / "prefect"  # the same Prefect database, which has every stage as cached
    sweep = write_sweep(tmp_path / "two.yaml", {"tiny": tiny_model}, recipes=["bf16", "q4"])  # two of its cells
    [quantized] = [p for p in artifact_dirs(store) if p.parent.name == "quantize"
                   and json.loads((p / "manifest.json").read_text())["info"]["recipe"] == "q4"]
    shutil.rmtree(quantized)
    shutil.rmtree(store / "published" / "tiny-bf16-mlx")
    result = qsweep(store, "run", sweep, prefect_home=home)
    assert result.returncode == 0, result.stderr[-3000:]
    computed = {(r, s) for _, r, s, _, cached in stages_of_last_run(store) if not cached}
    assert computed == {("q4", "quantize")}  # same bytes again, so everything after it is found
    assert (quantized / "manifest.json").exists()
    assert (store / "published" / "tiny-bf16-mlx" / "README.md").exists()


def test_wiping_prefect_database_recomputes_nothing(finished, tiny_model, tmp_path):
    store = finished[0]
    sweep = write_sweep(tmp_path / "one.yaml", {"tiny": tiny_model}, recipes=["q4"])  # one of its cells
    shutil.rmtree(store / "published" / "tiny-q4-mlx")  # a deleted export is delivered again
    result = qsweep(store, "run", sweep, prefect_home=tmp_path / "fresh-prefect-home")
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(cached for *_, cached in stages_of_last_run(store))
    assert (store / "published" / "tiny-q4-mlx" / "README.md").exists()


def test_a_failing_cell_and_a_hub_refusal_lose_nothing_and_publish_retries_alone(tiny_model, tmp_path):
    """A broken model fails its cell, and one that asks to run its own code is refused; the other
    finishes measuring. A wrong token fails its upload with a clear message. With the right token,
    `qsweep publish` uploads from the store, measuring nothing. Neither token is in anything written."""
    from hub_server import FakeHub

    broken, custom = tmp_path / "broken", tmp_path / "custom"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    shutil.copytree(tiny_model, custom)  # its config names code of its own, which would leave a mark if run
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "modeling_custom.M"}}))
    (custom / "modeling_custom.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    good, wrong = "hf_qsweepTESTsecret0123456789", "hf_qsweepWRONGsecret987654321"
    sweep = write_sweep(tmp_path / "sweep.yaml", {"tiny": tiny_model, "broken": broken, "custom": custom}, recipes=["q4"],
                        publish={"repo": "alice/{model}-{recipe}-mlx"}, fidelity={"enabled": False},
                        gates={"max_kl_mean": None, "max_ppl_ratio": None})  # no fidelity stage, so no gates on it
    store, home = tmp_path / "store", tmp_path / "prefect"
    with FakeHub(tokens={good: "alice"}) as hub:
        env = {**hub.env(), "HF_XET_LOG_DEST": str(tmp_path / "xet"), "HF_HOME": str(tmp_path / "hf")}
        refused = qsweep(store, "run", sweep, prefect_home=home, env={**env, "HF_TOKEN": wrong})
        assert refused.returncode != 0
        stages = {(m, s): status for m, _, s, status, _ in stages_of_last_run(store)}
        assert stages[("tiny", "benchmark")] == "done" and stages[("tiny", "publish")] == "failed"
        assert stages[("broken", "download")] == "failed" and ("broken", "quantize") not in stages
        assert stages[("custom", "download")] == "done" and stages[("custom", "quantize")] == "failed"
        status = qsweep(store, "status", prefect_home=home)
        assert "broken/q4 download failed" in status.stdout and "too few for its header" in status.stdout
        assert "tiny/q4 publish failed" in status.stdout and "401" in status.stdout
        assert "custom/q4 quantize failed: RemoteCodeRefused: model 'custom' asks to run code" in status.stdout
        assert "modeling_custom.py" in status.stdout and "models[].trust_remote_code: true" in status.stdout
        assert not (tmp_path / "ran").exists()

        done = qsweep(store, "publish", sweep, prefect_home=home, env={**env, "HF_TOKEN": good})
        assert done.returncode != 0 and "broken/q4 (not measured" in done.stdout + done.stderr
        assert [(m, s, st) for m, _, s, st, _ in stages_of_last_run(store)] == [("tiny", "publish", "done")]
        [commit] = hub.commits["alice/tiny-q4-mlx"]
        assert "q4" in commit["message"]
        assert hub.contents("alice/tiny-q4-mlx")["README.md"] == (store / "published" / "tiny-q4-mlx" / "README.md").read_bytes()

    written = [p for root in (store, home, tmp_path / "xet") if root.exists() for p in root.rglob("*") if p.is_file()]
    for path in written:
        data = path.read_bytes()
        assert good.encode() not in data and wrong.encode() not in data, path
    for out in (refused, status, done):
        assert good not in out.stdout + out.stderr and wrong not in out.stdout + out.stderr


def test_cards_report_and_dry_run_from_the_finished_store(finished, tmp_path, capsys):
    """Cards, report and dry-run read the store alone: no model is loaded, no hub needed, and the metric
    history is not touched (byte for byte), whatever they are asked."""
    from flows.cli import main

    store, sweep, *_ = finished
    history = (store / "metrics.duckdb").read_bytes()
    assert main(["--store", str(store), "compare", "--alpha", "0.01"]) == 0
    assert main(["--store", str(store), "cards", "--out", str(tmp_path / "cards")]) == 0
    for recipe in RECIPES:  # the same facts give the same card as the sweep published
        card = tmp_path / "cards" / f"tiny-{recipe}-mlx" / "README.md"
        assert card.read_text() == (store / "published" / f"tiny-{recipe}-mlx" / "README.md").read_text()
    assert main(["--store", str(store), "report", "--out", str(tmp_path / "report"), "--format", "md"]) == 0
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert pngs == ["history-tiny.png", "pareto-acc-tiny.png", "pareto-kl-tiny.png"]
    capsys.readouterr()
    assert main(["--store", str(store), "publish", str(sweep), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tiny/qx86-hi:" in out and "no hub repo in the sweep file" in out
    assert main(["--store", str(store), "status"]) == 0
    assert main(["--store", str(store), "sql", "SELECT count(*) FROM metrics"]) == 0
    assert (store / "metrics.duckdb").read_bytes() == history
    assert not list(store.glob("*.wal")) and not (store / "cards").exists()


def test_a_cell_that_fails_a_gate_is_held_back_until_forced(finished, tmp_path, capsys):
    """Publishing the measured cells again under a gate that q4 fails: q4's card says so and goes to
    <store>/gated/, its export is removed, status and report show it; --force-gated lets it out."""
    from flows.cli import main

    store = Path(shutil.copytree(finished[0], tmp_path / "store"))
    sweep = yaml.safe_load(finished[1].read_text())
    kl = dict(rows(store, "SELECT recipe, value FROM latest_metrics WHERE stage = 'fidelity' AND metric = 'kl_mean'"))
    strict = tmp_path / "strict.yaml"  # a limit between q4's KL and the others'
    strict.write_text(yaml.safe_dump({**sweep, "gates": {"max_kl_mean": (kl["q4"] + max(kl["bf16"], kl["qx86-hi"])) / 2}}))
    assert kl["q4"] > max(kl["bf16"], kl["qx86-hi"])
    done = qsweep(store, "publish", strict, prefect_home=tmp_path / "prefect")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny/q4: held back by its quality gates (max_kl_mean:" in done.stdout
    assert not (store / "published" / "tiny-q4-mlx").exists() and (store / "published" / "tiny-bf16-mlx").exists()
    card = (store / "gated" / "tiny-q4-mlx" / "README.md").read_text()
    assert "failed qsweep's quality gates" in card and "mean KL divergence from the base" in card
    assert rows(store, "SELECT recipe, gate FROM latest_gates WHERE NOT passed") == [("q4", "max_kl_mean")]

    capsys.readouterr()
    main(["--store", str(store), "status"])
    out = capsys.readouterr().out
    q4 = next(line for line in out.splitlines() if line.startswith("tiny   q4"))
    assert q4.split()[-1] == "gated" and "tiny/q4 failed its quality gates: max_kl_mean" in out
    assert main(["--store", str(store), "report", "--out", str(tmp_path / "report"), "--format", "md"]) == 0
    assert "failed: max_kl_mean" in (tmp_path / "report" / "report.md").read_text()
    assert main(["--store", str(store), "publish", str(strict), "--dry-run"]) == 0
    assert "tiny/q4:\n  held back by its quality gates" in capsys.readouterr().out

    forced = qsweep(store, "publish", strict, "--force-gated", prefect_home=tmp_path / "prefect")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert (store / "published" / "tiny-q4-mlx" / "README.md").read_text() == card  # the same card, banner and all
    assert not (store / "gated" / "tiny-q4-mlx").exists()


PREFECT_ARTIFACTS = """
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        found = await client.read_artifacts()
        flows = await client.read_flow_runs()
        tasks = await client.read_task_runs()
    found = sorted(found, key=lambda a: a.created)
    print(json.dumps({"artifacts": [{"key": a.key, "type": a.type, "data": a.data} for a in found],
                      "flow_runs": [{"name": r.name, "tags": sorted(r.tags), "start": r.start_time, "end": r.end_time}
                                    for r in flows],
                      "task_runs": [{"name": r.name, "tags": sorted(r.tags)} for r in tasks]}, default=str))

asyncio.run(main())
"""


def test_the_prefect_ui_shows_progress_cells_and_cards(finished):
    store = finished[0]
    env = {**os.environ, "PREFECT_HOME": str(store.parent / "prefect")}
    read = subprocess.run([sys.executable, "-c", PREFECT_ARTIFACTS], env=env, capture_output=True, text=True, timeout=300)
    assert read.returncode == 0, read.stderr[-3000:]
    ui = json.loads(read.stdout.strip().splitlines()[-1])
    artifacts = ui["artifacts"]
    # runs say what they are, and carry tags to filter by
    flows = {r["name"]: r["tags"] for r in ui["flow_runs"]}
    cells = sorted((r["start"], r["end"]) for r in ui["flow_runs"] if r["name"].startswith("cell:"))
    assert any(later < end for (_, end), (later, _) in zip(cells, cells[1:]))  # cells ran at the same time
    assert "sweep:test" in flows and flows["cell:tiny/q4"] == ["model:tiny", "recipe:q4"]
    task_runs = {r["name"]: r["tags"] for r in ui["task_runs"]}
    assert task_runs["publish:tiny/qx86-hi"] == []  # a task of the sweep flow, named for its cell
    assert task_runs["quantize:qx86-hi"] == ["model:tiny", "recipe:qx86-hi"]
    assert "model:tiny" in task_runs["download:tiny"]  # and the recipe of the cell that ran it
    assert {"smoke:q4", "benchmark:q4", "reference:tiny", "fidelity:q4", "publish:tiny/q4"} <= set(task_runs)
    progress = [a for a in artifacts if a["type"] == "progress" and a["key"] == "test-progress"]
    assert progress and all(float(a["data"]) == 100.0 for a in progress)  # every run finished
    tables = [json.loads(a["data"]) if isinstance(a["data"], str) else a["data"]
              for a in artifacts if a["type"] == "table" and a["key"] == "test-cells"]
    assert tables  # one table per run, with its finished cells
    full = [t for t in tables if {r["recipe"] for r in t} == set(RECIPES)]
    assert full and all("qsweep_demo_mc" in row and "KL mean" in row for row in full[0])
    cards = {a["key"]: a["data"] for a in artifacts if a["type"] == "markdown"}
    assert set(cards) >= {f"card-tiny-{r}" for r in ("bf16", "q4", "qx86-hi")}
    assert cards["card-tiny-q4"].lstrip().startswith("# tiny-q4-mlx")
