"""The prepared folder the prepare stage writes and train, evaluate and merge read: one Arrow file per split
(memory-mapped where it is read) and `prepared.json`, which says how the records were made."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import StageError

META = "prepared.json"  # {"task", "format": "pairs"|"conversations", "chat": the chat setup or null, "examples": {...},
#                          classification: "labels" (the classes, by id) and "label_counts" (training examples of each)}


def split_file(prepared_dir: Path, name: str) -> Path:
    return Path(prepared_dir) / f"{name}.arrow"


def read_meta(prepared_dir: Path, task: str | None = None) -> dict:
    """prepared.json; with `task`, refused unless the data was prepared for that task (params task.type)."""
    path = Path(prepared_dir) / META
    if not path.exists():
        raise StageError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if task is not None and meta.get("task", "causal_lm") != task:
        raise StageError(f"{prepared_dir} was prepared for task.type {meta.get('task', 'causal_lm')}, not {task}: "
                         "rerun the prepare stage (dvc repro prepare)")
    return meta


def open_split(path: Path):
    """A split file as a Dataset memory-mapped from its Arrow file: rows are read as they are needed."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    return datasets.Dataset.from_file(str(path))


def training_split(prepared_dir: Path, name: str):
    """A prepared split with what training reads of it (token ids and labels), memory-mapped."""
    return open_split(split_file(prepared_dir, name)).select_columns(["input_ids", "labels"])
