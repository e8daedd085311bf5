"""Bad params stop every stage that reads them before it loads anything: one message naming each problem, exit 2, no
output touched. A stage that does not read a section is not stopped by it (dvc.yaml says which stage reads which)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from conftest import stage_argv, stage_main, stage_params

from finetune.entrypoint import run_main

STAGES = ("prepare", "train", "evaluate_base", "evaluate", "merge", "compare")
OUTPUTS = ["metrics/prepare.json", "metrics/train.json", "metrics/eval_finetuned.json", "metrics/merge.json",
           "metrics/compare.json",
           "data/prepared/train.arrow", "models/finetuned/adapter_model.safetensors",
           "models/merged/model.safetensors", "outputs/predictions_finetuned.jsonl"]

CASES = {
    "unknown key": ({"train": {"learnig_rate": 0.1}}, "train.learnig_rate: unknown key; did you mean "
                                                      "train.learning_rate?"),
    "negative learning rate": ({"train": {"learning_rate": -0.001}}, "train.learning_rate: -0.001 must be positive"),
    "rank zero": ({"lora": {"r": 0}}, "lora.r: 0 must be at least 1"),
    "dropout of one": ({"lora": {"lora_dropout": 1.0}}, "lora.lora_dropout: 1.0 is outside [0, 1)"),
    "split ratio over one": ({"data": {"test_ratio": 1.5}}, "data.test_ratio: 1.5 is outside [0, 1)"),
    "no checkpoints kept": ({"train": {"save_total_limit": 0}}, "train.save_total_limit: 0 must be at least 1"),
    "fp16 and bf16": ({"train": {"fp16": True, "bf16": True}}, "train.fp16 and train.bf16: both are true"),
    "no accumulation": ({"train": {"gradient_accumulation_steps": 0}},
                        "train.gradient_accumulation_steps: 0 must be at least 1"),
    "wrong type": ({"train": {"per_device_train_batch_size": "8"}},
                   "train.per_device_train_batch_size: '8' is not an integer"),
}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(workdir):
    """A workdir whose outputs exist, as after an earlier successful run."""
    for path in OUTPUTS:
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / path).write_text(f"earlier result: {path}\n")
    return workdir


def set_params(workdir: Path, changes: dict) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    for section, values in changes.items():
        params.setdefault(section, {}).update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize("case", CASES)
def test_bad_params_stop_every_stage_that_reads_them_and_touch_nothing(finished_run, case, capsys, monkeypatch):
    changes, message = CASES[case]
    set_params(finished_run, changes)
    before = snapshot(finished_run)
    readers = [name for name in STAGES if set(changes) & stage_params(name)]
    assert readers, case
    for name in readers:
        status, said = run_stage(name, monkeypatch, capsys)
        assert status == 2 and message in said, name
    assert snapshot(finished_run) == before
    for name in set(STAGES) - set(readers):  # may run, or fail on the fakes: never on a section it does not read
        status, said = run_stage(name, monkeypatch, capsys)
        assert message not in said, name


def run_stage(name: str, monkeypatch, capsys) -> tuple[int | None, str]:
    monkeypatch.setattr("sys.argv", stage_argv(name))
    capsys.readouterr()
    try:
        run_main(stage_main(name))
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    except Exception:  # noqa: BLE001 - a stage may fail on the fake outputs; what it said is what is checked
        status = None
    return status, capsys.readouterr().err


# What this machine cannot do: refused by the stage that trains, and by no other (compare runs with train.fp16 set).
HARDWARE_CASES = {
    "fp16 on cpu": ({"train": {"fp16": True}}, "train.fp16: true, but there is no CUDA device"),
    "qlora fp16 compute on cpu": ({"train": {"method": "qlora"}, "quantization": {"bnb_4bit_compute_dtype": "float16"}},
                                  "quantization.bnb_4bit_compute_dtype: float16 needs a CUDA device"),
}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="these requests are possible on a CUDA machine")
@pytest.mark.parametrize("case", HARDWARE_CASES)
def test_hardware_requests_stop_train_only(finished_run, case, capsys, monkeypatch):
    changes, message = HARDWARE_CASES[case]
    set_params(finished_run, changes)
    before = snapshot(finished_run)
    monkeypatch.setattr("sys.argv", stage_argv("train"))
    with pytest.raises(SystemExit) as exit_:
        run_main(stage_main("train"))
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert snapshot(finished_run) == before
    for name in ("compare", "evaluate", "merge", "prepare"):  # they pass the params check (then fail on the fake
        monkeypatch.setattr("sys.argv", stage_argv(name))  # outputs, or run): never for the hardware
        try:
            run_main(stage_main(name))
        except SystemExit:
            pass
        assert message not in capsys.readouterr().err, name


def test_compare_runs_with_fp16_set_on_a_cpu_machine(workdir, capsys, monkeypatch):
    set_params(workdir, {"train": {"fp16": True}})
    for model, value in (("base", 1.0), ("finetuned", 3.0)):
        (workdir / f"metrics/eval_{model}.json").parent.mkdir(exist_ok=True)
        (workdir / f"metrics/eval_{model}.json").write_text(json.dumps({model: {"exact_match": value}}))
    monkeypatch.setattr("sys.argv", stage_argv("compare"))
    run_main(stage_main("compare"))
    assert json.loads((workdir / "metrics/compare.json").read_text()) == {"delta": {"exact_match": 2.0}}
    assert json.loads((workdir / "metrics/headline.json").read_text()) == {"exact_match": 3.0}


def test_every_problem_is_reported_in_one_run(finished_run, capsys, monkeypatch):
    set_params(finished_run, {"train": {"learning_rate": -1, "save_total_limit": 0}, "lora": {"r": 0}})
    monkeypatch.setattr("sys.argv", stage_argv("train"))
    with pytest.raises(SystemExit):
        run_main(stage_main("train"))
    err = capsys.readouterr().err
    assert all(m in err for m in ("train.learning_rate", "train.save_total_limit", "lora.r"))


def test_compare_refuses_missing_inputs_without_writing(workdir, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", stage_argv("compare"))
    with pytest.raises(SystemExit) as exit_:
        run_main(stage_main("compare"))
    assert exit_.value.code == 2 and "metrics/eval_base.json not found" in capsys.readouterr().err
    assert not (workdir / "metrics/compare.json").exists()
