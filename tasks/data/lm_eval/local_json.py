"""Load a task's JSON/JSONL data files relative to this directory, not the CWD."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(data_files: dict[str, str], **_metadata) -> datasets.DatasetDict:
    # lm-eval passes the task metadata along with dataset_kwargs; only data_files matters.
    files = {split: str(HERE / name) for split, name in data_files.items()}
    return datasets.load_dataset("json", data_files=files)
