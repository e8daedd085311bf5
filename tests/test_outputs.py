"""Output folders: what counts as the pipeline's own, and swapping a folder in whole, also where a kill interrupts it
or the system cannot exchange two paths in one rename."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
import yaml

from finetune import outputs
from finetune.config.paths import tracked_files
from finetune.config.schema import ParamsError
from finetune.errors import StageError


def staged_with(dest, files: dict[str, str]):
    staged = outputs.staging_dir(dest)
    for name, text in files.items():
        (staged / name).write_text(text)
    return staged


@pytest.mark.parametrize("exchange", [True, False])
def test_a_swap_replaces_the_whole_folder_and_leaves_nothing_behind(tmp_path, monkeypatch, exchange):
    if not exchange:  # a system without renameat2(RENAME_EXCHANGE): two renames
        monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    dest = tmp_path / "data/prepared"
    outputs.swap_in(staged_with(dest, {"train.arrow": "old"}), dest, "prepared", "prepared")
    outputs.swap_in(staged_with(dest, {"train.arrow": "new", "test.arrow": "new"}), dest, "prepared", "prepared")
    assert sorted(p.name for p in dest.iterdir()) == ["test.arrow", "train.arrow"]
    assert (dest / "train.arrow").read_text() == "new"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["prepared"]
    assert oct(dest.stat().st_mode & 0o777) != oct(0o700)  # the mode mkdir gives, not mkdtemp's private one


def test_an_old_output_caught_between_two_renames_is_put_back(tmp_path):
    """A kill between the fallback swap's renames leaves the old output inside the staging folder and none at its
    place: the next run puts it back before anything else."""
    dest = tmp_path / "models/merged"
    caught = tmp_path / "models/.merged.tmp-killed"
    (caught / "merged").mkdir(parents=True)
    (caught / "merged/model.safetensors").write_text("the old output")
    (caught / outputs.STAGING).touch()
    staged = outputs.staging_dir(dest)
    assert (dest / "model.safetensors").read_text() == "the old output"
    assert {p.name for p in dest.parent.iterdir()} == {"merged", staged.name}


def test_a_kill_right_after_the_swap_leaves_an_output_that_is_still_ours(tmp_path):
    dest = tmp_path / "data/prepared"
    staged = staged_with(dest, {"train.arrow": "x"})
    staged.rename(dest)  # swapped in, the staging file not yet removed
    assert outputs.foreign_entries(dest, "prepared") == []


def test_a_swap_refuses_a_folder_that_gained_a_file_of_yours(tmp_path):
    dest = tmp_path / "data/prepared"
    outputs.swap_in(staged_with(dest, {"train.arrow": "old"}), dest, "prepared", "the prepare stage's output")
    (dest / "mine.txt").write_text("mine")
    staged = staged_with(dest, {"train.arrow": "new"})
    with pytest.raises(StageError, match=r"holds files this pipeline did not write \(mine.txt\)"):
        outputs.swap_in(staged, dest, "prepared", "the prepare stage's output")
    assert (dest / "mine.txt").read_text() == "mine" and (dest / "train.arrow").read_text() == "old"


def checkpoint(folder, step: int, files: dict[str, str], marked: bool = True) -> None:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    if marked:
        (path / outputs.CHECKPOINT_MARKER).write_text(json.dumps({"files": {name: {} for name in files}}))


def test_checkpoints_are_ours_only_with_what_their_markers_list(tmp_path):
    folder = tmp_path / "models/checkpoints"
    outputs.claim(folder, "train.output_dir")
    checkpoint(folder, 3, {"adapter_model.safetensors": "w", "optimizer.pt": "o"})
    checkpoint(folder, 6, {"optimizer.pt": "half"}, marked=False)  # the Trainer was writing it when killed
    (folder / "FINISHED").touch()
    assert outputs.foreign_entries(folder, "checkpoints") == []
    (folder / "checkpoint-3/my_eval.json").write_text("{}")  # yours, inside a checkpoint
    checkpoint(folder, 2, {"optimizer.pt": "o"}, marked=False)  # unmarked, and older than a marked one
    assert outputs.foreign_entries(folder, "checkpoints") == ["checkpoint-2", "checkpoint-3"]


def test_an_fsdp_checkpoint_killed_while_written_is_ours(tmp_path):
    """FSDP's checkpoint files: the gathered model and optimizer, or each process's shards in
    torch.distributed.checkpoint's folders; an unmarked newest one is the run's, to be cleared or replaced."""
    folder = tmp_path / "models/checkpoints"
    outputs.claim(folder, "train.output_dir")
    checkpoint(folder, 3, {"pytorch_model_fsdp.bin": "m", "optimizer.bin": "o", "rng_state_1.pth": "r"})
    checkpoint(folder, 6, {}, marked=False)
    # the optimizer's .metadata not yet renamed into place when the run was killed
    for name, metadata in (("pytorch_model_fsdp_0", ".metadata"), ("optimizer_0", ".metadata.tmp")):
        (folder / "checkpoint-6" / name).mkdir()
        for part in (metadata, "__0_0.distcp", "__1_0.distcp"):
            (folder / "checkpoint-6" / name / part).write_text("shard")
    assert outputs.foreign_entries(folder, "checkpoints") == []
    (folder / "checkpoint-6/optimizer_0/notes.txt").write_text("mine")
    assert outputs.foreign_entries(folder, "checkpoints") == ["checkpoint-6"]


def test_checkpoints_in_a_folder_the_stage_never_marked_are_not_ours(tmp_path):
    folder = tmp_path / "runs/elsewhere"
    checkpoint(folder, 500, {"optimizer.pt": "o", "trainer_state.json": "{}"}, marked=False)
    assert outputs.foreign_entries(folder, "checkpoints") == ["checkpoint-500"]


def test_a_model_folder_without_a_marker_is_ours_only_as_dvc_recorded_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "models/finetuned"
    folder.mkdir(parents=True)
    files = {"adapter_model.safetensors": b"weights", "adapter_config.json": b"{}"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    assert outputs.foreign_entries(folder, "model") == sorted(files)  # no dvc.lock: not ours
    listing = [{"md5": hashlib.md5(data).hexdigest(), "relpath": name} for name, data in sorted(files.items())]
    digest = hashlib.md5(json.dumps(listing).encode()).hexdigest() + ".dir"
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(
        {"schema": "2.0", "stages": {"train": {"outs": [{"path": "models/finetuned", "md5": digest}]}}}))
    assert outputs.foreign_entries(folder, "model") == sorted(files)  # recorded, but DVC's cache lacks it
    cached = tmp_path / ".dvc/cache/files/md5" / digest[:2] / digest[2:]
    cached.parent.mkdir(parents=True)
    cached.write_text(json.dumps(listing))
    assert outputs.foreign_entries(folder, "model") == []  # file for file what DVC holds a copy of
    (folder / "adapter_config.json").write_bytes(b'{"r": 4}')
    assert outputs.foreign_entries(folder, "model") == sorted(files)  # changed since: not restorable


def test_tracked_files_that_cannot_be_listed_stop_the_stage(tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()

    def dubious(*args, **kwargs):
        return subprocess.CompletedProcess(args, 128, b"", b"fatal: detected dubious ownership in repository")

    monkeypatch.setattr(subprocess, "run", dubious)
    with pytest.raises(ParamsError, match="cannot list the files git tracks.*dubious ownership"):
        tracked_files(tmp_path)
