"""Raw examples -> split, tokenized and loss-masked records, written to one folder in one rename.

The records go through `datasets` on disk: read into Arrow (finetune.data.sources), tokenized by `Dataset.map` in
batches and in prepare.num_proc processes (finetune.data.tokenize), split by seeded index, and written as one
Arrow file per split, which train and evaluate memory-map. `prepared.json` beside them says how they were made
(pairs or conversations, the chat template and the tokens it added), for train to set up the same tokenizer.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from finetune.batching import IGNORE_INDEX
from finetune.config.params import Params
from finetune.config.task import TaskParams
from finetune.data.chat import setup_chat
from finetune.data.prepared import META, split_file
from finetune.data.records import BadRecords
from finetune.data.sources import read_raw
from finetune.data.splits import SPLITS, rare_labels_warning, small_test_warning, split_examples, split_labels
from finetune.data.tokenize import KEPT, data_format, tokenized
from finetune.errors import StageError
from finetune.models import load_tokenizer
from finetune.outputs import refuse_foreign, replacing
from finetune.tasks import classification

SPLIT_COLUMNS = {"train": ("input_ids", "labels", "source"), "validation": ("input_ids", "labels", "source"),
                 "test": ("input_ids", "labels", "prompt", "response", "source", "messages")}
WRITE_BATCH = 10_000  # rows per Arrow record batch of a split file
AUTO_PROC_EXAMPLES = 20_000  # prepare.num_proc auto: one process per this many examples, up to the cores
SCRATCH_INFIX = ".tmp-scratch-"  # `.prepared.tmp-scratch-<random>`: ignored by git like the staging folders


def percentiles(lengths, prefix: str) -> dict[str, float]:
    if not len(lengths):
        return {}
    qs = np.percentile(lengths, [50, 90, 95, 99])
    return {f"{prefix}_p50": float(qs[0]), f"{prefix}_p90": float(qs[1]), f"{prefix}_p95": float(qs[2]),
            f"{prefix}_p99": float(qs[3]), f"{prefix}_max": int(np.max(lengths)),
            f"{prefix}_mean": round(float(np.mean(lengths)), 2)}


def scratch_dir(out_dir: Path) -> Path:
    """A new folder beside `out_dir` (on its filesystem, not a RAM-backed /tmp) for the intermediate Arrow files;
    one a killed run left is removed first."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.parent.glob(f".{glob.escape(out_dir.name)}{SCRATCH_INFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{SCRATCH_INFIX}", dir=out_dir.parent))


def processes(setting: int | str, examples: int) -> int:
    if setting != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, examples // AUTO_PROC_EXAMPLES))


def prepare(params: Params, out_dir: Path) -> dict:
    """Read, tokenize and split; the splits are written to a temporary folder that replaces `out_dir` in one
    rename, so the files always come from one run."""
    data, prep = params.data, params.prepare
    out_dir = Path(out_dir)
    refuse_foreign(out_dir, "prepared", "the prepare stage's output")
    tokenizer = load_tokenizer(params.model)
    bad = BadRecords(data.on_bad_record)
    scratch = scratch_dir(out_dir)  # the Arrow files of the raw and tokenized data, removed at the end
    try:
        sources = {"data": read_raw(Path(data.path), bad, scratch / "raw")}
        sources |= {name: read_raw(Path(getattr(data, f"{name}_path")), bad, scratch / name)
                    for name in ("validation", "test") if getattr(data, f"{name}_path")}
        task = params.task or TaskParams()  # a caller that loaded no task section: causal_lm
        classify = task.type == "classification"
        conversational = [name for name, source in sources.items() if data_format(source, data, task)[0]]
        chat = setup_chat(tokenizer, prep.chat_template, params.model.model_name) \
            if (conversational or prep.chat_template) and not classify else None
        if chat and chat.added_tokens:
            print(f"chat template: added {', '.join(chat.added_tokens)} to the tokenizer (trained with the model)")
        tables, counts = {}, {"truncated": 0, "dropped_overlong": 0}
        for name, source in sources.items():
            table = tokenized(source, data, prep, tokenizer, chat is not None, processes(prep.num_proc, len(
                source.dataset)), str(scratch / f"{name}.tokenized.arrow"), source.path.name, task)
            tables[name] = table, kept_rows(table, bad, counts)
        table, kept = tables["data"]
        if not len(kept):
            raise StageError(f"{data.path}: no usable examples")
        responses = table.data.table.column("response").take(kept).to_pylist() \
            if data.stratify is not False or classify else None
        if classify:  # the labels themselves, as they are
            labels = responses if data.stratify is not False else None
        else:
            labels = split_labels(responses, data, params.evaluate) if responses is not None else None
        positions = split_examples(list(range(len(kept))), 0 if data.validation_path else data.validation_ratio,
                                   0 if data.test_path else data.test_ratio, data.seed, labels)
        if classify and (moved := classification.training_holds_every_class(positions, responses)):
            print(f"warning: {len(moved)} class(es) had no training example after the split ({', '.join(moved[:5])}"
                  f"{', ...' if len(moved) > 5 else ''}): one example of each moved from validation/test to "
                  "training", file=sys.stderr)
        if labels:
            print(f"split: stratified by {len(set(labels))} labels (data.stratify: {str(data.stratify).lower()})")
            warning = rare_labels_warning({n: [labels[p] for p in positions[n]] for n in SPLITS})
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
        chosen = {name: (table, kept[np.asarray(positions[name], dtype=np.int64)]) for name in SPLITS}
        chosen |= {name: tables[name] for name in ("validation", "test") if name in tables}
        meta = {"task": task.type, "format": "conversations" if conversational else "pairs",
                "chat": chat.meta() if chat else None}
        if classify:
            meta |= class_meta(chosen)
            print(f"classes: {len(meta['labels'])} ({', '.join(meta['labels'][:10])}"
                  f"{', ...' if len(meta['labels']) > 10 else ''}), from the training split's labels")
        stats = write_splits(chosen, out_dir, prep, meta)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ordered = {f"{name}_examples": stats.pop(f"{name}_examples") for name in SPLITS}
    supervised = stats.pop("supervised_tokens_train")
    classes = {"classes": len(meta["labels"])} if classify else {}
    return ordered | classes | counts | bad.stats() | stats | {"supervised_tokens_train": supervised}


def class_meta(chosen: dict) -> dict:
    """Classification: the classes (the training split's labels, sorted; a class's id is its place) and their
    training examples; a validation or test label that training does not have is refused by file and line."""
    def column(name: str, field: str) -> list[str]:
        table, indices = chosen[name]
        return table.data.table.column(field).take(indices).to_pylist()

    counts = classification.label_counts(column("train", "response"), "the training split")
    classes = sorted(counts)
    for name in ("validation", "test"):
        classification.unseen_labels(column(name, "response"), column(name, "source"), classes, name)
    return {"labels": classes, "label_counts": counts}


def class_ids(batch, classes: list[str], labels_type):
    """A batch's `labels` column: each row's class id (the place of its label, `response`, among `classes`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pc.index_in(batch.column("response").combine_chunks(), value_set=pa.array(classes)).cast(pa.int32())
    offsets = pa.array(np.arange(len(ids) + 1, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, ids, type=labels_type)


def kept_rows(table, bad: BadRecords, counts: dict) -> np.ndarray:
    """Report the bad records in file order (or stop at the first), count the truncated and dropped ones; the
    indices of the rows to keep."""
    import pyarrow as pa
    import pyarrow.compute as pc

    status = table.with_format("arrow")["status"]
    for value, count in zip(*pc.value_counts(status).flatten(), strict=True):
        if value.as_py() in counts:
            counts[value.as_py()] += count.as_py()
    reported = np.flatnonzero(~pc.is_in(status, pa.array(KEPT + ("dropped_overlong",))).to_numpy(zero_copy_only=False))
    if len(reported):
        for row in table.select(reported).select_columns(["source", "status", "problem"]):
            bad(row["source"], row["status"], row["problem"])
    return np.flatnonzero(pc.is_in(status, pa.array(KEPT)).to_numpy(zero_copy_only=False))


def write_splits(chosen: dict, out_dir: Path, prep, meta: dict) -> dict:
    """Each split's rows (table, indices) as `<split>.arrow`, and META, in a folder swapped in whole."""
    import pyarrow as pa
    import pyarrow.compute as pc

    stats: dict = {}
    lengths: list[np.ndarray] = []
    classes = meta.get("labels")
    with replacing(out_dir, "prepared", "the prepare stage's output") as staged:
        for name in SPLITS:
            table, indices = chosen[name]
            if not len(indices):
                raise StageError(f"prepare: the {name} split is empty after filtering (prepare.max_length="
                                 f"{prep.max_length}); add data or raise max_length")
            kept = list(SPLIT_COLUMNS[name])
            read = kept + ["response"] if classes and "response" not in kept else kept
            columns = table.data.table.select(read).replace_schema_metadata(None)
            supervised = 0
            with pa.OSFile(str(split_file(staged, name)), "wb") as sink, \
                    pa.ipc.new_stream(sink, columns.select(kept).schema) as writer:
                for start in range(0, len(indices), WRITE_BATCH):
                    batch = columns.take(indices[start:start + WRITE_BATCH]).combine_chunks()
                    if classes:  # the labels mapped to class ids, once, here
                        place = batch.schema.get_field_index("labels")
                        batch = batch.set_column(place, "labels", class_ids(batch, classes,
                                                                            batch.schema.field("labels").type))
                    batch = batch.select(kept)
                    writer.write_table(batch)
                    lengths.append(pc.list_value_length(batch["input_ids"]).to_numpy())
                    supervised += pc.sum(pc.not_equal(pc.list_flatten(batch["labels"]), IGNORE_INDEX)).as_py()
            stats[f"{name}_examples"] = len(indices)
            if name == "train":
                stats["supervised_tokens_train"] = supervised
        (staged / META).write_text(json.dumps(meta | {"examples": {n: stats[f"{n}_examples"] for n in SPLITS}},
                                              indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    warning = small_test_warning(stats["test_examples"])
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    stats.update(percentiles(np.concatenate(lengths), "tokens"))
    return stats
