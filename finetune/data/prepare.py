"""Raw examples -> split, tokenized and loss-masked records, written to one folder in one rename."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from finetune.batching import IGNORE_INDEX
from finetune.config.params import Params
from finetune.data.records import BadRecords, load_examples
from finetune.data.splits import SPLITS, rare_labels_warning, small_test_warning, split_examples, split_labels
from finetune.errors import StageError
from finetune.io import progress, write_jsonl
from finetune.models import load_tokenizer
from finetune.outputs import refuse_foreign, replacing
from finetune.tasks import task_for


def percentiles(lengths: list[int], prefix: str) -> dict[str, float]:
    if not lengths:
        return {}
    qs = np.percentile(lengths, [50, 90, 95, 99])
    return {f"{prefix}_p50": float(qs[0]), f"{prefix}_p90": float(qs[1]), f"{prefix}_p95": float(qs[2]),
            f"{prefix}_p99": float(qs[3]), f"{prefix}_max": int(max(lengths)),
            f"{prefix}_mean": round(float(np.mean(lengths)), 2)}


def prepare(params: Params, out_dir: Path) -> dict:
    """Read, split and tokenize; the splits are written to a temporary folder that replaces `out_dir` in one
    rename, so the three files always come from one run."""
    data, prepare, task = params.data, params.prepare, task_for("causal_lm")
    out_dir = Path(out_dir)
    refuse_foreign(out_dir, "prepared", "the prepare stage's output")
    tokenizer = load_tokenizer(params.model)
    bad = BadRecords(data.on_bad_record)
    examples = load_examples(data, Path(data.path), bad)
    labels = split_labels([e.response for e in examples], data, params.evaluate)
    splits = split_examples(examples, 0 if data.validation_path else data.validation_ratio,
                            0 if data.test_path else data.test_ratio, data.seed, labels)
    if labels:
        print(f"split: stratified by {len(set(labels))} labels (data.stratify: {str(data.stratify).lower()})")
        warning = rare_labels_warning(splits)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    if data.validation_path:
        splits["validation"] = load_examples(data, Path(data.validation_path), bad)
    if data.test_path:
        splits["test"] = load_examples(data, Path(data.test_path), bad)

    stats: dict = {}
    counts = {"truncated": 0, "dropped_overlong": 0}
    lengths: list[int] = []
    prepared = {}
    for name in SPLITS:
        records = []
        for example in progress(splits[name], total=len(splits[name]), desc=f"tokenize {name}"):
            record, status = task.tokenize(example, tokenizer, prepare)
            if status == "prompt_too_long":
                bad(example.source, status, f"the prompt alone is {prepare.max_length}+ tokens "
                    f"(prepare.max_length={prepare.max_length}), so no response token would be trained on")
            elif status != "ok":
                counts[status] += 1
            if record is not None:
                records.append(record)
                lengths.append(len(record["input_ids"]))
        if not records:
            raise StageError(f"prepare: the {name} split is empty after filtering ({len(splits[name])} raw examples,"
                             f" prepare.max_length={prepare.max_length}); add data or raise max_length")
        prepared[name] = records
        stats[f"{name}_examples"] = len(records)
    warning = small_test_warning(len(prepared["test"]))
    if warning:
        print(f"warning: {warning}", file=sys.stderr)

    with replacing(out_dir, "prepared", "the prepare stage's output") as staged:
        for name, records in prepared.items():
            write_jsonl(staged / f"{name}.jsonl", records)
    stats.update(counts)
    stats.update(bad.stats())
    stats.update(percentiles(lengths, "tokens"))
    stats["supervised_tokens_train"] = sum(sum(t != IGNORE_INDEX for t in r["labels"]) for r in prepared["train"])
    return stats
