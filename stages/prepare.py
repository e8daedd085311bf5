"""prepare: raw examples -> prompt-templated, tokenized, loss-masked train/validation/test splits.

    dvc repro prepare
    dvc exp run -S prepare.max_length=256 -S prepare.overlong=drop
    python -m stages.prepare                 # the same, without DVC

Reads params `data`, `prepare` and `model` (for the tokenizer). Writes data/prepared/{train,validation,test}.jsonl
(input_ids, labels with the prompt masked to -100, and the text fields evaluate needs) and metrics/prepare.json
(examples per split, token-length percentiles, dropped and truncated counts).
"""

from __future__ import annotations

import csv
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.common import IGNORE_INDEX, StageError, load_tokenizer, progress, run_main, write_json, write_jsonl
from stages.params import DataParams, Params, PrepareParams, load_params

PREPARED_DIR = Path("data/prepared")
STATS_FILE = Path("metrics/prepare.json")
SPLITS = ("train", "validation", "test")


@dataclass
class Example:
    prompt: str  # the instruction (plus input), before templating
    response: str
    source: str  # "file:line" (or "file:row N") it came from, for error messages and traceability


def _starts_with(path: Path, prefix: bytes) -> bool:
    with path.open("rb") as f:
        return f.read(4096).lstrip().startswith(prefix)


BAD_KINDS = ("invalid_utf8", "invalid_json", "not_an_object", "missing_field", "empty_field", "wrong_type",
             "prompt_too_long")


class BadRecords:
    """Problems in the data, each with its file and line. Policy `fail` raises at the first; `skip` drops the
    record, says so (the first few in full) and counts it by kind for the stats."""

    def __init__(self, policy: str, shown: int = 20):
        self.policy, self.shown = policy, shown
        self.counts = dict.fromkeys(BAD_KINDS, 0)

    def __call__(self, source: str, kind: str, message: str) -> None:
        if self.policy == "fail":
            raise StageError(f"{source}: {message} (data.on_bad_record: skip would skip and count such records)")
        self.counts[kind] += 1
        if sum(self.counts.values()) <= self.shown:
            print(f"skipping {source}: {message}", file=sys.stderr)

    def stats(self) -> dict[str, int]:
        return {"bad_records": sum(self.counts.values()), **{f"bad_{k}": v for k, v in self.counts.items()}}


def _starts_with(path: Path, prefix: bytes) -> bool:
    with path.open("rb") as f:
        return f.read(4096).lstrip().startswith(prefix)


def read_rows(path: Path, bad: BadRecords) -> list[tuple[str, dict]]:
    """(location, record) pairs. JSONL and CSV are read line by line so problems name the line; JSON arrays,
    Parquet and Arrow through `datasets`, naming the record number."""
    if not path.exists():
        raise StageError(f"data.path: {path} does not exist")
    if path.stat().st_size == 0:
        raise StageError(f"{path}: no examples (empty file)")
    if path.suffix == ".jsonl" or (path.suffix == ".json" and not _starts_with(path, b"[")):
        rows = []
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                source = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    bad(source, "invalid_utf8", f"invalid UTF-8 at byte {err.start} of the line")
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    bad(source, "invalid_json", f"invalid JSON ({err.msg} at column {err.colno})")
                    continue
                if not isinstance(record, dict):
                    bad(source, "not_an_object", f"expected a JSON object, got {type(record).__name__}")
                    continue
                rows.append((source, record))
        return rows
    if path.suffix in (".csv", ".tsv"):
        try:
            with path.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
                return [(f"{path}:{reader.line_num}", row) for row in reader]
        except UnicodeDecodeError as err:
            raise StageError(f"{path}: invalid UTF-8 at byte {err.start} of the file") from err
    if path.suffix not in (".json", ".parquet", ".arrow"):
        raise StageError(f"data.path: {path}: unsupported file type {path.suffix!r} "
                         "(use .jsonl, .json, .csv, .tsv, .parquet or .arrow)")
    import datasets

    table = datasets.load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train")
    return [(f"{path}:record {i + 1}", dict(r)) for i, r in enumerate(table)]


def field_names(data: DataParams, keys: set[str], path: Path) -> tuple[str, str | None, str]:
    """(prompt, input or None, response) field names: from params, else recognized from the record's keys."""
    if data.prompt_field:
        return data.prompt_field, data.input_field, data.response_field
    if {"prompt", "response"} <= keys:
        return "prompt", None, "response"
    if {"instruction", "output"} <= keys:
        return "instruction", "input", "output"
    raise StageError(f"{path}: cannot tell prompt from response in fields {sorted(keys)}; expected prompt/response "
                     "or instruction/input/output, or set data.prompt_field and data.response_field")


def load_examples(data: DataParams, path: Path, bad: BadRecords | None = None) -> list[Example]:
    bad = bad or BadRecords("fail")
    rows = read_rows(path, bad)
    if not rows:
        raise StageError(f"{path}: no usable examples")
    prompt_key, input_key, response_key = field_names(data, set(rows[0][1]), path)
    examples = []
    for source, record in rows:
        problem = None
        for key in (prompt_key, response_key):
            value = record.get(key)
            if value is None:
                problem = ("missing_field", f"field {key!r} is missing")
            elif not isinstance(value, str):
                problem = ("wrong_type", f"field {key!r} is {type(value).__name__}, expected a string")
            elif not value.strip():
                problem = ("empty_field", f"field {key!r} is empty")
            if problem:
                break
        context = record.get(input_key) if input_key else None
        if not problem and context is not None and not isinstance(context, str):
            problem = ("wrong_type", f"field {input_key!r} is {type(context).__name__}, expected a string")
        if problem:
            bad(source, *problem)
            continue
        prompt = f"{record[prompt_key]}\n\n{context}" if context and context.strip() else record[prompt_key]
        examples.append(Example(prompt=prompt, response=record[response_key], source=source))
    return examples


def split_examples(examples: list, validation_ratio: float, test_ratio: float, seed: int) -> dict[str, list]:
    """Seeded shuffle, then cut: the same seed and data always give the same split."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_test, n_val = round(len(order) * test_ratio), round(len(order) * validation_ratio)
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return {"train": [examples[i] for i in train], "validation": [examples[i] for i in val],
            "test": [examples[i] for i in test]}


def tokenize_example(example: Example, tokenizer, prepare: PrepareParams) -> tuple[dict | None, str]:
    """Token ids and labels with the prompt masked out; returns (record or None if dropped, 'ok'|'truncated'|reason).

    Prompt and response are tokenized separately and concatenated, so the mask boundary is exact whatever the
    tokenizer merges; EOS ends the response so the model learns to stop.
    """
    prompt_text = prepare.template.format(prompt=example.prompt)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    status = "ok"
    if len(prompt_ids) + len(response_ids) > prepare.max_length:
        if prepare.overlong == "drop":
            return None, "dropped_overlong"
        if len(prompt_ids) >= prepare.max_length:  # nothing of the response would be left to learn from
            return None, "prompt_too_long"
        response_ids = response_ids[:prepare.max_length - len(prompt_ids)]
        status = "truncated"
    record = {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        "prompt": prompt_text,
        "response": example.response,
        "source": example.source,
    }
    return record, status


def percentiles(lengths: list[int], prefix: str) -> dict[str, float]:
    if not lengths:
        return {}
    qs = np.percentile(lengths, [50, 90, 95, 99])
    return {f"{prefix}_p50": float(qs[0]), f"{prefix}_p90": float(qs[1]), f"{prefix}_p95": float(qs[2]),
            f"{prefix}_p99": float(qs[3]), f"{prefix}_max": int(max(lengths)),
            f"{prefix}_mean": round(float(np.mean(lengths)), 2)}


def run(params: Params, out_dir: Path = PREPARED_DIR) -> dict:
    data, prepare = params.data, params.prepare
    tokenizer = load_tokenizer(params.model)
    bad = BadRecords(data.on_bad_record)
    examples = load_examples(data, Path(data.path), bad)
    if data.validation_path or data.test_path:
        splits = split_examples(examples, 0 if data.validation_path else data.validation_ratio,
                                0 if data.test_path else data.test_ratio, data.seed)
        if data.validation_path:
            splits["validation"] = load_examples(data, Path(data.validation_path), bad)
        if data.test_path:
            splits["test"] = load_examples(data, Path(data.test_path), bad)
    else:
        splits = split_examples(examples, data.validation_ratio, data.test_ratio, data.seed)

    stats: dict = {}
    counts = {"truncated": 0, "dropped_overlong": 0}
    lengths: list[int] = []
    prepared = {}
    for name in SPLITS:
        records = []
        for example in progress(splits[name], total=len(splits[name]), desc=f"tokenize {name}"):
            record, status = tokenize_example(example, tokenizer, prepare)
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

    for name, records in prepared.items():
        write_jsonl(out_dir / f"{name}.jsonl", records)
    stats.update(counts)
    stats.update(bad.stats())
    stats.update(percentiles(lengths, "tokens"))
    stats["supervised_tokens_train"] = sum(sum(t != IGNORE_INDEX for t in r["labels"]) for r in prepared["train"])
    return stats


def main() -> None:
    params = load_params()
    stats = run(params)
    write_json(STATS_FILE, stats)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    run_main(main)
