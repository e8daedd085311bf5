"""Resume. A checkpoint counts only once the Trainer has finished writing it and the main process has added a marker
holding the fingerprint of everything that determines training (params, data, code, library versions, processes) and
the size and digest of each file. Resume takes the latest checkpoint whose marker matches this run and whose files
match the marker; half-written ones and ones from another run are removed, corrupt ones are set aside as
corrupt-checkpoint-N."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from finetune.config.params import Params, as_dict
from finetune.data.prepared import META
from finetune.outputs import CHECKPOINT_MARKER, claim, file_digest
from finetune.tracking import RUN_STATE

# Resume. A checkpoint counts only once the Trainer has finished writing it and we have added a marker holding the
# fingerprint of everything that determines training (params, data, code, library versions) and the size and digest
# of each file. Resume takes the latest checkpoint whose marker matches this run and whose files match the marker;
# half-written ones and ones from another run are removed, corrupt ones are set aside as corrupt-checkpoint-N.
MARKER = CHECKPOINT_MARKER  # fingerprint.json

FINISHED = "FINISHED"  # written once a run completes: its checkpoints are results, not a run to resume

LIVE_STAGING = "live"  # in train.output_dir: the step history of the run in progress, published to metrics/live at


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def fingerprint(params: Params, prepared_dir: Path, processes: int = 1) -> str:
    """What determines the training: params, prepared data, the library's training code, library versions and the
    number of processes (which multiplies the effective batch)."""
    train = {k: v for k, v in as_dict(params.train).items() if k not in ("output_dir", "finetuned_dir")}
    package = Path(__file__).resolve().parent.parent
    code = sorted([*package.glob("training/*.py"), *package.glob("tasks/*.py"), package / "batching.py",
                   package / "models.py", package / "quantization.py", package / "config/train.py",
                   package / "config/model.py", package / "config/task.py"])
    identity = {
        "model": as_dict(params.model), "train": train, "lora": as_dict(params.lora),
        "task": as_dict(params.task) if params.task and params.task.type != "causal_lm" else None,
        "row_length": params.prepare.max_length,
        "quantization": as_dict(params.quantization) if params.train.method == "qlora" else None,
        "data": {name: file_digest(prepared_dir / name) for name in ("train.arrow", "validation.arrow", META)},
        "code": {path.relative_to(package).as_posix(): file_digest(path) for path in code},
        "versions": versions(),
        "processes": processes,
        "strategy": {k: v for k, v in as_dict(params.distributed).items() if k != "nproc_per_node"}
        if params.distributed else None,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def checkpoint_step(checkpoint: Path | None) -> int | None:
    return int(checkpoint.name.split("-")[-1]) if checkpoint else None


def read_marker(checkpoint: Path) -> dict | None:
    try:
        return json.loads((checkpoint / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def checkpoint_problem(checkpoint: Path, fingerprint: str) -> str | None:
    """Why `checkpoint` cannot be resumed by the run of `fingerprint`, or None."""
    marker = read_marker(checkpoint)
    if marker is None:
        return "half-written"
    if marker.get("fingerprint") != fingerprint:
        return "from a run with other params, data or code"
    for name, expected in marker.get("files", {}).items():
        path = checkpoint / name
        if not path.is_file():
            return f"corrupt: {name} is missing"
        if path.stat().st_size != expected["size"] or file_digest(path) != expected["sha256"]:
            return f"corrupt: {name} is not the file that was saved ({path.stat().st_size:,} bytes, " \
                   f"{expected['size']:,} when saved)"
    return None


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint marked complete (of any run): what a divergence message points to."""
    return next((p for p in reversed(checkpoints(output_dir)) if read_marker(p) is not None), None)


def clear_run(output_dir: Path) -> None:
    """Remove what a run left in output_dir (the folder holds nothing else: params.path_problems checked), except
    the checkpoints set aside as corrupt, which stay for a look until removed by hand."""
    for entry in output_dir.iterdir():
        if entry.name in (FINISHED, RUN_STATE, LIVE_STAGING) or entry.name.startswith(("checkpoint-", "tmp-")):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def prepare_output_dir(output_dir: Path, fingerprint: str) -> Path | None:
    """The checkpoint to resume from, if any. Checkpoints that cannot be resumed are removed (or, when corrupt, set
    aside); a finished run's checkpoints and history are cleared."""
    claim(output_dir, "train.output_dir")
    if (output_dir / FINISHED).exists():
        print(f"the run that left {output_dir} finished: starting fresh")
        clear_run(output_dir)
        return None
    for path in reversed(checkpoints(output_dir)):
        problem = checkpoint_problem(path, fingerprint)
        if problem is None:
            return path
        if problem.startswith("corrupt"):
            aside = path.with_name(f"corrupt-{path.name}")
            for n in range(2, 1000):
                if not aside.exists():
                    break
                aside = path.with_name(f"corrupt-{path.name}.{n}")
            path.rename(aside)
            print(f"not resuming from {path}: {problem}; set aside as {aside}, trying the one before")
        else:
            print(f"not resuming from {path}: {problem}; removing it")
            shutil.rmtree(path)
    print(f"no checkpoint of this run in {output_dir}: starting fresh")
    clear_run(output_dir)
    return None


def other_world_size(output_dir: Path, params: Params, prepared_dir: Path, processes: int) -> str | None:
    """Why the run cannot go on: its checkpoint was written by the same run on another number of processes, whose
    effective batch (and data order) this one would change mid-run. None when there is no such checkpoint."""
    if not output_dir.is_dir() or (output_dir / FINISHED).exists():
        return None
    for path in reversed(checkpoints(output_dir)):
        marker = read_marker(path) or {}
        theirs = marker.get("processes", processes)
        if theirs != processes and marker.get("fingerprint") == fingerprint(params, prepared_dir, theirs):
            return (f"{path} was written by this run on {theirs} processes, and this one has {processes}: the "
                    f"effective batch would change mid-run. Resume it with distributed.nproc_per_node: {theirs} "
                    f"(or the launcher's {theirs} processes), or delete {output_dir} to start over")
    return None


def resumable(output_dir: Path, fingerprint: str) -> Path | None:
    """The checkpoint prepare_output_dir chose, read without changing anything: what the other processes of a
    multi-process run resume from, once the main one has prepared the folder."""
    if not output_dir.is_dir() or (output_dir / FINISHED).exists():
        return None
    return next((p for p in reversed(checkpoints(output_dir)) if checkpoint_problem(p, fingerprint) is None), None)


def trained_through(checkpoint: Path) -> bool:
    """Whether `checkpoint` holds the last step: a run that stopped after training (writing its outputs) resumes
    from there without training (the Trainer would run one step more than max_steps)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return state["global_step"] >= state["max_steps"]


def load_finished_training(trainer, checkpoint: Path) -> None:
    from transformers import TrainerState

    print(f"{checkpoint} holds the last training step: writing its outputs without training again")
    if trainer.is_fsdp_enabled:  # FSDP loads a checkpoint into the sharded model: shard it as training would have
        trainer.model = trainer.model_wrapped = trainer.accelerator.prepare(trainer.model)
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
