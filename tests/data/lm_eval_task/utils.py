"""The dataset of the sparsedist_easy task: a JSONL file beside this one, read offline."""

from pathlib import Path

import datasets


def load(data_files: str, **_) -> datasets.DatasetDict:
    """The `test` split from `data_files`, relative to this folder."""
    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name(data_files))})
