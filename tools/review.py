"""review: one Markdown report of what a change does to the pipeline's results, for a pull request.

    python -m tools.review                          # the workspace against main
    python -m tools.review --base v1.2 --exp lora-search-3 --out review.md
    python -m tools.review --threshold exact_match=0.5 --threshold eval_loss=0.01

Compares a git ref (`--base`, default `main`: "before") with the workspace or an experiment ("after"). The report
leads with a verdict and the headline metrics of the fine-tuned model, then the params that changed
(`dvc params diff`), then every other metric folded, each with before, after, change and an arrow saying whether
the change is good (the directions declared in finetune.metrics.DIRECTIONS); then the training loss curves of both,
rendered from DVC's own Vega-Lite plot (`dvc plots diff`) to PNG with vl-convert, and test examples whose
predictions differ. A quality metric that got worse by more than its threshold is a regression; timings, memory
and throughput only with a --threshold of their own; counts, settings and the training series' summary
statistics never. Prints one line; exits 1 when a regression is flagged, so CI can gate on it; 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from finetune import metrics as M
from finetune.entrypoint import run_main
from finetune.errors import StageError
from finetune.io import markdown_table, read_jsonl, write_text

PREDICTIONS = "outputs/predictions_finetuned.jsonl"
LOSS_PLOT = "loss"


def dvc_json(*args: str) -> dict:
    """A DVC command's --json output (the plots, which DVC renders in its command)."""
    done = subprocess.run([sys.executable, "-m", "dvc", *args, "--json"], capture_output=True, text=True, check=False)
    if done.returncode:
        raise StageError(f"dvc {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return json.loads(done.stdout or "{}")


def dvc_diff(kind: str, base: str, exp: str | None, everything: bool = False) -> dict:
    """`metrics` or `params` of two revisions (an experiment name, a git ref, or the workspace when None), through
    DVC's Python API: {file: {key: {"old", "new", "diff"}}}. A file DVC could not read at a revision is reported."""
    from dvc.repo import Repo

    with Repo() as repo:
        found = getattr(repo, kind).diff(a_rev=base, b_rev=exp or "workspace", all=everything)
    for rev, errors in (found.get("errors") or {}).items():
        print(f"warning: dvc could not read some {kind} at {rev}: {errors}", file=sys.stderr)
    return found.get("diff", {})


def revision(exp: str | None) -> list[str]:
    return [exp] if exp else []


def restated(key: str) -> bool:
    """The headline (its flat keys) and compare's deltas restate the eval files: each metric is shown and gated
    once. Any other key is shown, one of another pipeline version too (as undeclared)."""
    return key.startswith("delta.") or ("." not in key and key in M.HEADLINE)


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def metric_rows(base: str, exp: str | None, thresholds: dict[str, float], default_threshold: float) -> list[dict]:
    """Every numeric metric of both revisions, with the way it should move and whether its change is a regression:
    a quality metric that got worse by more than its threshold (default_threshold unless given one); a cost (time,
    memory, throughput) only when given a threshold of its own; descriptions and summary statistics never."""
    diff = dvc_diff("metrics", base, exp, everything=True)
    rows = []
    for path, found in sorted(diff.items()):
        for key, change in sorted(found.items()):
            if restated(key):
                continue
            old, new = change.get("old"), change.get("new")
            if not (is_number(old) or is_number(new)):
                continue
            name = M.base_name(key)
            try:
                way, gating = M.better_when(key), M.gates(key)
            except KeyError:  # a metric of another version of the pipeline: shown, never judged
                way, gating = "undeclared", False
            delta = new - old if is_number(old) and is_number(new) else None
            worse = bool(delta) and ((way == "higher" and delta < 0) or (way == "lower" and delta > 0))
            threshold = thresholds.get(name, thresholds.get(f"{path}:{key}"))
            if threshold is None and gating:
                threshold = default_threshold
            rows.append({"file": path, "metric": key, "name": name, "base": old, "new": new, "delta": delta,
                         "direction": way, "gates": gating,
                         "better": None if not delta or way not in ("higher", "lower") else not worse,
                         "regression": bool(worse and threshold is not None and abs(delta) > threshold + 1e-12),
                         "threshold": threshold})
    return rows


def arrow(row: dict) -> str:
    if row["delta"] is None or row["delta"] == 0 or row["better"] is None:
        return "→" if row["direction"] != "undeclared" else "? (no declared direction)"
    up = "↑" if row["delta"] > 0 else "↓"
    return f"{up} {'better' if row['better'] else 'worse'}"


def number(value) -> str:
    return "—" if value is None else f"{value:.6g}"


def params_table(base: str, exp: str | None, new_name: str) -> list[str]:
    diff = dvc_diff("params", base, exp)
    rows = [[f"`{key}`", change.get("old"), change.get("new")]
            for _, found in sorted(diff.items()) for key, change in sorted(found.items())]
    if not rows:
        return ["No params changed."]
    return markdown_table(["param", f"`{base}` (before)", f"`{new_name}` (after)"], rows)


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


def differing_examples(base: str, exp: str | None, new_name: str, limit: int) -> list[str]:
    old, new = read_at(base, PREDICTIONS), read_at(exp, PREDICTIONS) if exp else None
    if exp is None and Path(PREDICTIONS).exists():
        new = read_jsonl(Path(PREDICTIONS))
    if not old or not new:
        return ["Predictions are not available for both revisions."]
    def text(row: dict) -> str:  # a generator's prompt, a classifier's text
        return row["prompt"] if "prompt" in row else row["text"]

    before = {text(row): row for row in old}  # by prompt: a reordered or resized test split still pairs up
    pairs = [(before[text(b)], b) for b in new
             if text(b) in before and before[text(b)]["prediction"] != b["prediction"]]
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")[:160]

    rows = [[cell(text(a).strip()), cell(a["reference"]), cell(a["prediction"]), cell(b["prediction"])]
            for a, b in pairs[:limit]]
    return [(f"{len(pairs)} of {len(new)} test predictions of the fine-tuned model differ; the first "
             f"{min(limit, len(pairs))}:"), "",
            *markdown_table(["prompt", "reference", f"`{base}` (before)", f"`{new_name}` (after)"], rows)]


def change(row: dict) -> str:
    return f"{row['name']} {number(row['base'])} → {number(row['new'])}"


def verdict(rows: list[dict]) -> str:
    regressions = [r for r in rows if r["regression"]]
    if regressions:
        return f"**Verdict: {len(regressions)} regression(s)**: " + ", ".join(map(change, regressions))
    quality = [r for r in rows if r["gates"]]
    better = sum(r["better"] is True for r in quality)
    worse = sum(r["better"] is False for r in quality)
    tail = f", {worse} worse within threshold" if worse else ""
    return f"**Verdict: no regressions.** {better} quality metric(s) better{tail}, " \
           f"{sum(r['delta'] == 0 for r in quality)} unchanged."


def report(base: str, exp: str | None, thresholds: dict[str, float], out: Path, examples: int,
           image_url: str | None = None, default_threshold: float = 0.0) -> tuple[str, list[dict]]:
    rows = metric_rows(base, exp, thresholds, default_threshold)
    regressions = [r for r in rows if r["regression"]]
    new = exp or "workspace"
    def flag(r: dict) -> str:
        return f" ⚠ regression (threshold {r['threshold']:g})" if r["regression"] else ""

    def table(rows: list[dict]) -> list[str]:
        return markdown_table(["file", "metric", f"`{base}` (before)", f"`{new}` (after)", "change", ""],
                              [[r["file"], r["metric"], number(r["base"]), number(r["new"]), number(r["delta"]),
                                arrow(r) + flag(r)] for r in rows], "llrrrl")

    headline = sorted((r for r in rows if r["file"].endswith("eval_finetuned.json") and r["name"] in M.HEADLINE),
                      key=lambda r: M.HEADLINE.index(r["name"]))
    rest = [r for r in rows if r not in headline]
    changed, same = [r for r in rest if r["delta"] != 0], [r for r in rest if r["delta"] == 0]
    lines = [f"## Fine-tuning review: `{new}` (after) against `{base}` (before)", "", verdict(rows), "",
             "### Headline: the fine-tuned model on the test split", ""]
    if headline:
        lines += markdown_table(["metric", f"`{base}` (before)", f"`{new}` (after)", "change", ""],
                                [[r["name"], number(r["base"]), number(r["new"]), number(r["delta"]),
                                  arrow(r) + flag(r)] for r in headline], "lrrrl")
    else:
        lines.append("No evaluation of the fine-tuned model at either revision.")
    lines += ["", "### Params", "", *params_table(base, exp, new), "", "### Every other metric", ""]
    flagged = [r for r in changed if r["regression"]]
    if flagged:  # a regression is never folded away
        lines += [*table(flagged), ""]
    rest_changed = [r for r in changed if not r["regression"]]
    if rest_changed:
        lines += [f"<details><summary>{len(rest_changed)} changed (timings, memory, training summaries, "
                  "diagnostics)</summary>", "", *table(rest_changed), "", "</details>", ""]
    if same:
        lines += [f"<details><summary>{len(same)} unchanged</summary>", "", *table(same), "", "</details>"]
    image = loss_plot(base, exp, out.parent / (out.stem + "_plots"))
    lines += ["", "### Training loss", ""]
    if image and image_url:  # a PR comment cannot embed a file: link to where CI keeps it
        lines.append(f"Loss curves: [{image.name}]({image_url}) (training and validation loss, {base} vs {new})")
    elif image:
        lines.append(f"![training and validation loss, {base} vs {new}]({image.relative_to(out.parent)})")
    else:
        lines.append("No loss plot at either revision.")
    lines += ["", "### Predictions that changed", "", *differing_examples(base, exp, new, examples), ""]
    text = "\n".join(lines)
    write_text(out, text)
    return text, regressions


def summary_line(rows: list[dict], out: Path, limit: int = 3) -> str:
    """One short line for a terminal or a CI log; the report holds the rest."""
    named = ", ".join(map(change, rows[:limit])) + (f" (+{len(rows) - limit} more)" if len(rows) > limit else "")
    return f"{named}; report: {out}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Markdown review of a change's params, metrics, curves, outputs.")
    parser.add_argument("--base", default="main", help="git ref to compare against, the 'before' side (default main)")
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
    _, regressions = report(args.base, args.exp, thresholds, args.out, args.examples, args.image_url,
                            args.default_threshold)
    if regressions:
        print(f"regression: {summary_line(regressions, args.out)}", file=sys.stderr)
        sys.exit(1)
    print(f"review of {args.exp or 'the workspace'} against {args.base}: no regressions; report: {args.out}")


if __name__ == "__main__":
    run_main(main)
