"""The step history of a training run as DVCLive writes it (one TSV per series under plots/metrics/), read
back: single series, the summary statistics metrics/train.json holds, the records a tracker enabled mid-run is sent, and
the truncation a resumed run starts with."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from finetune.io import write_text

SERIES = {"train/loss": "train_loss", "eval/loss": "eval_loss", "train/learning_rate": "learning_rate",
          "train/grad_norm": "grad_norm", "train/tokens_per_second": "tokens_per_second", "train/epoch": "epoch",
          "train/elapsed_s": "elapsed_s"}  # series -> its key in metrics/train.json's summary


def read_series(live_dir: Path, series: str) -> list[tuple[int, float]]:
    """(step, value) rows of one DVCLive metric file; empty if it was never logged."""
    path = live_dir / "plots" / "metrics" / f"{series}.tsv"
    if not path.exists():
        return []
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    name = series.rsplit("/", 1)[-1]
    return [(int(r["step"]), float(r[name])) for r in rows]


def _row(line: str, width: int) -> tuple[int, ...] | None:
    """A complete TSV row's step (and values), or None for a row a kill cut short."""
    fields = line.rstrip("\n").split("\t")
    if not line.endswith("\n") or len(fields) != width:
        return None
    try:
        return (int(fields[0]), *(float(v) for v in fields[1:]))
    except ValueError:
        return None


def truncate_history(live_dir: Path, last_step: int) -> None:
    """Keep each DVCLive series up to `last_step` (the checkpoint a resumed run starts from), dropping the steps it
    will log again and whatever a kill cut short (a half-written row, an empty file, a torn metrics.json, which
    DVCLive rebuilds from the series)."""
    for path in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        header = lines[0].rstrip("\n").split("\t") if lines and lines[0].endswith("\n") else []
        if header[:1] != ["step"]:
            path.unlink()  # nothing complete in it; DVCLive writes a new header
            continue
        kept = [line for line in lines[1:] if (row := _row(line, len(header))) and row[0] <= last_step]
        write_text(path, "".join(lines[:1] + kept))
    (live_dir / "metrics.json").unlink(missing_ok=True)


def latest_values(live_dir: Path) -> dict:
    """DVCLive's summary (the last value of each series, nested by '/') rebuilt from the series files."""
    summary: dict = {}
    for path in sorted((live_dir / "plots" / "metrics").rglob("*.tsv")):
        series = path.relative_to(live_dir / "plots" / "metrics").with_suffix("").as_posix()
        rows = read_series(live_dir, series)
        if rows:
            *parents, leaf = series.split("/")
            node = summary
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = rows[-1][1]
    return summary


def summarize(live_dir: Path) -> dict[str, dict[str, float]]:
    """Mean, min, max and last of each tracked series: what `dvc exp show` can sort by (summary.eval_loss.min)."""
    out = {}
    for series, key in SERIES.items():
        values = [v for _, v in read_series(live_dir, series) if math.isfinite(v)]  # an fp16 overflow logs inf
        if values:
            stats = {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "last": values[-1]}
            out[key] = {stat: float(f"{v:.6g}") for stat, v in stats.items()}
    return out


def history(live_dir: Path) -> dict[int, dict[str, float]]:
    """Every series DVCLive holds, as one record per step (what a tracker enabled mid-run is first given)."""
    steps: dict[int, dict[str, float]] = {}
    for series in SERIES:
        for step, value in read_series(live_dir, series):
            steps.setdefault(step, {})[series] = value
    return dict(sorted(steps.items()))
