"""Output folders the stages own: what may be written where, what may be deleted, and swapping a folder in whole.

A folder named by a param (train.finetuned_dir, export.merged_dir) gets a marker file when the stage writes it,
listing what it wrote. A folder is replaced or cleared only when everything in it is something this project wrote
there: for a model folder, the files its marker lists (a folder from before markers existed only when it is, file
for file, the output dvc.lock records, so DVC holds a copy); for the checkpoint folder, checkpoints whose files
their fingerprint.json lists (or, without one, a checkpoint the Trainer was still writing), the run's state and its
step history; for the fixed outputs data/prepared and metrics/live, the files the stage names. Anything else in it
makes the stage refuse, naming the param and the foreign entries, before it starts and again just before the swap.

`swap_in` puts a fully written staging folder in the place of the old one with one rename (Linux's
renameat2(RENAME_EXCHANGE)), so a reader, or a kill, sees either the old folder or the new one, never a mix. A
staging folder carries a file of its own until it has been swapped in, and only folders carrying it are ever
cleaned up as the leftovers of a killed run.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finetune.config.schema import load_yaml
from finetune.errors import StageError

MARKER = ".dvc-finetune.json"
STAGING = ".dvc-finetune-staging"  # in a staging folder until it has been swapped in
TMP_INFIX = ".tmp-"  # staging folders are `.<name>.tmp-<random>` beside the folder they become
CHECKPOINT_MARKER = "fingerprint.json"  # what the train stage writes into each complete checkpoint

# What the fixed outputs may hold, and what the Trainer writes into a checkpoint (paths relative to the folder).
KNOWN_FILES = {
    "prepared": r"(train|validation|test)\.(arrow|jsonl)|prepared\.json",  # .jsonl: what earlier versions wrote
    "live": r"metrics\.json|params\.yaml|report\.(html|md)|plots/metrics/[\w./-]+\.tsv",
    "checkpoint": r"adapter_model\.safetensors|adapter_config\.json|model(-\d+-of-\d+)?\.safetensors"
                  r"|model\.safetensors\.index\.json|config\.json|generation_config\.json|optimizer\.pt|scheduler\.pt"
                  r"|scaler\.pt|rng_state(_\d+)?\.pth|trainer_state\.json|training_args\.bin|tokenizer\.json"
                  r"|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json|chat_template\.jinja"
                  r"|README\.md|vocab\.json|merges\.txt|tokenizer\.model"
                  # FSDP: the gathered model and optimizer, or each process's shards (torch.distributed.checkpoint)
                  r"|(pytorch_model_fsdp|optimizer)(_\d+)?\.bin|(pytorch_model_fsdp|optimizer)_\d+/(\.metadata(\.tmp)?|__\d+_\d+\.distcp)",
}
_CHECKPOINT = re.compile(r"(corrupt-|tmp-)?checkpoint-(\d+)(\.\d+)?")
_RUN_FILES = {MARKER, "FINISHED", "tracking.json"}
_LEFTOVER_FILE = re.compile(r"(.*/)?\..+\.tmp")  # write_text's temporary files, left by a kill


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _entries(folder: Path) -> list[str]:
    """Every file, folder and link under `folder`, relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def recorded_by_dvc(folder: Path) -> bool:
    """Whether `folder` is, file for file, the output dvc.lock (in the current directory, the repository) records
    for it, with the record in DVC's cache: DVC holds a copy, so replacing the folder loses nothing."""
    try:

        lock = load_yaml(Path("dvc.lock").read_text(encoding="utf-8"))
        md5 = next(o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])
                   if Path(o["path"]).resolve() == folder.resolve())
        listing = json.loads((Path(".dvc/cache/files/md5") / md5[:2] / md5[2:]).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        return False
    recorded = {entry["relpath"]: entry["md5"] for entry in listing}
    files = [e for e in _entries(folder) if not (folder / e).is_dir() or (folder / e).is_symlink()]
    return sorted(files) == sorted(recorded) and all(file_digest(folder / f, "md5") == recorded[f] for f in files)


def _foreign_checkpoint(checkpoint: Path, newest_marked: int, folder_marked: bool) -> bool:
    """Whether a checkpoint folder holds anything the Trainer and the train stage did not write there."""
    if checkpoint.is_symlink() or not checkpoint.is_dir():
        return True
    found = [e for e in _entries(checkpoint) if not (checkpoint / e).is_dir() or (checkpoint / e).is_symlink()]
    try:
        listed = json.loads((checkpoint / CHECKPOINT_MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        # not marked complete: ours only in a folder the stage marked, as the checkpoint the Trainer was writing
        # when the run stopped (the newest), holding the Trainer's files
        step = int(_CHECKPOINT.fullmatch(checkpoint.name)[2])
        known = re.compile(KNOWN_FILES["checkpoint"])
        return not folder_marked or step <= newest_marked or not all(known.fullmatch(e) for e in found)
    return not set(found) <= set(listed) | {CHECKPOINT_MARKER}


def _foreign_checkpoint_entries(folder: Path) -> list[str]:
    folder_marked = read_marker(folder) is not None
    top = sorted(p.name for p in folder.iterdir())
    checkpoints = [e for e in top if _CHECKPOINT.fullmatch(e)]
    newest_marked = max((int(_CHECKPOINT.fullmatch(e)[2]) for e in checkpoints
                         if (folder / e / CHECKPOINT_MARKER).is_file()), default=-1)
    foreign = []
    for entry in top:
        path = folder / entry
        if entry in checkpoints:
            if _foreign_checkpoint(path, newest_marked, folder_marked):
                foreign.append(entry)
        elif entry == "live":  # the run's step history, in DVCLive's layout
            if path.is_symlink() or not path.is_dir():
                foreign.append(entry)
            else:
                foreign += [f"live/{e}" for e in _foreign_files(path, "live")]
        elif path.is_symlink() or not (entry in _RUN_FILES or _LEFTOVER_FILE.fullmatch(entry)):
            foreign.append(entry)
    return foreign


def _foreign_files(folder: Path, kind: str) -> list[str]:
    known = re.compile(KNOWN_FILES[kind])
    return [e for e in _entries(folder) if (folder / e).is_symlink() or not (
        known.fullmatch(e) or _LEFTOVER_FILE.fullmatch(e) or e == STAGING or (folder / e).is_dir())]


def foreign_entries(folder: Path, kind: str) -> list[str]:
    """What in `folder` this project did not write (empty when the folder does not exist or is all ours).
    kind: "model" (a fine-tuned or merged model), "checkpoints", "prepared" or "live"."""
    if not folder.is_dir():
        return []
    if kind == "checkpoints":
        return _foreign_checkpoint_entries(folder)
    if kind != "model":
        return _foreign_files(folder, kind)
    entries = _entries(folder)
    marker = read_marker(folder)
    if marker is None or "files" not in marker:
        return [] if recorded_by_dvc(folder) else [e for e in entries if "/" not in e]
    written = set(marker["files"]) | {MARKER, STAGING}
    parents = {parent.as_posix() for f in written for parent in Path(f).parents}
    return [e for e in entries if e not in written
            and not (e in parents and (folder / e).is_dir() and not (folder / e).is_symlink())]


def ownership_problem(folder: Path, kind: str, param: str) -> str | None:
    """Why the stage may not replace or clear `folder`, or None."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        return f"{param}: {folder} is {'a link' if folder.is_symlink() else 'a file'}, not a folder"
    foreign = foreign_entries(folder, kind)
    foreign = [e for e in foreign if not any(e.startswith(f + "/") for f in foreign)]  # a folder, not its files
    if not foreign:
        return None
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    return (f"{param}: {folder} holds files this pipeline did not write ({shown}); the stage replaces that folder, "
            "so move them away or choose another folder")


def refuse_foreign(folder: Path, kind: str, param: str) -> None:
    problem = ownership_problem(folder, kind, param)
    if problem:
        raise StageError(problem)


def claim(folder: Path, param: str, files: list[str] | None = None) -> None:
    """Create `folder` if needed and mark it as written by this project (`files`: what it holds, for a folder
    written at once; None for a folder whose entries come and go, like the checkpoints). Written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = {"written_by": param} | ({"files": sorted(files)} if files is not None else {})
    if read_marker(folder) == marker:
        return
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{MARKER}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(marker, indent=1) + "\n")
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, folder / MARKER)


_UMASK = os.umask(0)
os.umask(_UMASK)


def _leftovers(dest: Path) -> list[Path]:
    """Staging folders of `dest` that a killed run left behind (they carry the staging file)."""
    found = dest.parent.glob(f".{glob.escape(dest.name)}{TMP_INFIX}*")
    return [p for p in found if p.is_dir() and not p.is_symlink() and (p / STAGING).is_file()]


def staging_dir(dest: Path) -> Path:
    """A new empty staging folder beside `dest`, on the same filesystem, to be swapped in with `swap_in`. What a
    killed run left is cleaned up first: an old output caught between the two renames of the fallback swap is put
    back; staging folders are removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    for leftover in _leftovers(dest):
        if not dest.exists() and (leftover / dest.name).is_dir():
            os.rename(leftover / dest.name, dest)
        shutil.rmtree(leftover, ignore_errors=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP_INFIX}", dir=dest.parent))
    os.chmod(staged, 0o777 & ~_UMASK)  # mkdtemp makes it private; give it the mode mkdir would have
    (staged / STAGING).touch()
    return staged


def written_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if not p.is_dir() and p.name != STAGING)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def replacing(dest: Path, kind: str, param: str) -> Iterator[Path]:
    """A staging folder to write the new `dest` into; swapped in when the block ends without an error (a model
    folder marked with what was written first), removed in any case."""
    staged = staging_dir(dest)
    try:
        yield staged
        if kind == "model":
            claim(staged, param, written_files(staged))
        swap_in(staged, dest, kind, param)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def swap_in(staged: Path, dest: Path, kind: str, param: str) -> None:
    """Put the folder `staged` at `dest` in one rename; the old `dest` is removed. Refuses (StageError) when `dest`
    holds anything this project did not write, checked right before the swap."""
    refuse_foreign(dest, kind, param)
    if not dest.exists():
        os.rename(staged, dest)
    elif _exchange(staged, dest):
        (staged / STAGING).touch()  # now the old folder: a leftover to remove, should a kill come first
        shutil.rmtree(staged)
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP_INFIX}", dir=dest.parent))
        (old / STAGING).touch()
        os.rename(dest, old / dest.name)  # a kill here: the next staging_dir(dest) puts it back
        os.rename(staged, dest)
        shutil.rmtree(old)
    (dest / STAGING).unlink()  # swapped in: an output now, no longer a leftover
