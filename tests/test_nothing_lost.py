"""Nothing lost, whatever the params or the data: each refusal exits non-zero with a message that names the param,
file, line or record, and every file that was there before (the repository's tracked files, untracked files beside
them, the previous run's outputs, checkpoints and metrics/live) is still there byte for byte afterwards.

The stages run through their real entry points (`run_main(stage.main)` with dvc.yaml's arguments, as
`python -m stages.<name>` does) in a copy
of a repository holding a finished toy run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, argument, run_prepare, stage_arguments, stage_main, toy_params_dict, write_toy_data

from finetune import outputs
from finetune.config.data import DataParams
from finetune.config.params import load_params
from finetune.data import prepare
from finetune.data.records import CSV_FIELD_LIMIT, BadRecords, load_examples
from finetune.entrypoint import run_main
from finetune.tracking.history import read_series
from finetune.training import run as training_run
from finetune.training.checkpoints import FINISHED


def stage_command(name: str, *argv: str) -> tuple[object, list[str]]:
    """A stage's main() and its sys.argv as dvc.yaml runs it; `evaluate --model merged` scores the merged model,
    with evaluate's arguments for it."""
    if name == "evaluate" and argv[:1] == ("--model",):
        return stage_main("evaluate"), ["evaluate", *(a.replace("finetuned", argv[1])
                                                      for a in stage_arguments("evaluate"))]
    return stage_main(name), [name, *stage_arguments(name), *argv]
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env={**os.environ, **GIT_ENV})


@pytest.fixture(scope="module")
def finished(tmp_path_factory, toy_model_dir) -> Path:
    """A git repository laid out like this one (base model in models/base, raw data, a tracked script, an untracked
    note beside the models) after a finished run of prepare, train, evaluate and merge."""
    repo = tmp_path_factory.mktemp("finished")
    shutil.copytree(toy_model_dir, repo / "models/base")
    write_toy_data(repo / "data/raw/toy.jsonl")
    params = toy_params_dict(Path("models/base"))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "scripts").mkdir()
    (repo / "scripts/tool.py").write_text("print('a tracked script')\n")
    (repo / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")  # the DAG, which names what no output may overwrite
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "toy repository")
    (repo / "models/notes.txt").write_text("an untracked note\n")
    argv = sys.argv
    with contextlib.chdir(repo):
        for name in ("prepare", "train", "evaluate", "merge"):
            main, sys.argv = stage_command(name)
            run_main(main)
    sys.argv = argv
    return repo


@pytest.fixture
def repo(finished, tmp_path, monkeypatch) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(finished, copy, symlinks=True)
    monkeypatch.chdir(copy)
    return copy


def snapshot(root: Path, under: str = "") -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / under).rglob("*")) if p.is_file()}


def set_params(repo: Path, changes: dict[str, object], raw: dict[str, str] | None = None) -> None:
    """Set 'section.key' values; `raw` values are written as YAML text (e.g. 1e400, as `dvc exp run -S` would)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in {**changes, **dict.fromkeys(raw or {}, "@raw")}.items():
        section, name = key.split(".")
        params.setdefault(section, {})[name] = value
    text = yaml.safe_dump(params, sort_keys=False)
    for key, value in (raw or {}).items():
        text = text.replace(f"{key.split('.')[1]}: '@raw'", f"{key.split('.')[1]}: {value}")
    (repo / "params.yaml").write_text(text)


def run_stage(name: str, monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """Exit status and everything printed by one stage's entry point."""
    main, command = stage_command(name, *argv)
    monkeypatch.setattr(sys, "argv", command)
    capsys.readouterr()
    try:
        run_main(main)
        status = 0
    except SystemExit as done:
        status = done.code
    out = capsys.readouterr()
    return status, out.out + out.err


def records(n: int) -> list[dict]:
    return [{"prompt": f"Spell out the number {i}.", "response": f"number {i}"} for i in range(n)]


# case -> (stage and its arguments, params to set, files to write, exit status, message)
REFUSED = {
    "output folder is the repository": (["train"], {"train.output_dir": "."}, {},
                                        "params.yaml:41: train.output_dir: . is the repository itself"),
    "output folder holds the base model": (["train"], {"train.output_dir": "models"}, {},
                                           "train.output_dir: models would overwrite the base model"),
    "merged folder over tracked code": (["merge"], {"export.merged_dir": "scripts"}, {},
                                        "export.merged_dir: scripts would overwrite scripts/tool.py, which git tracks"),
    "fine-tuned folder outside": (["train"], {"train.finetuned_dir": "../elsewhere"}, {},
                                  "train.finetuned_dir: ../elsewhere is outside the repository"),
    "checkpoints outside": (["train"], {"train.output_dir": "../elsewhere2"}, {},
                            "train.output_dir: ../elsewhere2 is outside the repository"),
    "output folder in the code": (["evaluate"], {"train.finetuned_dir": "stages/x"}, {},
                                  "train.finetuned_dir: stages/x would overwrite the pipeline's code"),
    "outputs overlap": (["train"], {"train.finetuned_dir": "models/checkpoints/final"}, {},
                        "train.finetuned_dir: models/checkpoints/final overlaps train.output_dir"),
    "merged over the prepared data": (["merge"], {"export.merged_dir": "data"}, {},
                                      "export.merged_dir: data would overwrite the prepare stage's input data/raw"),
    "NaN learning rate": (["train"], {"train.learning_rate": float("nan")}, {},
                          "train.learning_rate: nan is not a finite number"),
    "infinite learning rate": (["train"], {}, {"raw": {"train.learning_rate": "1e400"}},
                               "train.learning_rate: inf is not a finite number"),
    "infinite weight decay": (["train"], {"train.weight_decay": float("inf")}, {},
                              "train.weight_decay: inf is not a finite number"),
    "NaN epochs": (["train"], {"train.num_train_epochs": float("nan")}, {},
                   "train.num_train_epochs: nan is not a finite number"),
    "negative seed": (["train"], {"train.seed": -5}, {}, "train.seed: -5 must not be negative"),
    "huge batch": (["train"], {"train.per_device_train_batch_size": 2**40}, {},
                   "train.per_device_train_batch_size: 1099511627776 is out of range"),
    "unknown placeholder": (["prepare"], {"prepare.template": "### {x}\n{prompt}\n"}, {},
                            "prepare.template: '### {x}\\n{prompt}\\n' has unknown placeholders {x}"),
    "unbalanced brace": (["prepare"], {"prepare.template": "{prompt"}, {}, "expected '}' before end of string"),
    "unknown LoRA target": (["train"], {"lora.target_modules": ["nonexistent_proj"]}, {},
                            "lora.target_modules: nonexistent_proj names no module of models/base; its linear "
                            "layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    "data outside data/raw": (["prepare"], {"data.path": "../x.jsonl"}, {},
                              "data.path: ../x.jsonl is outside data/raw/"),
    "test split outside data/raw": (["prepare"], {"data.test_path": "data/other.jsonl"}, {},
                                    "data.test_path: data/other.jsonl is outside data/raw/"),
    "unknown section": (["params"], {"trian.seed": 1}, {}, "trian: unknown key; did you mean train?"),
    "a foreign file in the fine-tuned folder": (["train"], {}, {"models/finetuned/notes.txt": "mine"},
                                                "train.finetuned_dir: models/finetuned holds files this pipeline did "
                                                "not write (notes.txt)"),
    "a foreign file among the checkpoints": (["train"], {}, {"models/checkpoints/mine.txt": "mine"},
                                             "models/checkpoints holds files this pipeline did not write (mine.txt)"),
    "a foreign file in the merged folder": (["merge"], {}, {"models/merged/sub/x.bin": "mine"},
                                            "holds files this pipeline did not write (sub)"),
    "a foreign file in the prepared data": (["prepare"], {}, {"data/prepared/extra.jsonl": "{}"},
                                            "data/prepared holds files this pipeline did not write (extra.jsonl)"),
    "a folder named like data": (["prepare"], {"data.path": "data/raw/x.jsonl"}, {"data/raw/x.jsonl/a": "x"},
                                 "data.path: data/raw/x.jsonl is a folder"),
    "a mistyped record in a JSON array": (
        ["prepare"], {"data.path": "data/raw/a.json"},
        {"data/raw/a.json": json.dumps(records(50) + [{"prompt": "p", "response": 940}] + records(9), indent=1)},
        "data/raw/a.json:202 (record 51): field 'response' is int, expected a string"),
    "a non-object in a JSON array": (
        ["prepare"], {"data.path": "data/raw/a.json"},
        {"data/raw/a.json": json.dumps(records(4) + ["just text"] + records(40))},
        "data/raw/a.json:1 (record 5): expected a JSON object, got str"),
    "broken JSON in an array": (
        ["prepare"], {"data.path": "data/raw/a.json"},
        {"data/raw/a.json": json.dumps(records(3), indent=1).replace('"number 2"', '"number 2')},
        "data/raw/a.json:12: invalid JSON in record 3"),
    "a duplicate key": (["prepare"], {}, {"data/raw/toy.jsonl": "@line 3: " + json.dumps(
        {"prompt": "a", "response": "b"})[:-1] + ', "prompt": "c"}'},
        "data/raw/toy.jsonl:3: the key 'prompt' appears twice in one object"),
    "a CSV field over the limit": (
        ["prepare"], {"data.path": "data/raw/x.csv"},
        {"data/raw/x.csv": "prompt,response\na,b\n\"" + "x" * (CSV_FIELD_LIMIT + 1) + "\",c\nd,e\n"},
        "data/raw/x.csv:3: field larger than field limit"),
    "an invalid UTF-8 byte in a CSV": (
        ["prepare"], {"data.path": "data/raw/x.csv"},
        {"data/raw/x.csv": b"prompt,response\n" + b"".join(b"p%d,r%d\n" % (i, i) for i in range(40))
         .replace(b"p3,", b"p\xff3,")},
        "data/raw/x.csv:5: field 'prompt' holds invalid UTF-8"),
    "a symbolic link as the output folder": (["train"], {"train.finetuned_dir": "models/link"},
                                             {"@link models/link": "finetuned"},
                                             "train.finetuned_dir: models/link is a symbolic link or lies under one"),
    "a file where the output folder goes": (["train"], {"train.finetuned_dir": "models/notes.txt"}, {},
                                            "train.finetuned_dir: models/notes.txt is a file, not a folder"),
    "an output named like a staging folder": (["merge"], {"export.merged_dir": "models/.m.tmp-1"}, {},
                                              "export.merged_dir: models/.m.tmp-1 is named like the stages' staging"),
    "a model saved by something else": (["merge"], {"export.merged_dir": "models/mine"},
                                        {"models/mine/config.json": "{}", "models/mine/model.safetensors": "x"},
                                        "export.merged_dir: models/mine holds files this pipeline did not write "
                                        "(config.json, model.safetensors)"),
    "another trainer's checkpoints": (["train"], {"train.output_dir": "models/other"},
                                      {"models/other/checkpoint-500/optimizer.pt": "x"},
                                      "train.output_dir: models/other holds files this pipeline did not write "
                                      "(checkpoint-500)"),
    "a stray delimiter in a CSV": (["prepare"], {"data.path": "data/raw/x.csv"},
                                   {"data/raw/x.csv": "prompt,response\na,b\nc,hello, world\n"},
                                   "data/raw/x.csv:3: 3 fields, the header has 2 (prompt, response)"),
    "a trailing comma in a JSON array": (["prepare"], {"data.path": "data/raw/a.json"},
                                         {"data/raw/a.json": json.dumps(records(3))[:-1] + ",]"},
                                         "data/raw/a.json:1: a comma after the last record"),
    "a number too long to read": (["prepare"], {}, {"data/raw/toy.jsonl": "@line 2: " + json.dumps(
        {"prompt": "a", "response": "b"})[:-1] + ', "n": ' + "1" * 5000 + "}"},
        "data/raw/toy.jsonl:2: invalid JSON (Exceeds the limit (4300 digits)"),
    "a pickle-only adapter": (["evaluate", "--model", "finetuned"], {}, {"@pickle": "models/finetuned"},
                              "models/finetuned: no adapter_model.safetensors: it holds adapter_model.bin (pickle"),
    "a pickle-only merged model": (["evaluate", "--model", "merged"], {}, {"@pickle": "models/merged"},
                                   "models/merged: no model.safetensors or model.safetensors.index.json: it holds "
                                   "model.bin (pickle"),
}


def write_inputs(repo: Path, files: dict) -> None:
    for path, content in files.items():
        if path == "raw":
            continue
        if path.startswith("@link "):
            (repo / path.removeprefix("@link ")).symlink_to(content)
            continue
        if path == "@pickle":  # the safetensors weights replaced by a pickle of the same tensors
            folder = repo / content
            weights = next(folder.glob("*.safetensors"))
            weights.rename(folder / weights.name.replace(".safetensors", ".bin"))
            continue
        target = repo / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str) and content.startswith("@line "):
            number, line = content.removeprefix("@line ").split(": ", 1)
            lines = target.read_text().splitlines()
            lines[int(number) - 1] = line
            target.write_text("\n".join(lines) + "\n")
        else:
            target.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.mark.parametrize("case", REFUSED)
def test_refused_cleanly_and_nothing_lost(repo, case, monkeypatch, capsys):
    command, changes, files, message = REFUSED[case]
    set_params(repo, changes, files.get("raw"))
    write_inputs(repo, files)
    before = snapshot(repo)
    status, output = run_stage(command[0], monkeypatch, capsys, *command[1:])
    assert status == 2, output
    assert message in output
    assert "Traceback" not in output
    assert snapshot(repo) == before
    assert not list(repo.rglob(f"*{'.tmp-'}*"))  # no temporary folder left behind


def test_a_killed_runs_leftovers_are_never_kept(repo, monkeypatch, capsys):
    """Prepare interrupted while writing the splits leaves the previous splits as they were; the temporary folders
    and files a kill leaves are removed by the next run and never become part of the output."""
    before = snapshot(repo, "data/prepared")
    set_params(repo, {"data.seed": 7})
    calls = []

    def interrupted(folder, name):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return split_file(folder, name)

    split_file = prepare.split_file
    monkeypatch.setattr(prepare, "split_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(load_params())
    assert snapshot(repo, "data/prepared") == before and not list((repo / "data").glob(".prepared.tmp-*"))

    monkeypatch.setattr(prepare, "split_file", split_file)
    (repo / "data/.prepared.tmp-killed").mkdir()  # as a kill while writing the splits leaves it
    (repo / "data/.prepared.tmp-killed/train.arrow").write_text("{}\n")
    (repo / "data/.prepared.tmp-killed" / outputs.STAGING).touch()
    (repo / "data/prepared/.train.arrow.abc.tmp").write_text("half")
    status, output = run_stage("prepare", monkeypatch, capsys)
    assert status == 0, output
    assert sorted(p.name for p in (repo / "data").iterdir()) == ["prepared", "raw"]
    assert sorted(p.name for p in (repo / "data/prepared").iterdir()) == ["prepared.json", "test.arrow",
                                                                           "train.arrow", "validation.arrow"]


def test_valid_files_from_windows_tools_are_read_whole(repo, monkeypatch, capsys):
    """A byte-order mark (Notepad's JSONL, Excel's CSV) is read as such: the first record is kept and the header
    recognized."""
    raw = (repo / "data/raw/toy.jsonl").read_bytes()
    (repo / "data/raw/toy.jsonl").write_bytes(b"\xef\xbb\xbf" + raw)
    status, output = run_stage("prepare", monkeypatch, capsys)
    assert status == 0, output
    stats = json.loads((repo / "metrics/prepare.json").read_text())["prepared"]
    assert stats["train_examples"] + stats["validation_examples"] + stats["test_examples"] == 120
    assert stats["bad_records"] == 0

    rows = [json.loads(line) for line in raw.decode().splitlines()]
    (repo / "data/raw/excel.csv").write_bytes(b"\xef\xbb\xbf" + ("prompt,response\r\n" + "".join(
        f'"{r["prompt"]}","{r["response"]}"\r\n' for r in rows)).encode())
    set_params(repo, {"data.path": "data/raw/excel.csv"})
    status, output = run_stage("prepare", monkeypatch, capsys)
    assert status == 0, output
    assert json.loads((repo / "metrics/prepare.json").read_text())["prepared"]["bad_records"] == 0


def test_skip_drops_exactly_the_bad_records_and_keeps_each_records_types(repo):

    mixed = records(50) + [{"prompt": "p", "response": 940}] + [{"prompt": "Count", "response": "940"}] * 9
    (repo / "data/raw/a.json").write_text(json.dumps(mixed))
    bad = BadRecords("skip")
    examples = load_examples(DataParams(on_bad_record="skip"), repo / "data/raw/a.json", bad)
    assert len(examples) == 59 and bad.counts["wrong_type"] == 1 and sum(bad.counts.values()) == 1
    assert [e.response for e in examples[-9:]] == ["940"] * 9  # strings stay strings

    lines = b"prompt,response\n" + b"".join(b"p%d,r%d\n" % (i, i) for i in range(40)).replace(b"p3,", b"p\xff3,")
    (repo / "data/raw/x.csv").write_bytes(lines)
    bad = BadRecords("skip")
    examples = load_examples(DataParams(on_bad_record="skip"), repo / "data/raw/x.csv", bad)
    assert len(examples) == 39 and bad.counts["invalid_utf8"] == 1


def unfinish(repo: Path) -> None:
    """As if the finished run had been killed after its last checkpoint."""
    (repo / "models/checkpoints" / FINISHED).unlink()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])  # as a full disk or a kill mid-write leaves it


def test_a_corrupt_checkpoint_is_set_aside_and_the_one_before_resumed(repo, finished, monkeypatch, capsys):
    unfinish(repo)
    shutil.rmtree(repo / "models/finetuned")
    (repo / "metrics/train.json").unlink()
    truncate(repo / "models/checkpoints/checkpoint-6/adapter_model.safetensors")
    status, output = run_stage("train", monkeypatch, capsys)
    assert status == 0, output
    assert ("not resuming from models/checkpoints/checkpoint-6: corrupt: adapter_model.safetensors is not the file "
            "that was saved") in output
    assert "resuming from models/checkpoints/checkpoint-3:" in output
    assert (repo / "models/checkpoints/corrupt-checkpoint-6").is_dir()  # kept for a look, never resumed
    assert snapshot(repo, "models/finetuned") == snapshot(finished, "models/finetuned")  # as uninterrupted
    assert (repo / "models/notes.txt").read_text() == "an untracked note\n"


def test_when_every_checkpoint_is_corrupt_training_starts_fresh_and_keeps_them(repo, finished, monkeypatch, capsys):
    unfinish(repo)
    shutil.rmtree(repo / "models/finetuned")
    for step in (3, 6):
        truncate(repo / f"models/checkpoints/checkpoint-{step}/optimizer.pt")
    status, output = run_stage("train", monkeypatch, capsys)
    assert status == 0, output
    assert "no checkpoint of this run in models/checkpoints: starting fresh" in output
    assert (repo / "models/checkpoints/corrupt-checkpoint-3").is_dir()
    assert (repo / "models/checkpoints/corrupt-checkpoint-6").is_dir()
    assert snapshot(repo, "models/finetuned") == snapshot(finished, "models/finetuned")


def test_resume_rebuilds_what_a_kill_left_half_written(repo, finished, monkeypatch, capsys):
    """A kill can leave DVCLive's summary empty and a series row cut short; the resumed run rebuilds them from the
    kept history and ends with each step once, as the uninterrupted run had it."""
    history = snapshot(repo, "metrics/live/plots")
    unfinish(repo)
    shutil.rmtree(repo / "models/checkpoints/checkpoint-6")
    shutil.rmtree(repo / "metrics/live")  # so that what is compared below is the resumed run's
    live = repo / "models/checkpoints/live"
    (live / "metrics.json").write_text("")
    with (live / "plots/metrics/train/loss.tsv").open("a") as f:
        f.write("8\t0.12")
    (repo / "models/checkpoints/tracking.json").write_text("")
    status, output = run_stage("train", monkeypatch, capsys)
    assert status == 0, output
    assert "resuming from models/checkpoints/checkpoint-3:" in output
    plots = snapshot(repo, "metrics/live/plots")
    series = ["metrics/live/plots/metrics/eval/loss.tsv", "metrics/live/plots/metrics/train/learning_rate.tsv"]
    assert {k: plots[k] for k in series} == {k: history[k] for k in series}
    # the training loss logged at step 4 averages the steps since the last log, which for the resumed run start at
    # its checkpoint (3): the steps are the same, each once, and the other values equal
    resumed = read_series(repo / "metrics/live", "train/loss")
    uninterrupted = read_series(finished / "metrics/live", "train/loss")
    assert [s for s, _ in resumed] == [s for s, _ in uninterrupted] == [2, 4, 6]
    assert [resumed[0], resumed[2]] == [uninterrupted[0], uninterrupted[2]]
    summary = json.loads((repo / "metrics/live/metrics.json").read_text())
    assert summary["step"] == 6
    assert summary["eval"]["loss"] == read_series(finished / "metrics/live", "eval/loss")[-1][1]


def test_a_late_failure_leaves_a_run_that_resumes(repo, finished, monkeypatch, capsys):
    """Writing metrics/train.json fails (a full disk): the run exits non-zero naming the file and is not marked
    finished, so the next run resumes from its last checkpoint instead of training again from zero."""
    set_params(repo, {"train.seed": 7})
    write_json = training_run.write_json

    def full_disk(path, data):
        if Path(path) == argument("train", "--metrics"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write_json(path, data)

    monkeypatch.setattr(training_run, "write_json", full_disk)
    status, output = run_stage("train", monkeypatch, capsys)
    assert status == 1 and "error: metrics/train.json: No space left on device" in output
    assert "Traceback" not in output
    assert not (repo / "models/checkpoints" / FINISHED).exists()
    adapter = snapshot(repo, "models/finetuned")  # the seed-7 run's, already in place
    assert adapter != snapshot(finished, "models/finetuned")

    monkeypatch.setattr(training_run, "write_json", write_json)
    status, output = run_stage("train", monkeypatch, capsys)
    assert status == 0, output
    assert "resuming from models/checkpoints/checkpoint-6:" in output and "starting fresh" not in output
    assert "holds the last training step: writing its outputs without training again" in output
    written = json.loads((repo / "metrics/train.json").read_text())["training"]
    assert written["steps"] == 6 and written["tokens_trained"] > 0
    before = json.loads((finished / "metrics/train.json").read_text())["training"]
    assert written["final_train_loss"] != before["final_train_loss"]
    assert snapshot(repo, "models/finetuned") == adapter
    assert (repo / "models/checkpoints" / FINISHED).exists()


def test_outputs_given_as_other_spellings_and_lookalike_folders_are_safe(repo, monkeypatch, capsys):
    """`./models/finetuned/` is the same folder as models/finetuned; a folder of yours named like a staging folder
    is not one, and survives a run that cleans up leftovers beside it."""
    (repo / "models/.finetuned.tmp-mine").mkdir()
    (repo / "models/.finetuned.tmp-mine/keep.txt").write_text("mine")
    set_params(repo, {"train.finetuned_dir": "./models/finetuned/", "train.seed": 3})
    status, output = run_stage("train", monkeypatch, capsys)
    assert status == 0, output
    assert (repo / "models/.finetuned.tmp-mine/keep.txt").read_text() == "mine"
    assert (repo / "models/notes.txt").read_text() == "an untracked note\n"
    assert json.loads((repo / "models/finetuned/.dvc-finetune.json").read_text())["written_by"] == \
        "train.finetuned_dir"


def test_a_failed_run_keeps_the_previous_outputs_and_history(repo, monkeypatch, capsys):
    """A run that fails after training started (here it diverges) leaves the last finished run's model, metrics,
    predictions and step history exactly as they were."""
    kept = {part: snapshot(repo, part) for part in ("models/finetuned", "models/merged", "metrics", "outputs")}
    set_params(repo, {"train.learning_rate": 1e6, "train.max_steps": 30, "train.save_steps": 2,
                      "train.logging_steps": 1})
    status, output = run_stage("train", monkeypatch, capsys)
    assert status == 2 and "training diverged at step" in output and "Traceback" not in output
    assert {part: snapshot(repo, part) for part in kept} == kept
