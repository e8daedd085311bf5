"""The plots dvc.yaml declares for the evaluation: the base-vs-fine-tuned bars and, on label data, the confusion
matrices, drawn by `dvc plots show` from the pipeline's own dvc.yaml and .dvc/config and opened in headless Chromium
with no network: the page template (plots/page.html) inlines Vega, Vega-Lite and Vega-Embed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import browser
import pytest
from build_plots_page import page_html, template_path
from conftest import ROOT, copy_dvc_config

from finetune.comparison import bar_rows, compare
from finetune.config.evaluate import EvaluateParams
from finetune.tasks.causal_lm import confusion_rows

pytestmark = pytest.mark.skipif(not browser.chromium() and os.environ.get("REQUIRE_BROWSER") != "1",
                                reason="no Chromium (apt-get install chromium)")


def test_label_data_gets_confusion_matrices_and_the_scores_get_bars(tmp_path):
    repo = tmp_path / "repo"
    (repo / "stages").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", "stages/compare_bars.json"):
        shutil.copy(ROOT / name, repo / name)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    copy_dvc_config(repo)
    references = ["positive", "negative", "neutral"] * 10
    predictions = {"base": ["positive"] * 30, "finetuned": references[:-3] + ["negative", "maybe", "positive"]}
    for model, predicted in predictions.items():
        rows = confusion_rows(predicted, references, EvaluateParams())
        (repo / f"metrics/confusion_{model}.json").parent.mkdir(exist_ok=True)
        (repo / f"metrics/confusion_{model}.json").write_text(json.dumps(rows))
    table = compare({"exact_match": 33.3, "label_accuracy": 0.333}, {"exact_match": 90.0, "label_accuracy": 0.9})
    (repo / "metrics/compare_scores.json").write_text(json.dumps(bar_rows(table)))

    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show"], cwd=repo, env=env, capture_output=True,
                           text=True, check=True)  # the training plots' files are missing here: DVC skips them
    page = Path(shown.stdout.strip().splitlines()[-1].removeprefix("file://"))
    assert "<script src" not in page.read_text(encoding="utf-8")  # DVC's CDN tags: the template has no {scripts}
    elsewhere = tmp_path / "elsewhere"  # the libraries are in the page, not beside it: the same page anywhere
    subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(elsewhere)], cwd=repo, env=env,
                   capture_output=True, check=True)
    assert (elsewhere / "index.html").read_text(encoding="utf-8") == page.read_text(encoding="utf-8")
    plots, errors = browser.render(page, tmp_path / "plots.png")
    assert errors == []  # a network request, refused, would be one
    with_data = browser.plots_with_data(page)
    assert {"metrics_confusion_base_json", "metrics_confusion_finetuned_json", "metrics_compare_scores_json"} \
        <= set(with_data)
    for plot_id in ("metrics_confusion_base_json", "metrics_confusion_finetuned_json",
                    "metrics_compare_scores_json"):
        drawn, coloured = plots[plot_id]
        assert drawn > 3000 and coloured > 1000, (plot_id, plots[plot_id])  # cells and bars in colour


def test_the_committed_page_template_is_what_the_script_builds():
    assert template_path(ROOT).read_text(encoding="utf-8") == page_html()


def test_the_browser_refuses_and_reports_every_network_request(tmp_path):
    page = tmp_path / "page.html"
    page.write_text('<script src="https://cdn.jsdelivr.net/npm/vega@5.33.1"></script>'
                    '<script>fetch("http://example.com/data.json").catch(() => {})</script>')
    _, errors = browser.render(page, tmp_path / "page.png")
    requests = [e for e in errors if e.startswith("network request:")]
    assert requests == ["network request: GET https://cdn.jsdelivr.net/npm/vega@5.33.1",
                        "network request: GET http://example.com/data.json"]
