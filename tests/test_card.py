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


def test_official_benchmarks_name_their_hub_datasets():
    for task, (dataset, config, split, name) in cards.DATASETS.items():
        assert "/" in dataset and split in ("test", "validation"), task


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
    assert shown == ["bf16 (base)", "**qx86-hi (this model)**", "q4"]  # base first, then by bits
    for row in table[2:]:
        recipe = row[0].strip("*").split(" (")[0]
        acc = {r["metric"]: r["value"] for r in store.manifest(refs[recipe]["benchmark"])["info"]["metrics"]}["acc"]
        assert row[3] == f"{acc:.3f}"  # three decimals, as publishers write them
    assert "first 8 questions" in text

    diffs = table_after(text, "Difference from bf16")
    assert [r[0] for r in diffs[2:]] == ["**qx86-hi (this model)**", "q4"]
    diff, interval = diffs[3][1].split(" ", 1)
    assert diff.rstrip("*").startswith(("+", "-")) and interval.startswith("(") and interval.endswith(")")

    fidelity = table_after(text, "Perplexity and KL")
    assert [r[0] for r in fidelity[2:]] == ["bf16 (base)", "**qx86-hi (this model)**", "q4"]
    kl = {r[0].strip("*").split(" (")[0]: float(r[3]) for r in fidelity[2:]}
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
