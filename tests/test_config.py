"""The sweep file: every mistake is reported with its field path and what is allowed."""

from pathlib import Path

import pytest
import yaml

from flows.config import SweepError, load_sweep, parse_sweep
from tasks.recipes import BUILTINS

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"name": "t", "models": [{"name": "tiny", "source": "demo://tiny-llama"}], "recipes": ["q4", "qx86-hi"]}


def error(data) -> str:
    with pytest.raises(SweepError) as err:
        parse_sweep(data, "my.yaml")
    message = str(err.value)
    assert message.startswith("my.yaml"), message
    return message


def test_good_sweep_parses():
    sweep = parse_sweep({**GOOD, "recipes": ["q4", {"name": "mine", "bits": 6, "group_size": 32,
                                                     "rules": [{"match": "lm_head", "bits": 8}]}]})
    recipes = sweep.recipe_objects()
    assert [r.name for r in recipes] == ["q4", "mine"] and recipes[0] is BUILTINS["q4"]
    assert recipes[1].layer("lm_head") == {"bits": 8, "group_size": 32, "mode": "affine"}


@pytest.mark.parametrize("data, where, allowed", [
    ({**GOOD, "extra": 1}, "extra", "name, models, recipes, smoke, benchmark, fidelity, search, publish"),
    ({**GOOD, "models": [{"name": "tiny", "source": "demo://tiny-llama", "revision": "main"}]},
     "models[0].revision", "name, source"),
    ({**GOOD, "benchmark": {"limt": 5}}, "benchmark.limt", "tasks, limit, num_fewshot"),
    ({**GOOD, "recipes": [{"name": "r", "bits": 4, "rules": [{"match": "x", "bitz": 8}]}]},
     "recipes[0].rules[0].bitz", "match, layers, bits, group_size, mode, keep"),
    ({**GOOD, "recipes": [{"name": "r", "bits": 4, "str": 8}]}, "recipes[0].str", "name, bits, group_size"),
    ({**GOOD, "card": {"compare_with": [{"model": "m", "recipe": "q4", "task": "arc"}]}},
     "card.compare_with[0].task", "model, recipe"),
])
def test_unknown_key(data, where, allowed):
    message = error(data)
    assert f"{where}: unknown key" in message and allowed in message, message


def test_unknown_recipe_lists_the_builtins():
    message = error({**GOOD, "recipes": ["q4", "q7"]})
    assert "recipes[1]" in message and "'q7'" in message, message
    assert ", ".join(BUILTINS) in message, message


@pytest.mark.parametrize("recipe, field, allowed", [
    ({"name": "r", "bits": 7}, "bits 7", "2, 3, 4, 5, 6, 8"),
    ({"name": "r", "bits": 4, "group_size": 48}, "group_size 48", "32, 64, 128"),
    ({"name": "r", "bits": 4, "mode": "foo"}, "mode 'foo'", "affine, mxfp4, nvfp4, mxfp8"),
    ({"name": "r", "bits": 4, "rules": [{"match": "mlp", "bits": 7}]}, "rules[0]", "2, 3, 4, 5, 6, 8"),
])
def test_impossible_inline_recipe(recipe, field, allowed):
    message = error({**GOOD, "recipes": ["q4", recipe]})
    assert "recipes[1]" in message and "'r'" in message and field in message, message
    assert f"allowed: {allowed}" in message, message


def test_empty_lists():
    message = error({**GOOD, "models": []})
    assert "models: " in message and "at least 1" in message, message
    message = error({**GOOD, "recipes": []})
    assert "recipes: none given" in message and "search.budgets_bpw" in message, message


def test_a_search_needs_no_recipe_list_and_names_its_cells():
    from flows.config import parse_sweep

    sweep = parse_sweep({**GOOD, "recipes": [], "search": {"budgets_bpw": [4.5, 6], "budgets_bytes": [1000]}})
    assert sweep.recipe_names() == ["auto-4.5", "auto-6", "auto-1000B"]


@pytest.mark.parametrize("search, where, allowed", [
    ({"budgets_bpw": [4.5], "formats": ["q4g64", "q7g64"]}, "search.formats", "q2g32"),
    ({"budgets_bpw": [0.5]}, "search.budgets_bpw", "more than 1"),
    ({"budgets_bpw": [4.5], "calibration": "qsweep:data/hamlet.txt"}, "search.calibration", "any other text"),
])
def test_bad_search(search, where, allowed):
    message = error({**GOOD, "search": search})
    assert where in message and allowed in message, message


@pytest.mark.parametrize("recipes", [["q4", "q4"], ["q4", {"name": "q4", "bits": 8}]])
def test_duplicate_recipe_names(recipes):
    message = error({**GOOD, "recipes": recipes})
    assert "recipes: duplicate names q4" in message, message


def test_the_message_names_what_was_given():
    """`qsweep quantize` validates its options as the sweep file they make: the fields, and what they are."""
    with pytest.raises(SweepError) as err:
        parse_sweep({**GOOD, "recipes": ["q7"]}, "qsweep quantize", what="options (as sweep file fields)")
    assert str(err.value).startswith("qsweep quantize: invalid options (as sweep file fields):\n  recipes[0]: ")
    assert ", ".join(BUILTINS) in str(err.value)


def test_several_mistakes_are_reported_together():
    message = error({**GOOD, "extra": 1, "benchmark": {"limt": 5}})
    assert "extra: unknown key" in message and "benchmark.limt: unknown key" in message, message


def test_file_that_is_not_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: demo\nmodels: [unclosed\n")
    with pytest.raises(SweepError, match="not valid YAML"):
        load_sweep(bad)


@pytest.mark.parametrize("text", ["just some words\n", "", "- a\n- list\n"])
def test_file_that_is_not_a_mapping(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert str(path) in str(err.value) and "name, models, recipes" in str(err.value)


def test_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes('name: t\nsmoke: {prompt: "café"}\n'.encode("latin-1"))
    with pytest.raises(SweepError, match=r"not UTF-8 text \(byte \d+\); save it as UTF-8"):
        load_sweep(bad)


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_smoke_prompt(prompt):
    assert "smoke.prompt: must not be empty" in error({**GOOD, "smoke": {"prompt": prompt}})


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", ".hidden"])
def test_a_model_name_cannot_escape_the_store(name):
    assert "letters, digits, '.', '_' and '-' only" in error({**GOOD, "models": [{"name": name, "source": "demo://tiny-llama"}]})


def test_missing_file(tmp_path):
    with pytest.raises(SweepError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")
    with pytest.raises(SweepError, match="does not exist"):
        load_sweep(tmp_path)  # a directory is not a sweep file


def test_demo_sweep_is_valid():
    path = ROOT / "sweeps" / "demo.yaml"
    sweep, digest = load_sweep(path)
    assert sweep.name == "demo" and sweep.models and all(r.check() for r in sweep.recipe_objects())
    assert parse_sweep(yaml.safe_load(path.read_text())) == sweep
    assert load_sweep(path)[1] == digest and len(digest) == 64


@pytest.mark.parametrize("repo, says", [
    ("me/{modle}-{recipe}", "bad placeholder 'modle'; allowed: {model}, {recipe}"),
    ("no-org-{model}-{recipe}", "must be a hub repo id 'org/name'"),
    ("me/{model}-fixed", "lacks {recipe}: every cell would upload to one repo"),
])
def test_publish_repo_is_checked_before_any_work(repo, says):
    assert says in error({**GOOD, "publish": {"repo": repo}})


@pytest.mark.parametrize("concurrency, says", [
    ({"cells": 0}, "concurrency.cells: Input should be greater than or equal to 1"),
    ({"model_slots": "two"}, "concurrency.model_slots: Input should be a valid integer"),
    ({"workers": 2}, "concurrency.workers: unknown key; allowed keys: cells, model_slots"),
])
def test_concurrency_is_checked(concurrency, says):
    assert says in error({**GOOD, "concurrency": concurrency})


def test_remote_code_is_off_unless_a_model_says_so():
    sweep = parse_sweep({**GOOD, "models": [{"name": "a", "source": "demo://tiny-llama"},
                                            {"name": "b", "source": "demo://tiny-llama", "trust_remote_code": True}]})
    assert [m.trust_remote_code for m in sweep.models] == [False, True]
    assert "models[0].trust_remote_code: Input should be a valid boolean" in error(
        {**GOOD, "models": [{"name": "a", "source": "demo://tiny-llama", "trust_remote_code": "maybe"}]})


def test_gates_default_on_and_name_what_is_allowed():
    sweep = parse_sweep(GOOD)
    assert sweep.gates.limits() == {"smoke": "ok", "max_kl_mean": 1.0, "max_ppl_ratio": 1.5}
    assert "gates.smoke" in error({**GOOD, "gates": {"smoke": "fine"}}) and "'ok' or 'any'" in error(
        {**GOOD, "gates": {"smoke": "fine"}})
    assert "gates.max_kl_mean: Input should be greater than 0" in error({**GOOD, "gates": {"max_kl_mean": 0}})
    message = error({**GOOD, "gates": {"allow": ["q5"]}})
    assert "gates.allow[0]: 'q5' is not a recipe or model/recipe cell of this sweep; allowed: q4, qx86-hi, tiny/q4" in message
    sweep = parse_sweep({**GOOD, "gates": {"allow": ["tiny/q4"], "max_ppl_ratio": None}})
    assert sweep.allowed_gated("tiny", "q4") and not sweep.allowed_gated("tiny", "qx86-hi")
    assert sweep.gates.limits()["max_ppl_ratio"] is None


def test_card_notes_are_files_next_to_the_sweep_file(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "tiny.md").write_text("About **tiny**.\n")
    (tmp_path / "notes" / "q4.md").write_text("q4 keeps 4 bits.\n")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "card": {"notes": {"tiny": "notes/tiny.md", "tiny/q4": "notes/q4.md"}}}))
    sweep, _ = load_sweep(path)
    assert sweep.notes_for("tiny", "q4") == ["About **tiny**.\n", "q4 keeps 4 bits.\n"]
    assert sweep.notes_for("tiny", "qx86-hi") == ["About **tiny**.\n"]

    path.write_text(yaml.safe_dump({**GOOD, "card": {"notes": {"tiny": "notes/missing.md"}}}))
    with pytest.raises(SweepError, match=r"card.notes.tiny: 'notes/missing.md': no such file or directory"):
        load_sweep(path)
    message = error({**GOOD, "card": {"notes": {"q9": "x.md"}}})
    assert "card.notes: 'q9' is not a model, recipe or model/recipe cell of this sweep; allowed: tiny, q4" in message
    assert "card.compare_with[0].recipe: Field required" in error({**GOOD, "card": {"compare_with": [{"model": "x"}]}})


def test_each_card_is_shown_beside_the_other_models_matching_recipe():
    from flows.cells import compare_with

    two = {**GOOD, "models": GOOD["models"] + [{"name": "other", "source": "demo://tiny-llama"}]}
    sweep = parse_sweep({**two, "card": {"compare_with": [{"model": "old", "recipe": "q8"}, {"model": "other", "recipe": "q4"}]}})
    assert compare_with(sweep, "tiny", "q4") == [{"model": "old", "recipe": "q8"}, {"model": "other", "recipe": "q4"}]
    assert compare_with(sweep, "tiny", "qx86-hi") == [{"model": "old", "recipe": "q8"}, {"model": "other", "recipe": "q4"},
                                                      {"model": "other", "recipe": "qx86-hi"}]
    assert compare_with(sweep, "other", "q4") == [{"model": "old", "recipe": "q8"}, {"model": "tiny", "recipe": "q4"}]
    assert compare_with(parse_sweep(GOOD), "tiny", "q4") == []  # one model: nothing to match
    alone = parse_sweep({**two, "card": {"compare_matching": False}})
    assert compare_with(alone, "tiny", "q4") == []
