"""Output folders the stages own: what may be written where, what may be deleted, and swapping a folder in whole.

A folder named by a param (train.output_dir, train.finetuned_dir, export.merged_dir) gets a marker file when the
stage writes it, listing what it wrote. A folder is replaced or cleared only when everything in it is something
this project wrote there: the files its marker lists; for a model folder from before markers existed, the output
dvc.lock records for it (DVC can restore it); for checkpoints from before markers, checkpoints carrying this
project's fingerprint; for the fixed outputs data/prepared and metrics/live, the files the stage names. Anything
else in it makes the stage refuse before it starts, naming the param and the foreign entries.

`swap_in` puts a fully written staging folder in the place of the old one with one rename (Linux's
renameat2(RENAME_EXCHANGE)), so a reader, or a kill, sees either the old folder or the new one, never a mix. A
staging folder carries a file of its own until it is swapped in, and only folders carrying it (or the marker) are
ever cleaned up as leftovers of a killed run.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

MARKER = ".dvc-finetune.json"
STAGING = ".dvc-finetune-staging"  # in a staging folder until it is swapped in
TMP_INFIX = ".tmp-"  # staging folders are `.<name>.tmp-<random>` beside the folder they become
CHECKPOINT_MARKER = "fingerprint.json"  # what the train stage writes into each complete checkpoint

# What the fixed outputs and the checkpoint folder may hold (paths relative to the folder; for checkpoints, the
# top-level entries: a checkpoint's own files are the Trainer's).
KNOWN_FILES = {
    "prepared": r"(train|validation|test)\.jsonl",
    "live": r"metrics\.json|params\.yaml|report\.(html|md)|plots/metrics/[\w./-]+\.tsv",
    "checkpoints": rf"{re.escape(MARKER)}|FINISHED|tracking\.json|live|(corrupt-|tmp-)?checkpoint-\d+(\.\d+)?",
}
_LEFTOVER_FILE = r"(.*/)?\..+\.tmp"  # write_text's temporary files, left by a kill


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _entries(folder: Path) -> list[str]:
    """Every file, folder and link under `folder`, relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def recorded_by_dvc(folder: Path) -> bool:
    """Whether dvc.lock (in the current directory, the repository) records `folder` as a stage's output: DVC can
    restore it from its cache, so replacing it loses nothing."""
    try:
        from stages.params import load_yaml

        lock = load_yaml(Path("dvc.lock").read_text(encoding="utf-8"))
        outs = {os.path.normpath(o["path"]) for stage in lock["stages"].values() for o in stage.get("outs", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return os.path.normpath(folder) in outs


def foreign_entries(folder: Path, kind: str) -> list[str]:
    """What in `folder` this project did not write (empty when the folder does not exist or is all ours).
    kind: "model" (a fine-tuned or merged model), "checkpoints", "prepared" or "live"."""
    if not folder.is_dir():
        return []
    entries = _entries(folder)
    marker = read_marker(folder)
    if kind == "model":
        if marker is None or "files" not in marker:
            return [] if recorded_by_dvc(folder) else [e for e in entries if "/" not in e]
        written = set(marker["files"]) | {MARKER}
        parents = {parent.as_posix() for f in written for parent in Path(f).parents}
        return [e for e in entries if e not in written
                and not (e in parents and (folder / e).is_dir() and not (folder / e).is_symlink())]
    known = re.compile(KNOWN_FILES[kind])
    if kind == "checkpoints":
        top = [e for e in entries if "/" not in e]
        foreign = [e for e in top if not (known.fullmatch(e) or re.fullmatch(_LEFTOVER_FILE, e))]
        if marker is None:  # from before markers: only checkpoints that carry this project's fingerprint
            foreign += [e for e in top if e.startswith(("checkpoint-", "tmp-", "corrupt-")) and e not in foreign
                        and not (folder / e / CHECKPOINT_MARKER).is_file()]
        return sorted(foreign)
    return [e for e in entries if not (known.fullmatch(e) or re.fullmatch(_LEFTOVER_FILE, e)
                                       or ((folder / e).is_dir() and not (folder / e).is_symlink()))]


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


def claim(folder: Path, param: str, files: list[str] | None = None) -> None:
    """Create `folder` if needed and mark it as written by this project (`files`: what it holds, for a folder
    written at once; None for a folder whose entries come and go, like the checkpoints)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = {"written_by": param} | ({"files": sorted(files)} if files is not None else {})
    (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


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
        shutil.rmtree(leftover)
    staged = Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP_INFIX}", dir=dest.parent))
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


def swap_in(staged: Path, dest: Path) -> None:
    """Put the folder `staged` at `dest` in one rename; the old `dest` (checked as ours by the caller) is removed."""
    (staged / STAGING).unlink(missing_ok=True)
    if not dest.exists():
        os.rename(staged, dest)
        return
    if _exchange(staged, dest):
        (staged / STAGING).touch()  # now the old folder: a leftover to remove, should a kill come first
        shutil.rmtree(staged)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP_INFIX}", dir=dest.parent))
    (old / STAGING).touch()
    os.rename(dest, old / dest.name)  # a kill here: the next staging_dir(dest) puts it back
    os.rename(staged, dest)
    shutil.rmtree(old)
