"""A base model's identity: the SHA-256 of every file of a local folder (cached by size, modification time and inode),
or a hub id and its pinned revision. What the base_model stage writes, so that the stages that load the model rerun
exactly when it changes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from finetune.errors import StageError


def file_hashes(folder: Path, cache: dict[str, dict], skip: Path | None = None) -> dict[str, str]:
    """SHA-256 of every file under `folder` (relative path -> hex), reusing `cache` entries whose size, modification
    time and inode still match; `cache` is updated in place."""
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if skip is not None and path.resolve() == skip.resolve():  # the identity file itself
            continue
        stat, key = path.stat(), str(path.resolve())
        seen = cache.get(key)
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        if not seen or seen["stamp"] != stamp:
            with path.open("rb") as handle:
                seen = cache[key] = {"stamp": stamp, "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}
        hashes[path.relative_to(folder).as_posix()] = seen["sha256"]
    return hashes


def identity(model_name: str, revision: str | None, cache: dict[str, dict], skip: Path | None = None) -> dict:
    folder = Path(model_name)
    if folder.is_dir():
        files = file_hashes(folder, cache, skip)
        if not files:
            raise StageError(f"model.model_name: {model_name} is an empty folder")
        return {"model_name": model_name, "source": "folder", "files": files}
    if folder.exists():
        raise StageError(f"model.model_name: {model_name} is a file; give the folder that holds the model")
    return {"model_name": model_name, "source": "hub", "revision": revision}
