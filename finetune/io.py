"""Files written atomically (readers never see half a file), JSONL read back, Markdown tables, progress lines."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)

os.umask(_UMASK)


def write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode open() would have
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path | str, data: Any) -> None:
    write_text(Path(path), json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path | str, rows: Iterable[dict]) -> None:
    write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path | str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], align: str = "") -> list[str]:
    """A GitHub Markdown table, as lines; `align` holds one letter per column, l, c or r (missing ones: l)."""
    marks = {"l": "---", "c": ":-:", "r": "--:"}

    def line(cells: Sequence) -> str:
        return "|" + "|".join(f" {cell} " if str(cell) else " " for cell in cells) + "|"

    return [line(header), "|" + "|".join(marks[a] for a in align.ljust(len(header), "l")) + "|", *map(line, rows)]


def progress(iterable, total: int, desc: str):
    """A tqdm bar on a terminal; in a log file, a plain line at every 10% instead of thousands of redraws."""
    from tqdm.auto import tqdm

    if sys.stderr.isatty():
        yield from tqdm(iterable, total=total, desc=desc)
        return
    marks = {max(1, round(total * k / 10)) for k in range(1, 11)}
    started = time.perf_counter()
    for i, item in enumerate(iterable, 1):
        yield item
        if i in marks:
            print(f"{desc}: {i}/{total} ({time.perf_counter() - started:.1f}s)", file=sys.stderr, flush=True)
