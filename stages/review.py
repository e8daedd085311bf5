"""review: one Markdown report of what a change does to the pipeline's results, for a pull request.

    python -m stages.review                          # the workspace against main
    python -m stages.review --base v1.2 --exp lora-search-3 --out review.md
    python -m stages.review --threshold exact_match=0.5 --threshold eval_loss=0.01

Compares a base git ref (default `main`) with the workspace or an experiment: the params that changed
(`dvc params diff`); every metric with base, new, delta and an arrow saying whether the change is good (lower is
better for losses and perplexity, higher for the rest; see stages.metrics.direction); regressions worse than their
threshold flagged; the training loss curves of both, rendered from DVC's own Vega-Lite plot (`dvc plots diff`) to
PNG with vl-convert; and test examples whose predictions differ. Exits 1 when a regression is flagged, so CI can
gate on it; 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from stages import metrics as M
from stages.common import StageError, read_jsonl, run_main, write_text

PREDICTIONS = "outputs/predictions_finetuned.jsonl"
LOSS_PLOT = "loss"


def dvc_json(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "dvc", *args, "--json"], capture_output=True, text=True, check=False)
    if done.returncode:
        raise StageError(f"dvc {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return json.loads(done.stdout or "{}")


def revision(exp: str | None) -> list[str]:
    return [exp] if exp else []


def metric_rows(base: str, exp: str | None, thresholds: dict[str, float], default_threshold: float) -> list[dict]:
    """Every numeric metric of both revisions (compare.json is left out: it restates the eval files)."""
    diff = dvc_json("metrics", "diff", base, *revision(exp), "--all")
    rows = []
    for path, found in sorted(diff.items()):
        if path.endswith("compare.json"):
            continue
        for key, change in sorted(found.items()):
            old, new = change.get("old"), change.get("new")
            if not any(isinstance(v, int | float) and not isinstance(v, bool) for v in (old, new)):
                continue
            name = M.base_name(key)
            direction = M.direction(name)
            numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (old, new))
            delta = new - old if numeric else None
            worse = bool(delta) and ((direction == "higher" and delta < 0) or (direction == "lower" and delta > 0))
            threshold = thresholds.get(name, thresholds.get(f"{path}:{key}"))
            if threshold is None and name not in M.PERFORMANCE:
                threshold = default_threshold
            rows.append({"file": path, "metric": key, "base": old, "new": new, "delta": delta,
                         "direction": direction, "better": None if not delta or direction == "neutral" else not worse,
                         "regression": bool(worse and threshold is not None and abs(delta) > threshold + 1e-12),
                         "threshold": threshold})
    return rows


def arrow(row: dict) -> str:
    if row["delta"] is None or row["delta"] == 0 or row["direction"] == "neutral":
        return "→"
    up = "↑" if row["delta"] > 0 else "↓"
    return f"{up} {'better' if row['better'] else 'worse'}"


def number(value) -> str:
    return "—" if value is None else f"{value:.6g}"


def params_table(base: str, exp: str | None) -> list[str]:
    diff = dvc_json("params", "diff", base, *revision(exp))
    lines = []
    for path, found in sorted(diff.items()):
        for key, change in sorted(found.items()):
            lines.append(f"| `{key}` | {change.get('old')} | {change.get('new')} |")
    if not lines:
        return ["No params changed."]
    return ["| param | base | new |", "|---|---|---|", *lines]


def loss_plot(base: str, exp: str | None, out_dir: Path) -> Path | None:
    """DVC's own rendering of the `loss` plot for both revisions (a Vega-Lite spec holding their data), as PNG."""
    import vl_convert

    shown = dvc_json("plots", "diff", base, *revision(exp))
    shown = shown.get("data", shown)  # {"data": {plot id: [renderers]}, "errors": ...}
    specs = [entry["content"] for entry in shown.get(LOSS_PLOT, []) if entry.get("type") == "vega"]
    if not specs:
        return None
    path = out_dir / "loss.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(vl_convert.vegalite_to_png(specs[0], scale=2))
    return path


def read_at(rev: str | None, path: str) -> list[dict] | None:
    """A JSONL output at a git revision, through DVC (it lives in the DVC cache, not in git)."""
    import dvc.api

    try:
        text = dvc.api.read(path, rev=rev) if rev else Path(path).read_text(encoding="utf-8")
    except Exception as err:  # noqa: BLE001 - DVC raises many kinds for "not there at that revision"
        print(f"note: {path} at {rev or 'workspace'} is not available ({type(err).__name__}); "
              "no example diff", file=sys.stderr)
        return None
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def differing_examples(base: str, exp: str | None, limit: int) -> list[str]:
    old, new = read_at(base, PREDICTIONS), read_at(exp, PREDICTIONS) if exp else None
    if exp is None and Path(PREDICTIONS).exists():
        new = read_jsonl(Path(PREDICTIONS))
    if not old or not new:
        return ["Predictions are not available for both revisions."]
    before = {row["prompt"]: row for row in old}  # by prompt: a reordered or resized test split still pairs up
    pairs = [(before[b["prompt"]], b) for b in new
             if b["prompt"] in before and before[b["prompt"]]["prediction"] != b["prediction"]]
    lines = [f"{len(pairs)} of {len(new)} test predictions differ; the first {min(limit, len(pairs))}:", "",
             "| prompt | reference | base | new |", "|---|---|---|---|"]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")[:160]

    for a, b in pairs[:limit]:
        lines.append(f"| {cell(a['prompt'].strip())} | {cell(a['reference'])} | {cell(a['prediction'])} | "
                     f"{cell(b['prediction'])} |")
    return lines


def report(base: str, exp: str | None, thresholds: dict[str, float], out: Path, examples: int,
           image_url: str | None = None, default_threshold: float = 0.0) -> tuple[str, list[dict]]:
    rows = metric_rows(base, exp, thresholds, default_threshold)
    regressions = [r for r in rows if r["regression"]]
    new = exp or "workspace"
    lines = [f"## Fine-tuning review: `{new}` vs `{base}`", ""]
    lines.append(f"**{len(regressions)} regression(s) flagged**" if regressions else "No regressions flagged.")
    lines += ["", "### Params", "", *params_table(base, exp), "", "### Metrics", ""]
    header = ["| file | metric | base | new | delta | |", "|---|---|---|---|---|---|"]

    def line(r: dict) -> str:
        flag = f" ⚠ regression (threshold {r['threshold']:g})" if r["regression"] else ""
        return (f"| {r['file']} | {r['metric']} | {number(r['base'])} | {number(r['new'])} | {number(r['delta'])} | "
                f"{arrow(r)}{flag} |")

    changed = [r for r in rows if r["delta"] != 0]
    same = [r for r in rows if r["delta"] == 0]
    lines += [*header, *map(line, changed)] if changed else ["No metric changed."]
    if same:
        lines += ["", f"<details><summary>{len(same)} unchanged metrics</summary>", "", *header, *map(line, same),
                  "", "</details>"]
    image = loss_plot(base, exp, out.parent / (out.stem + "_plots"))
    lines += ["", "### Training loss", ""]
    if image and image_url:  # a PR comment cannot embed a file: link to where CI keeps it
        lines.append(f"Loss curves: [{image.name}]({image_url}) (training and validation loss, {base} vs {new})")
    elif image:
        lines.append(f"![training and validation loss, {base} vs {new}]({image.relative_to(out.parent)})")
    else:
        lines.append("No loss plot at either revision.")
    lines += ["", "### Predictions that changed", "", *differing_examples(base, exp, examples), ""]
    text = "\n".join(lines)
    write_text(out, text)
    return text, regressions


def main() -> None:
    parser = argparse.ArgumentParser(description="Markdown review of a change's params, metrics, curves, outputs.")
    parser.add_argument("--base", default="main", help="git ref to compare against (default main)")
    parser.add_argument("--exp", default=None, help="an experiment name or git ref (default: the workspace)")
    parser.add_argument("--threshold", action="append", default=[], metavar="METRIC=VALUE",
                        help="allowed move in the wrong direction before METRIC is flagged as a regression")
    parser.add_argument("--default-threshold", type=float, default=0.0,
                        help="the same for every quality metric without its own (default 0: any worsening); "
                             "timings and memory are flagged only with a --threshold of their own")
    parser.add_argument("--examples", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("review/review.md"))
    parser.add_argument("--image-url", default=None,
                        help="link the loss PNG there instead of embedding it (a PR comment cannot hold files)")
    args = parser.parse_args()
    thresholds = {}
    for item in args.threshold:
        key, sep, value = item.partition("=")
        try:
            thresholds[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise StageError(f"--threshold {item!r}: expected METRIC=NUMBER, e.g. exact_match=0.5")
    text, regressions = report(args.base, args.exp, thresholds, args.out, args.examples, args.image_url,
                               args.default_threshold)
    print(text)
    if regressions:
        names = ", ".join(f"{r['metric']} ({number(r['base'])} → {number(r['new'])})" for r in regressions)
        print(f"regression: {names}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
