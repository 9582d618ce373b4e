"""Loads the task data shipped in eval/data/ for the se_* task YAMLs, whatever the working directory.

lm-eval hands `dataset_kwargs` to `custom_dataset`; `datasets.load_dataset("json", data_files=...)` would resolve
relative paths against the current directory, so they are resolved here against this folder instead. No network.
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_local_json(data_files: dict, **_metadata):
    import datasets

    files = {split: str(HERE / path) for split, path in data_files.items()}
    missing = [f for f in files.values() if not Path(f).exists()]
    if missing:
        raise FileNotFoundError(f"shipped task data missing: {missing} (reinstall se_compress from its repository)")
    return datasets.load_dataset("json", data_files=files)
