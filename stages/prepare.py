"""prepare: raw examples -> prompt-templated, tokenized, loss-masked train/validation/test splits.

    dvc repro prepare
    dvc exp run -S prepare.max_length=256 -S prepare.overlong=drop
    python -m stages.prepare                 # the same, without DVC

Reads params `data`, `prepare`, `model` (for the tokenizer) and `evaluate.labels`, `evaluate.max_labels` (whether the
answers are labels, whose shares a stratified split keeps: data.stratify). Writes
data/prepared/{train,validation,test}.jsonl (input_ids, labels with the prompt masked to -100, and the text fields
evaluate needs) and metrics/prepare.json (examples per split, token-length percentiles, dropped and truncated counts).
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from stages.common import IGNORE_INDEX, StageError, load_tokenizer, progress, run_main, write_json, write_jsonl
from stages.metrics import detect_labels, nest, normalize_label
from stages.outputs import refuse_foreign, replacing
from stages.params import DataParams, EvaluateParams, Params, PrepareParams, load_params

PREPARED_DIR = Path("data/prepared")
STATS_FILE = Path("metrics/prepare.json")
SPLITS = ("train", "validation", "test")
STEADY_TEST_EXAMPLES = 100  # fewer test examples: one more right answer moves exact match by over a point


@dataclass
class Example:
    prompt: str  # the instruction (plus input), before templating
    response: str
    source: str  # "file:line" (or "file:row N") it came from, for error messages and traceability


BAD_KINDS = ("invalid_utf8", "invalid_json", "not_an_object", "duplicate_key", "field_count", "missing_field",
             "empty_field", "wrong_type", "prompt_too_long")
CSV_FIELD_LIMIT = 16 * 2**20  # characters; a bigger CSV field is almost always an unclosed quote


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


class DuplicateKey(ValueError):
    pass


def _object(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object, refusing a key given twice (json would silently keep the last)."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        raise DuplicateKey(next(k for i, k in enumerate(keys) if k in keys[:i]))
    return dict(pairs)


STRICT_JSON = json.JSONDecoder(object_pairs_hook=_object)
_SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes (kept as surrogate escapes), or a lone \ud800
_SPACE = re.compile(r"[ \t\n\r]*")


def _json_record(text: str, source: str, bad: BadRecords, start: int = 0) -> tuple[dict | None, int]:
    """One JSON value from `text` at `start`: (the object, or None if it is a bad record, reported; its end).
    Invalid JSON raises ValueError (json.JSONDecodeError, or a number too long to convert) or RecursionError (too
    deeply nested) for the caller to place."""
    try:
        value, end = STRICT_JSON.raw_decode(text, start)
    except DuplicateKey as err:
        end = json.JSONDecoder().raw_decode(text, start)[1]  # invalid JSON after it: reported as that instead
        bad(source, "duplicate_key", f"the key {str(err)!r} appears twice in one object")
        return None, end
    if not isinstance(value, dict):
        bad(source, "not_an_object", f"expected a JSON object, got {type(value).__name__}")
        return None, end
    return value, end


def read_json_lines(path: Path, bad: BadRecords) -> list[tuple[str, dict]]:
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            source = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad(source, "invalid_utf8", f"invalid UTF-8 at byte {err.start} of the line")
                continue
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark, as Windows tools write
            if not line.strip():
                continue
            try:
                record, end = _json_record(line, source, bad, _SPACE.match(line).end())
            except (ValueError, RecursionError) as err:
                bad(source, "invalid_json", f"invalid JSON ({json_problem(err)})")
                continue
            if record is not None and line[end:].strip():
                bad(source, "invalid_json", f"invalid JSON (extra data at column {end + 1})")
            elif record is not None:
                rows.append((source, record))
    return rows


def read_json_array(path: Path, text: str, bad: BadRecords) -> list[tuple[str, dict]]:
    """A JSON array read element by element, so each record keeps its own types (none is retyped to fit the
    others) and each problem names its record and line. Invalid JSON stops the read: after it, where records
    begin cannot be known."""
    rows: list[tuple[str, dict]] = []
    line, counted = 1, 0

    def line_at(position: int) -> int:
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, position), position
        return line

    pos = _SPACE.match(text, text.index("[") + 1).end()
    index = 0
    while pos < len(text) and text[pos] != "]":
        index += 1
        source = f"{path}:{line_at(pos)} (record {index})"
        try:
            record, end = _json_record(text, source, bad, pos)
        except (ValueError, RecursionError) as err:
            where = err.lineno if isinstance(err, json.JSONDecodeError) else line_at(pos)
            raise StageError(f"{path}:{where}: invalid JSON in record {index} ({json_problem(err)}); the records "
                             "after it cannot be read, so fix it") from None
        if record is not None:
            rows.append((source, record))
        pos = _SPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos = _SPACE.match(text, pos + 1).end()
            if text.startswith("]", pos):
                raise StageError(f"{path}:{line_at(pos)}: a comma after the last record (JSON allows none)")
        elif not text.startswith("]", pos):
            raise StageError(f"{path}:{line_at(pos)}: expected ',' or ']' after record {index}")
    if pos >= len(text) or text[pos + 1:].strip():
        raise StageError(f"{path}:{line_at(min(pos, len(text)))}: the JSON array is not closed by a final ']'")
    return rows


def json_problem(err: Exception) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at column {err.colno}"
    return "nested too deeply" if isinstance(err, RecursionError) else str(err)


def read_csv(path: Path, text: str, bad: BadRecords) -> list[tuple[str, dict]]:
    """CSV or TSV records, each named by the line it starts on. A record with more or fewer fields than the header
    is a bad record (a stray delimiter would otherwise shift or cut its fields). Invalid UTF-8 is kept as escapes
    here and reported for the fields that are used (load_examples), so one bad byte costs one record, not the
    file."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix == ".tsv" else ",")
    rows: list[tuple[str, dict]] = []
    start = 0
    try:
        header = next((fields for fields in reader if fields), None)  # blank lines before it are skipped
        start = reader.line_num  # the header's last line
        if header and len(set(header)) < len(header):
            twice = sorted({name for name in header if header.count(name) > 1})
            raise StageError(f"{path}:{start}: the header names {', '.join(map(repr, twice))} more than once")
        for fields in reader if header else ():
            source, start = f"{path}:{start + 1}", reader.line_num
            if not fields:
                continue  # a blank line
            if len(fields) != len(header):
                bad(source, "field_count", f"{len(fields)} fields, the header has {len(header)} "
                    f"({', '.join(header)}); quote fields that hold the delimiter")
                continue
            rows.append((source, dict(zip(header, fields, strict=True))))
    except csv.Error as err:
        raise StageError(f"{path}:{start + 1}: {err} (limit {CSV_FIELD_LIMIT:,} characters; "
                         "an unclosed quote makes one field of the rest of the file)") from None
    return rows


def read_rows(path: Path, bad: BadRecords) -> list[tuple[str, dict]]:
    """(location, record) pairs. JSONL, JSON and CSV are read by this module, so problems name the line (and the
    record of a JSON array); Parquet and Arrow, whose columns are typed, through `datasets`."""
    if not path.exists():
        raise StageError(f"data.path: {path} does not exist")
    if path.is_dir():
        raise StageError(f"data.path: {path} is a folder; give a data file (.jsonl, .json, .csv, .tsv, .parquet "
                         "or .arrow)")
    if path.stat().st_size == 0:
        raise StageError(f"{path}: no examples (empty file)")
    if path.suffix not in (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow"):
        raise StageError(f"data.path: {path}: unsupported file type {path.suffix!r} "
                         "(use .jsonl, .json, .csv, .tsv, .parquet or .arrow)")
    if path.suffix in (".parquet", ".arrow"):
        import datasets

        table = datasets.load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train")
        return [(f"{path}:record {i + 1}", dict(r)) for i, r in enumerate(table)]
    if path.suffix == ".json" or path.suffix in (".csv", ".tsv"):
        text = path.read_bytes().decode("utf-8-sig", "surrogateescape")  # utf-8-sig: a BOM, as Excel writes
        if path.suffix != ".json":
            return read_csv(path, text, bad)
        if text.lstrip().startswith("["):
            return read_json_array(path, text, bad)
    return read_json_lines(path, bad)


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
            elif _SURROGATE.search(value):
                problem = ("invalid_utf8", f"field {key!r} holds invalid UTF-8 (or an unpaired surrogate escape)")
            if problem:
                break
        context = record.get(input_key) if input_key else None
        if not problem and context is not None and not isinstance(context, str):
            problem = ("wrong_type", f"field {input_key!r} is {type(context).__name__}, expected a string")
        elif not problem and context and _SURROGATE.search(context):
            problem = ("invalid_utf8", f"field {input_key!r} holds invalid UTF-8 (or an unpaired surrogate escape)")
        if problem:
            bad(source, *problem)
            continue
        prompt = f"{record[prompt_key]}\n\n{context}" if context and context.strip() else record[prompt_key]
        examples.append(Example(prompt=prompt, response=record[response_key], source=source))
    return examples


def split_examples(examples: list, validation_ratio: float, test_ratio: float, seed: int,
                   labels: list[str] | None = None) -> dict[str, list]:
    """Seeded shuffle, then cut: the same seed and data always give the same split. With `labels` (each example's),
    each label's examples are cut on their own (`stratified_counts`), so its share of every split is within one
    example of its share of the data; the splits keep their sizes."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_test, n_val = round(len(order) * test_ratio), round(len(order) * validation_ratio)
    if labels is None:
        test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    else:
        members: dict[str, list[int]] = {}  # each label's examples, in shuffled order
        for i in order:
            members.setdefault(labels[i], []).append(i)
        counts = stratified_counts({label: len(members[label]) for label in sorted(members)},
                                   (n_test, n_val, len(order) - n_test - n_val))
        test, val, train = [], [], []
        for label, (t, v, _) in counts.items():
            test += members[label][:t]
            val += members[label][t:t + v]
            train += members[label][t + v:]
        place = {i: p for p, i in enumerate(order)}
        test, val, train = (sorted(split, key=place.__getitem__) for split in (test, val, train))
    return {"train": [examples[i] for i in train], "validation": [examples[i] for i in val],
            "test": [examples[i] for i in test]}


def stratified_counts(label_counts: dict[str, int], sizes: tuple[int, int, int]) -> dict[str, list[int]]:
    """How many examples of each label go to each of three splits: its share of the split rounded down or up, so
    within one example of it, with the counts adding up to each label's total and to each split's size.

    Labels are taken in turn, each rounded up in the splits that are owed the most: what a label's share rounds
    away, plus what the labels before it left each split short (scikit-learn's stratified splits, applied twice,
    miss the one-example bound for a few percent of labels). That keeps every split's running shortfall within
    one example, so it ends at exactly zero."""
    total = sum(sizes)
    owed = [Fraction(0)] * len(sizes)  # per split: its share of the labels so far minus what it got, in (-1, 1)
    out = {}
    for label, count in label_counts.items():
        shares = [Fraction(size * count, total) for size in sizes]
        given = [math.floor(share) for share in shares]
        rounded_up = sorted((s for s in range(len(sizes)) if shares[s] > given[s]),
                            key=lambda s: shares[s] - given[s] + owed[s], reverse=True)
        for s in rounded_up[:count - sum(given)]:
            given[s] += 1
        owed = [o + share - g for o, share, g in zip(owed, shares, given, strict=True)]
        out[label] = given
    assert not any(owed), owed  # every split got exactly its size
    return out


def split_labels(responses: list[str], data: DataParams, evaluate: EvaluateParams) -> list[str] | None:
    """Each response's label, to stratify the split by, or None for the plain shuffle. data.stratify auto: when
    evaluate scores the answers as labels (evaluate.labels a list, or auto and `detect_labels` finds a small label
    set); true: also with evaluate.labels off, and the answers must be labels; false: never."""
    if data.stratify is False:
        return None
    if isinstance(evaluate.labels, list) or ((evaluate.labels == "auto" or data.stratify is True)
                                             and detect_labels(responses, evaluate.max_labels)):
        return [normalize_label(r) for r in responses]
    if data.stratify is True:
        distinct = len({normalize_label(r) for r in responses})
        raise StageError(f"data.stratify: true, but the responses are not a label set: {distinct} distinct answers "
                         f"in {len(responses)} examples (labels are 2 to evaluate.max_labels={evaluate.max_labels}, "
                         "each seen twice on average); list them in evaluate.labels, or set data.stratify: auto")
    return None


def rare_labels_warning(splits: dict[str, list[Example]]) -> str | None:
    """The labels some (non-empty) split holds none of: too rare to stratify, they get their share rounded, to 0."""
    have = {name: Counter(normalize_label(e.response) for e in split) for name, split in splits.items() if split}
    total = sum(have.values(), Counter())
    rare = {label: [name for name in SPLITS if name in have and not have[name][label]] for label in sorted(total)}
    rare = {label: missing for label, missing in rare.items() if missing}
    if not rare:
        return None
    listed = ", ".join(f"{label!r} ({total[label]}, none in {' or '.join(missing)})"
                       for label, missing in list(rare.items())[:5]) + (", ..." if len(rare) > 5 else "")
    return (f"{len(rare)} of {len(total)} labels are too rare for every split to hold one: {listed}; each split "
            "gets its share of a label rounded, here to 0")


def small_test_warning(n_test: int) -> str | None:
    """How noisy the test metrics are when the test split is small: the points one example is worth, and the 95%
    interval of a 50% exact match (binomial, the widest)."""
    if n_test >= STEADY_TEST_EXAMPLES:
        return None
    return (f"the test split has {n_test} examples: each is {100 / n_test:.1f} points of exact match, and a 50% "
            f"exact match is +/-{196 * math.sqrt(0.25 / n_test):.0f} points (95% interval); "
            f"{STEADY_TEST_EXAMPLES}+ examples bring that to +/-10 (raise data.test_ratio or give data.test_path)")


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
    """Read, split and tokenize; the splits are written to a temporary folder that replaces `out_dir` in one
    rename, so the three files always come from one run."""
    data, prepare = params.data, params.prepare
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


def main() -> None:
    params = load_params()
    stats = run(params)
    write_json(STATS_FILE, nest(STATS_FILE, stats))
    print(f"prepared {stats['train_examples']} training, {stats['validation_examples']} validation and "
          f"{stats['test_examples']} test examples ({stats['truncated']} truncated, {stats['dropped_overlong']} "
          f"dropped, {stats['bad_records']} bad records skipped); every count in {STATS_FILE}")


if __name__ == "__main__":
    run_main(main)
