"""Model cards from the store and DuckDB: what a reader of the card on the hub sees."""

import json
import shutil

import pytest
from huggingface_hub import ModelCard

from conftest import MEASURED_RECIPES, publish_params
from storage.artifacts import Store
from storage.metrics import MetricStore
from tasks import card as cards
from tasks.recipes import BUILTINS

from hub_server import COMMIT


def facts_for(store, refs, resolved, recipe="qx86-hi", **change):
    return cards.gather(store, publish_params("tiny", resolved, BUILTINS[recipe], **change), refs[recipe])


def table_row(card: str, first_cell: str) -> list[str]:
    [row] = [line for line in card.splitlines() if line.startswith(f"| {first_cell} |")]
    return [c.strip() for c in row.strip("|").split("|")]


def table_after(card: str, heading: str) -> list[list[str]]:
    """The rows of the first markdown table after a line starting with `heading`."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip("|").split("|")])
        elif table:
            break
    return table


def test_card_passes_huggingface_hubs_own_parsing_with_a_model_index(measured):
    store, refs, resolved = measured
    text = cards.render(facts_for(store, refs, resolved))
    card = ModelCard(text)  # raises on metadata the hub library cannot read
    assert card.data.library_name == "mlx" and card.data.pipeline_tag == "text-generation"
    assert {"mlx", "quantized", "qx86-hi"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local model has no hub repo to point to
    [result] = card.data.eval_results  # the hub shows these on the model page
    acc = {r["metric"]: r["value"] for r in store.manifest(refs["qx86-hi"]["benchmark"])["info"]["metrics"]}["acc"]
    assert result.dataset_type == "qsweep_demo_mc" and result.metric_type == "acc"
    assert result.metric_value == pytest.approx(acc, abs=1e-4)
    assert result.task_type == "text-generation" and not result.verified
    # 8 of the task's 40 questions: the name the hub shows says it is a sample, of which split, drawn how
    assert result.dataset_name == "qsweep_demo_mc (8-question random sample of test, seed 0)"
    assert result.dataset_split == "test" and result.metric_args["questions"] == 8
    assert "qsweep shipped" in result.dataset_args["data"]


def test_official_benchmarks_name_their_hub_datasets_and_short_names():
    from tasks.offline_tasks import OFFLINE

    assert set(cards.DATASETS) == set(OFFLINE)  # every benchmark qsweep knows offline has a model-index entry
    for task, (dataset, config, name, short) in cards.DATASETS.items():
        assert "/" in dataset and name and short, task
    assert [cards.short_name(t) for t in cards.DATASETS] == ["ARC-C", "ARC-E", "BoolQ", "HellaSwag", "OBQA", "PIQA",
                                                             "Winogrande"]
    assert cards.short_name("qsweep_demo_mc") == "qsweep_demo_mc"


def test_card_names_the_hub_base_model_its_revision_and_license(measured):
    store, refs, resolved = measured
    hub = {"kind": "hf", "repo": "org/tiny", "revision": COMMIT}
    facts = cards.gather(store, {**publish_params("tiny", resolved, BUILTINS["q4"]), "source": hub,
                                 "license": "apache-2.0"}, refs["q4"])
    card = ModelCard(cards.render(facts))
    assert card.data.base_model == "org/tiny" and card.data.base_model_relation == "quantized"
    assert card.data.license == "apache-2.0"
    assert COMMIT in card.text and "converted to MLX format from [org/tiny]" in card.text


def test_card_shows_plan_size_and_every_sibling_beside_this_variant(measured):
    store, refs, resolved = measured
    text = cards.render(facts_for(store, refs, resolved))
    q = {r["metric"]: r["value"] for r in store.manifest(refs["qx86-hi"]["quantize"])["info"]["metrics"]}
    assert float(table_row(text, "bits per weight")[1]) == pytest.approx(q["bits_per_weight"], abs=0.0005)
    assert "in layers 0-3: 6-bit affine, group size 32" in text  # the MLP
    assert "`self_attn.k_proj`, `self_attn.o_proj`, `self_attn.q_proj`, `self_attn.v_proj` in layers 0-3: 8-bit" in text

    table = table_after(text, "Accuracy (lm-eval")
    assert table[0] == ["recipe", "bits/weight", "size", "qsweep_demo_mc", "mean"]
    shown = [r[0] for r in table[2:]]
    assert shown == ["bf16", "**qx86-hi (this model)**", "q4"]  # base first, then by bits
    base = {r["metric"]: r["value"] for r in store.manifest(refs["bf16"]["benchmark"])["info"]["metrics"]}["acc"]
    for row in table[2:]:
        recipe = row[0].strip("*").split(" (")[0]
        acc = {r["metric"]: r["value"] for r in store.manifest(refs[recipe]["benchmark"])["info"]["metrics"]}["acc"]
        # three decimals, and the relative change from the base as publishers write it (+3.1%)
        relative = "" if recipe == "bf16" or not base else f" ({round(100 * (acc - base) / base, 1) + 0.0:+.1f}%)"
        assert row[3] == f"{acc:.3f}{relative}"
    assert "8 random questions of each task (seed 0)" in text and "split `test`, 8 of 40 questions" in text

    diffs = table_after(text, "Difference from bf16")
    assert [r[0] for r in diffs[2:]] == ["**qx86-hi (this model)**", "q4"]
    for row in diffs[2:]:
        diff, interval = row[1].split(" ", 1)
        low, high = map(float, interval.strip("()").split(", "))
        assert low < float(diff.rstrip("*")) < high  # never a point: a score interval does not collapse
    assert "Tango score interval" in text and "after Holm's adjustment across the 2 differences" in text

    fidelity = table_after(text, "Perplexity and KL")
    assert [r[0] for r in fidelity[2:]] == ["reference: the base model (bfloat16 weights as stored) run in float32",
                                            "bf16", "**qx86-hi (this model)**", "q4"]
    assert fidelity[2][2] == "1.0000" and fidelity[2][3] == ""  # the reference against itself: no KL to show
    # the reference is named for what it is, and so is bf16
    assert "from the reference, the base model (bfloat16 weights as stored) run in float32" in text
    assert "`bf16` is the base's own bfloat16 weights" in text
    kl = {r[0].strip("*").split(" (")[0]: float(r[3]) for r in fidelity[3:]}
    assert kl["bf16"] <= kl["qx86-hi"] < kl["q4"]
    assert 'load("tiny-qx86-hi-mlx")' in text and "apply_chat_template" in text and "pip install mlx-lm" in text


def test_a_sibling_finishing_later_changes_the_card_and_its_digest(measured, tmp_path):
    store, refs, resolved = measured
    alone = Store(shutil.copytree(store.root, tmp_path / "store"))
    db = MetricStore(alone.metrics_db)
    with db.connect() as con:  # as if q4 had not been measured yet
        con.execute("DELETE FROM stages WHERE recipe = 'q4'")
        con.execute("DELETE FROM comparisons WHERE recipe = 'q4'")
    before = facts_for(alone, refs, resolved)
    after = facts_for(store, refs, resolved)
    assert [t["recipe"] for t in before.table] == ["bf16", "qx86-hi"]
    assert "q4" in [t["recipe"] for t in after.table]
    assert before.digest() != after.digest()
    assert facts_for(store, refs, resolved).digest() == after.digest()  # and nothing else does


def test_siblings_measured_differently_are_left_out(measured, tmp_path):
    """A sibling benchmarked on other questions is not comparable: it must not share the table."""
    store, refs, resolved = measured
    other = Store(shutil.copytree(store.root, tmp_path / "store"))
    with MetricStore(other.metrics_db).connect() as con:
        con.execute("UPDATE metrics SET n = 99 WHERE recipe = 'q4' AND stage = 'benchmark'")
    facts = facts_for(other, refs, resolved)
    assert [t["recipe"] for t in facts.table] == ["bf16", "qx86-hi"]
    assert all(d["recipe"] != "q4" for d in facts.diffs)


def test_facts_are_json_and_written_beside_the_card(measured, tmp_path):
    store, refs, resolved = measured
    facts = facts_for(store, refs, resolved)
    cards.write(facts, tmp_path)
    assert json.loads((tmp_path / "card.json").read_text())["recipe"] == "qx86-hi"
    assert (tmp_path / "README.md").read_text() == cards.render(facts)
    assert set(MEASURED_RECIPES) == {t["recipe"] for t in facts.table}


def test_plan_summary_groups_layers_into_ranges():
    rows = [{"path": f"model.layers.{i}.mlp.up_proj", "layer": i, "bits": 4 if i in (0, 1, 5) else 6,
             "group_size": 64, "mode": "affine"} for i in range(6)]
    rows.append({"path": "model.embed_tokens", "layer": None, "bits": None, "group_size": None, "mode": "bfloat16"})
    assert cards.plan_summary(rows, "bfloat16") == [
        "`model.embed_tokens`: bfloat16",
        "`mlp.up_proj` in layers 0-1, 5: 4-bit affine, group size 64",
        "`mlp.up_proj` in layers 2-4: 6-bit affine, group size 64",
    ]


def test_a_cell_that_fails_a_gate_says_so_at_the_top(measured):
    store, refs, resolved = measured
    passed = facts_for(store, refs, resolved, recipe="q4")
    assert not any(line.startswith("> ") for line in cards.render(passed).splitlines())
    strict = facts_for(store, refs, resolved, recipe="q4", gates={"max_kl_mean": 1e-9})
    text = cards.render(strict)
    kl = {r["metric"]: r["value"] for r in store.manifest(refs["q4"]["fidelity"])["info"]["metrics"]}["kl_mean"]
    body = ModelCard(text).text
    assert body.index("failed qsweep's quality gates") < body.index("converted to MLX format")
    assert f"> - mean KL divergence from the base (nats/token): **{kl:.4g}** (required: at most 1e-09)" in text
    assert strict.digest() != passed.digest()


def test_the_authors_notes_and_other_models_cells_are_on_the_card(measured, tmp_path):
    """card.notes is placed as written; card.compare_with shows another model's cell on the same questions."""
    store, refs, resolved = measured
    other = Store(shutil.copytree(store.root, tmp_path / "store"))
    with MetricStore(other.metrics_db).connect() as con:  # the tiny model's q4 again, as a model called "other"
        for table in ("metrics", "samples", "stages"):
            cols = [c for (c,) in con.execute(f"SELECT column_name FROM (DESCRIBE {table})").fetchall()]
            other_key = {"model": "'other'", "artifact_key": "artifact_key || '-other'", "key": "key || '-other'"}
            picked = ", ".join(other_key.get(c, c) for c in cols)
            con.execute(f"INSERT INTO {table} SELECT {picked} FROM {table} WHERE model = 'tiny' AND recipe = 'q4'")
    notes = ["## Why this recipe\n\nAttention at 8 bits, *as Deckard does*.\n"]
    facts = cards.gather(other, publish_params("tiny", resolved, BUILTINS["qx86-hi"], notes=notes,
                                               compare_with=[{"model": "other", "recipe": "q4"}]), refs["qx86-hi"])
    text = cards.render(facts)
    assert "## Why this recipe\n\nAttention at 8 bits, *as Deckard does*." in text
    beside = table_after(text, "Beside other models")
    assert beside[0] == ["task", "**qx86-hi (this model)**", "other q4"]
    q4 = {r["metric"]: r["value"] for r in store.manifest(refs["q4"]["benchmark"])["info"]["metrics"]}["acc"]
    cell = beside[2][2]
    assert cell.startswith(f"{q4:.3f} (this model ") and "," in cell
    assert facts.digest() != facts_for(store, refs, resolved).digest()


def test_a_store_written_by_an_older_qsweep_still_gives_cards_report_and_comparisons(measured, tmp_path):
    """Read-only commands do not update the schema: a store without the newer columns, tables and views
    (device, gates, latest_gates) must still be read."""
    from flows.cli import main

    store, refs, resolved = measured
    old = Store(shutil.copytree(store.root, tmp_path / "store"))
    with MetricStore(old.metrics_db).connect() as con:
        con.execute("DROP VIEW latest_gates; DROP TABLE gates; ALTER TABLE metrics DROP COLUMN device")
    import storage.metrics
    storage.metrics._schema_ready.discard(str(old.metrics_db))  # as a fresh process would see it
    before = old.metrics_db.read_bytes()
    assert cards.render(facts_for(old, refs, resolved))
    assert main(["--store", str(old.root), "report", "--out", str(tmp_path / "report"), "--format", "md"]) == 0
    assert main(["--store", str(old.root), "compare"]) == 0
    assert old.metrics_db.read_bytes() == before
