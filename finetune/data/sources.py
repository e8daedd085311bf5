"""Raw data as a `datasets` Dataset on disk (Arrow, memory-mapped), so a million examples never sit in Python lists.

A JSONL file goes through Arrow's own JSON reader when it is clean; where that reader stops (invalid JSON or UTF-8,
a key given twice, a field whose type changes, an integer longer than Python reads) or its rows would not be the
file's lines (blank lines, two objects on one line), the file is read again line by line by finetune.data.records,
whose error names the line. Either way each record keeps its source,
"file:line" (or "file:record N" for typed formats), for bad-record reports and the predictions. Parquet, Arrow
and dataset folders (hub-style folders of data files, or `save_to_disk` output) load through `datasets`.
"""

from __future__ import annotations

import json
import mmap
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune.data.records import BadRecords, check_data_path, iter_json_lines, read_rows
from finetune.errors import StageError

BATCH = 10_000  # records per Arrow record batch written
_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")  # (an alternation with \A would make the search 20x slower)


@dataclass
class RawData:
    """The records of one data file. `encoded`: read record by record, as columns `source` and `record` (its JSON
    text, so records of differing shapes share one schema); else the file's own columns, and row i's source is
    `{path}:{i + 1}` (a JSONL line) or `{path}:record {i + 1}`."""
    path: Path
    dataset: object  # datasets.Dataset
    encoded: bool
    lines: bool = False

    def fields(self) -> list[str]:
        """The first record's fields (with a value: Arrow gives a record the null fields other records have), by
        which the format is recognized, whichever reader read it."""
        if not len(self.dataset):
            return []
        first = json.loads(self.dataset[0]["record"]) if self.encoded else self.dataset[0]
        return [key for key, value in first.items() if value is not None or self.encoded]

    def rows(self, batch: dict, indices: list[int]) -> Iterator[tuple[str, dict]]:
        if self.encoded:
            yield from zip(batch["source"], map(json.loads, batch["record"]), strict=True)
            return
        keys = list(batch)
        where = f"{self.path}:" if self.lines else f"{self.path}:record "
        for j, i in enumerate(indices):
            yield where + str(i + 1), {k: batch[k][j] for k in keys}


def typed_dataset(path: Path, cache_dir: Path | None = None):
    """A Parquet or Arrow file, or a dataset folder, through `datasets` (the folder's train split)."""
    import datasets

    try:
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                loaded = datasets.load_from_disk(str(path))
                return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
            return datasets.load_dataset(str(path), split="train", cache_dir=cache_dir and str(cache_dir))
        return datasets.load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train",
                                     cache_dir=cache_dir and str(cache_dir))
    except (ValueError, OSError, KeyError) as err:  # no train split, unreadable files
        raise StageError(f"data.path: {path}: `datasets` cannot load it: {err}") from None


def read_raw(path: Path, bad: BadRecords, cache_dir: Path) -> RawData:
    """`path`'s records as a Dataset under `cache_dir` (a scratch folder the caller removes)."""
    check_data_path(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if path.is_dir() or path.suffix in (".parquet", ".arrow"):
        return RawData(path, typed_dataset(path, cache_dir), encoded=False)
    lines = line_count(path) if path.suffix == ".jsonl" else None
    if lines is not None:
        fast = arrow_json(path, cache_dir)
        if fast is not None and len(fast) == lines:  # else an object shares a line: row numbers are not lines
            return RawData(path, fast, encoded=False, lines=True)
    if path.suffix == ".jsonl" or (path.suffix == ".json" and not json_array(path)):
        records = iter_json_lines(path, bad)
    else:  # a JSON array or CSV: read whole, record by record
        records = iter(read_rows(path, bad))
    file = cache_dir / f"{path.name}.records.arrow"
    if not write_arrow(file, ({"source": s, "record": json.dumps(r)} for s, r in records),
                       {"source": "string", "record": "string"}):
        raise StageError(f"{path}: no usable examples")
    return RawData(path, open_arrow(file), encoded=True)


def line_count(path: Path) -> int | None:
    """The file's lines, or None when a blank line would make Arrow's row numbers differ from line numbers."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if _BLANK_LINE.search(data) is not None or re.match(rb"[ \t\r]*\n", data) is not None:
            return None
        newlines = sum(data[at:at + (1 << 24)].count(b"\n") for at in range(0, len(data), 1 << 24))
        return newlines + (data[-1:] != b"\n")


def json_array(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8-sig", "replace").lstrip()
    return head.startswith("[")


def arrow_json(path: Path, cache_dir: Path):
    """The JSONL file through Arrow's JSON reader, streamed into an Arrow file; None where that reader stops."""
    import pyarrow as pa
    import pyarrow.json as pj

    file = cache_dir / f"{path.name}.arrow"
    try:
        reader = pj.open_json(str(path), read_options=pj.ReadOptions(block_size=1 << 22))
        with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_stream(sink, reader.schema) as writer:
            for batch in reader:
                batch.validate(full=True)  # the reader passes invalid UTF-8 through; this finds it
                writer.write_batch(batch)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError):
        # invalid JSON or UTF-8, a duplicate key, a type that changes: read line by line to say where
        file.unlink(missing_ok=True)
        return None
    if any(numeric(field.type) for field in reader.schema) and long_number(path):
        file.unlink(missing_ok=True)  # Arrow reads it as a float; Python refuses it, and says where
        return None
    return open_arrow(file)


def numeric(kind) -> bool:
    import pyarrow as pa

    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return True
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return numeric(kind.value_type)
    return pa.types.is_struct(kind) and any(numeric(kind.field(i).type) for i in range(kind.num_fields))


def long_number(path: Path) -> bool:
    """Whether the file holds an integer longer than Python converts (sys.int_info.default_max_str_digits)."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return re.search(rb"[0-9]{%d}" % (sys.int_info.default_max_str_digits + 1), data) is not None


def write_arrow(path: Path, rows: Iterable[dict], types: dict[str, str]) -> int:
    """Rows to an Arrow stream file (what `datasets` memory-maps), BATCH at a time; returns the count."""
    import pyarrow as pa

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in types.items()])
    count = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch: list[dict] = []
        for row in rows:
            batch.append(row)
            if len(batch) == BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
                count, batch = count + len(batch), []
        if batch:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
            count += len(batch)
    return count


def open_arrow(path: Path):
    """A Dataset memory-mapped from an Arrow stream file."""
    import datasets

    return datasets.Dataset.from_file(str(path))
