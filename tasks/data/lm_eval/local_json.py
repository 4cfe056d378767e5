"""A task whose JSON/JSONL data files are named relative to this directory, not the CWD.

`class: !function local_json.Local` in a task YAML, rather than a `custom_dataset:` function:
lm-eval 0.4.13 warns on every task built with one ("Custom kwargs can be passed to --metadata",
api/task.py ConfigurableTask.download).
"""

from pathlib import Path

import datasets
from lm_eval.api.task import ConfigurableTask

HERE = Path(__file__).resolve().parent


class Local(ConfigurableTask):
    def __init__(self, config: dict):
        super().__init__(config={k: v for k, v in config.items() if k != "class"})  # structure, not task config

    def download(self, dataset_kwargs: dict | None = None, **kwargs) -> None:
        self.dataset = load(**(dataset_kwargs or {}))


def load(data_files: dict[str, str]) -> datasets.DatasetDict:
    files = {split: str(HERE / name) for split, name in data_files.items()}  # an absolute name stays as it is
    return datasets.load_dataset("json", data_files=files)
