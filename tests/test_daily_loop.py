"""What a user meets every day: metric directions, the headline, quiet one-line output, the base model's identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, argument, stage_arguments

from finetune import metrics as M
from finetune.config.evaluate import EvaluateParams
from finetune.identity import identity
from finetune.io import markdown_table
from finetune.tasks.causal_lm import score
from finetune.training.progress import progress_line, rough_duration
from tools.review import summary_line


def declared_metric_files(root: Path) -> list[Path]:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return [root / next(iter(entry)) if isinstance(entry, dict) else root / entry
            for stage in stages.values() for entry in stage.get("metrics", [])]


def numeric_keys(data, prefix: str = "") -> list[str]:
    if isinstance(data, dict):
        return [k for key, value in data.items() for k in numeric_keys(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if isinstance(data, int | float) else []


def undeclared(root: Path) -> list[str]:
    missing = []
    for path in declared_metric_files(root):
        for key in numeric_keys(json.loads(path.read_text())):
            try:
                M.direction(key)
            except KeyError:
                missing.append(f"{path.relative_to(root)}:{key}")
    return missing


def test_every_metric_the_pipeline_wrote_has_a_direction():
    """The committed metric files are the default pipeline's real output (test_lock checks they match the code)."""
    files = declared_metric_files(ROOT)
    assert {p.name for p in files} >= {"headline.json", "compare.json", "prepare.json", "train.json",
                                       "eval_base.json", "eval_finetuned.json", "merge.json"}
    assert undeclared(ROOT) == []


def test_label_metrics_have_directions_and_lead_the_headline():
    """Label answers add label_* metrics: evaluate's own scoring of a labelled test split."""
    references = ["positive", "negative"] * 10
    scored = score(["positive"] * 20, references, EvaluateParams(labels="auto"))
    assert {"label_accuracy", "label_f1", "label_unparseable"} <= set(scored)
    assert all(M.direction(k) for k in scored)
    assert M.direction("label_accuracy") == "higher" and M.direction("label_unparseable") == "lower"


def test_an_undeclared_metric_is_an_error():
    with pytest.raises(KeyError, match="no declared direction"):
        M.direction("finetuned.some_new_score")


@pytest.mark.parametrize("key,gates", [
    ("finetuned.exact_match", True), ("finetuned.eval_loss", True), ("training.best_eval_loss", True),
    ("training.summary.eval_loss.min", False), ("training.summary.elapsed_s.max", False),
    ("training.train_time_s", False), ("training.wall_time_s", False), ("training.tokens_per_second", False),
    ("training.peak_memory_mb", False), ("training.epochs", False), ("training.steps", False),
    ("prepared.train_examples", False), ("prepared.bad_records", True)])
def test_only_quality_metrics_gate_by_default(key, gates):
    assert M.gates(key) is gates


def test_costs_say_which_way_is_better():
    assert M.better_when("training.tokens_per_second") == "higher"
    assert M.better_when("training.summary.elapsed_s.last") == "lower"
    assert M.better_when("training.epochs") == "neutral"


def test_metric_files_nest_under_one_key_and_read_back_flat():
    nested = M.nest("training", {"steps": 3})
    assert nested == {"training": {"steps": 3}}
    assert M.unnest(nested) == {"steps": 3}
    assert M.unnest({"steps": 3}) == {"steps": 3}  # written before the grouping, or the flat headline
    with pytest.raises(KeyError, match="no metric group 'train'"):
        M.nest("train", {"steps": 3})


def test_the_headline_file_is_small_and_flat():
    headline = json.loads((ROOT / argument("compare", "--headline")).read_text())
    assert list(headline) == [k for k in M.HEADLINE if k in headline] and len(headline) >= 4
    assert all(isinstance(v, int | float) for v in headline.values())
    finetuned = M.unnest(json.loads((ROOT / argument("evaluate", "--metrics")).read_text()))
    assert all(headline[k] == finetuned[k] for k in headline)


def test_every_declared_group_is_dropped_by_the_readme_pattern():
    import re

    drop = re.compile(M.DIAGNOSTICS_DROP)
    for group in set(M.GROUPS) - {"merged"}:  # eval_merged.json is not a DVC metric
        assert drop.match(f"{group}.anything")
    for kept in ("exact_match", "bleu", "rougeL", "eval_loss", "train.learning_rate", "lora.r", "Experiment"):
        assert not drop.match(kept)
    assert "--drop '" + M.DIAGNOSTICS_DROP + "'" in (ROOT / "README.md").read_text()


def test_the_review_summary_is_one_short_line():
    rows = [{"name": f"metric_{i}", "base": 1.0 * i, "new": 2.0 * i} for i in range(40)]
    line = summary_line(rows, Path("review/review.md"))
    assert "\n" not in line and len(line) < 200 and "(+37 more)" in line


def test_step_lines_round_the_time_left():
    record = {"train/loss": 0.5, "train/learning_rate": 1e-3, "train/elapsed_s": 8.0}
    assert progress_line(80, 320, record, left=24.0) == \
        "step 80/320 (25%): loss 0.5000, lr 0.001, 8s elapsed, ~25s left"
    assert progress_line(320, 320, record, left=0.0).endswith("8s elapsed")
    assert [rough_duration(s) for s in (3, 42, 61, 250, 426, 3600)] == \
        ["~5s", "~40s", "~1 min", "~4.2 min", "~7.1 min", "~60 min"]


def test_base_model_identity_follows_the_files(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    cache: dict = {}
    first = identity(str(folder), None, cache)
    assert first["source"] == "folder" and list(first["files"]) == ["model.safetensors"]
    assert identity(str(folder), None, cache) == first
    (folder / "model.safetensors").write_bytes(b"other weights")  # overwritten in place
    assert identity(str(folder), None, cache) != first
    assert identity("Qwen/Qwen2.5-0.5B", "abc123", {}) == \
        {"model_name": "Qwen/Qwen2.5-0.5B", "source": "hub", "revision": "abc123"}


def test_a_hub_model_that_cannot_be_fetched_is_one_line(workdir):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["model"]["model_name"] = "no-such-org/no-such-model"
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(workdir / "hf-home"),
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "stages.prepare", *stage_arguments("prepare")], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: model.model_name: cannot fetch no-such-org/no-such-model: ")
    assert "HF_HUB_OFFLINE is set" in lines[0] and "local copy" in lines[0] and "HF_TOKEN" in lines[0]
    assert not (workdir / "data/prepared").exists()


def test_every_stage_that_loads_the_base_model_depends_on_its_identity():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    loaders = {"prepare", "train", "evaluate_base", "evaluate", "merge"}
    assert {name for name, stage in stages.items() if "models/base_model.json" in stage.get("deps", [])} == loaders
    assert stages["base_model"]["always_changed"] is True
    assert list(stages)[0] == "compare"  # its headline.json leads `dvc exp show`


def test_markdown_tables_have_one_shape():

    assert markdown_table(["metric", "value", ""], [["bleu", 90.8, ""], ["a|b", 1, "↑"]], "lr") == [
        "| metric | value | |", "|---|--:|---|", "| bleu | 90.8 | |", "| a|b | 1 | ↑ |"]
