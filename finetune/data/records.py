"""Raw examples from the files `datasets` formats name (JSONL, JSON, CSV, Parquet...): fields recognized or named by
params.data, and every bad record reported by file and line (or skipped and counted, with data.on_bad_record: skip)."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune.config.data import DataParams
from finetune.data.text import SURROGATE, Problem
from finetune.errors import StageError


@dataclass
class Example:
    prompt: str  # the instruction (plus input), before templating
    response: str
    source: str  # "file:line" (or "file:row N") it came from, for error messages and traceability


BAD_KINDS = ("invalid_utf8", "invalid_json", "not_an_object", "duplicate_key", "field_count", "missing_field",
             "empty_field", "wrong_type", "invalid_conversation", "prompt_too_long")

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
    return list(iter_json_lines(path, bad))


def iter_json_lines(path: Path, bad: BadRecords) -> Iterator[tuple[str, dict]]:
    """(source, record) of each line, read as it goes: a bad line is reported with its number."""
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
                yield source, record


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


SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")


def check_data_path(path: Path) -> None:
    """Refuse a path that holds no data file (or dataset folder) before anything is read."""
    if not path.exists():
        raise StageError(f"data.path: {path} does not exist")
    if path.is_dir():
        if not any(p.suffix in SUFFIXES or p.name == "dataset_info.json" for p in path.rglob("*")):
            raise StageError(f"data.path: {path} is a folder with no data files (.jsonl, .json, .csv, .tsv, "
                             ".parquet or .arrow) that `datasets` could load")
        return
    if path.stat().st_size == 0:
        raise StageError(f"{path}: no examples (empty file)")
    if path.suffix not in SUFFIXES:
        raise StageError(f"data.path: {path}: unsupported file type {path.suffix!r} "
                         "(use .jsonl, .json, .csv, .tsv, .parquet or .arrow, or a dataset folder)")


def read_rows(path: Path, bad: BadRecords) -> list[tuple[str, dict]]:
    """(location, record) pairs. JSONL, JSON and CSV are read by this module, so problems name the line (and the
    record of a JSON array); Parquet, Arrow and dataset folders, whose columns are typed, through `datasets`."""
    check_data_path(path)
    if path.is_dir() or path.suffix in (".parquet", ".arrow"):
        from finetune.data.sources import typed_dataset

        table = typed_dataset(path)
        return [(f"{path}:record {i + 1}", dict(r)) for i, r in enumerate(table)]
    if path.suffix == ".json" or path.suffix in (".csv", ".tsv"):
        text = path.read_bytes().decode("utf-8-sig", "surrogateescape")  # utf-8-sig: a BOM, as Excel writes
        if path.suffix != ".json":
            return read_csv(path, text, bad)
        if text.lstrip().startswith("["):
            return read_json_array(path, text, bad)
    return read_json_lines(path, bad)


def field_names(data: DataParams, keys: set[str] | list[str], path: Path) -> tuple[str, str | None, str]:
    """(prompt, input or None, response) field names: from params, else recognized from the record's keys."""
    keys = set(keys)
    if data.prompt_field:
        return data.prompt_field, data.input_field, data.response_field
    if {"prompt", "response"} <= keys:
        return "prompt", None, "response"
    if {"instruction", "output"} <= keys:
        return "instruction", "input", "output"
    raise StageError(f"{path}: cannot tell prompt from response in fields {sorted(keys)}; expected prompt/response "
                     "or instruction/input/output, messages (role/content) or conversations (from/value), or set "
                     "data.prompt_field and data.response_field, or data.messages_field")


def pair_of(record: dict, fields: tuple[str, str | None, str]) -> tuple[tuple[str, str] | None, Problem | None]:
    """((prompt, response), None) of a record, or (None, (kind, problem)) when it is a bad record."""
    prompt_key, input_key, response_key = fields
    for key in (prompt_key, response_key):
        value = record.get(key)
        if value is None:
            return None, ("missing_field", f"field {key!r} is missing")
        if not isinstance(value, str):
            return None, ("wrong_type", f"field {key!r} is {type(value).__name__}, expected a string")
        if not value.strip():
            return None, ("empty_field", f"field {key!r} is empty")
        if SURROGATE.search(value):
            return None, ("invalid_utf8", f"field {key!r} holds invalid UTF-8 (or an unpaired surrogate escape)")
    context = record.get(input_key) if input_key else None
    if context is not None and not isinstance(context, str):
        return None, ("wrong_type", f"field {input_key!r} is {type(context).__name__}, expected a string")
    if context and SURROGATE.search(context):
        return None, ("invalid_utf8", f"field {input_key!r} holds invalid UTF-8 (or an unpaired surrogate escape)")
    prompt = f"{record[prompt_key]}\n\n{context}" if context and context.strip() else record[prompt_key]
    return (prompt, record[response_key]), None


def load_examples(data: DataParams, path: Path, bad: BadRecords | None = None) -> list[Example]:
    """The prompt/response examples of a (small) file, in memory; the prepare stage reads through
    finetune.data.sources instead, into Arrow."""
    bad = bad or BadRecords("fail")
    rows = read_rows(path, bad)
    if not rows:
        raise StageError(f"{path}: no usable examples")
    fields = field_names(data, set(rows[0][1]), path)
    examples = []
    for source, record in rows:
        pair, problem = pair_of(record, fields)
        if problem:
            bad(source, *problem)
            continue
        examples.append(Example(prompt=pair[0], response=pair[1], source=source))
    return examples
