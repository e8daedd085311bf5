"""Output folders the stages own: what may be written where, what may be deleted, and swapping a folder in whole.

A folder named by a param (train.output_dir, train.finetuned_dir, export.merged_dir) gets a marker file when the
stage creates it, listing what it wrote. A folder is replaced or cleared only when everything in it is something
this project wrote there: the files the marker lists, or (for a folder from before markers existed, and for the
fixed outputs data/prepared and metrics/live) entries named as the stage names them. Anything else in it makes the
stage refuse before it starts, naming the param and the foreign entries.

`swap_in` puts a fully written temporary folder in the place of the old one with one rename (Linux's
renameat2(RENAME_EXCHANGE)), so a reader, or a kill, sees either the old folder or the new one, never a mix.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

MARKER = ".dvc-finetune.json"
TMP_INFIX = ".tmp-"  # temporary folders are `.<name>.tmp-<random>` beside the folder they become

# What each kind of output folder may hold, by name (top-level entries).
_MODEL_FILES = (r"adapter_config\.json|adapter_model\.safetensors|train_config\.json|config\.json"
                r"|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
                r"|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json"
                r"|chat_template\.(jinja|json)|vocab\.json|merges\.txt|tokenizer\.model|README\.md")
KNOWN_ENTRIES = {
    # Trainer checkpoints, the run's state and its in-progress step history, corrupt checkpoints set aside
    "checkpoints": rf"{re.escape(MARKER)}|FINISHED|tracking\.json|live|(corrupt-|tmp-)?checkpoint-\d+(\.\d+)?"
                   r"|\..+\.tmp",
    "model": _MODEL_FILES,
    "prepared": r"(train|validation|test)\.jsonl|\..+\.tmp",
    "live": r"metrics\.json|plots|params\.yaml|report\.(html|md)|\..+\.tmp",
}


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def foreign_entries(folder: Path, kind: str) -> list[str]:
    """What in `folder` this project did not write (empty when the folder does not exist or is all ours)."""
    if not folder.is_dir():
        return []
    marker = read_marker(folder)
    if marker is not None and "files" in marker:
        written = set(marker["files"]) | {MARKER}
        found = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()]
        return sorted(f for f in found if f not in written)
    pattern = re.compile(KNOWN_ENTRIES[kind])
    return sorted(p.name for p in folder.iterdir() if not pattern.fullmatch(p.name))


def ownership_problem(folder: Path, kind: str, param: str) -> str | None:
    """Why the stage may not write to `folder`, or None."""
    if folder.exists() and not folder.is_dir():
        return f"{param}: {folder} is a file, not a folder"
    foreign = foreign_entries(folder, kind)
    if not foreign:
        return None
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    return (f"{param}: {folder} holds files this pipeline did not write ({shown}); the stage replaces that folder, "
            "so move them away or choose another folder")


def claim(folder: Path, param: str, files: list[str] | None = None) -> None:
    """Create `folder` if needed and mark it as written by this project (`files`: what it holds, for a folder
    written at once; None for a folder whose entries come and go, like the checkpoints)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = {"written_by": param} | ({"files": sorted(files)} if files is not None else {})
    (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def staging_dir(dest: Path) -> Path:
    """A new empty temporary folder beside `dest`, on the same filesystem, to be swapped in with `swap_in`.
    Temporary folders left by a killed run are removed first."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    for leftover in dest.parent.glob(f".{dest.name}{TMP_INFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP_INFIX}", dir=dest.parent))


def written_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


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


def swap_in(staged: Path, dest: Path) -> None:
    """Put the folder `staged` at `dest` in one rename; the old `dest` (checked as ours by the caller) is removed."""
    if not dest.exists():
        os.rename(staged, dest)
        return
    if _exchange(staged, dest):
        shutil.rmtree(staged)  # now the old folder
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP_INFIX}", dir=dest.parent))
    os.rename(dest, old / dest.name)  # a kill here leaves no dest: its stage reruns, nothing mixed
    os.rename(staged, dest)
    shutil.rmtree(old)
