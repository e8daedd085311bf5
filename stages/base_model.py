"""base_model: the base model's identity, so that the stages that load it rerun exactly when it changes.

    dvc repro                      # runs first, every time (a few milliseconds for the bundled model)
    python -m stages.base_model    # writes models/base_model.json

DVC can depend only on paths named in dvc.yaml, and `model.model_name` is either a folder (the bundled
`models/base`, a model of yours inside or outside the repository) or a hub id. This stage runs on every
`dvc repro` (`always_changed`) and writes models/base_model.json: for a folder, the SHA-256 of every file in it
(cached by size and modification time in .dvc/tmp, so a 15 GB model is read once); for a hub id, the id and the
pinned revision (the hub's content is not checked: pin `model.revision` for a reproducible run). The stages that
load the base model depend on that file, so overwriting a weight file reruns them, and an unchanged model lets DVC
skip them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from stages.common import StageError, run_main, write_json
from stages.params import load_params

IDENTITY_FILE = Path("models/base_model.json")
HASH_CACHE = Path(".dvc/tmp/base_model_hashes.json")


def file_hashes(folder: Path, cache: dict[str, dict]) -> dict[str, str]:
    """SHA-256 of every file under `folder` (relative path -> hex), reusing `cache` entries whose size, modification
    time and inode still match; `cache` is updated in place."""
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.resolve() == IDENTITY_FILE.resolve():
            continue
        stat, key = path.stat(), str(path.resolve())
        seen = cache.get(key)
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        if not seen or seen["stamp"] != stamp:
            with path.open("rb") as handle:
                seen = cache[key] = {"stamp": stamp, "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}
        hashes[path.relative_to(folder).as_posix()] = seen["sha256"]
    return hashes


def identity(model_name: str, revision: str | None, cache: dict[str, dict]) -> dict:
    folder = Path(model_name)
    if folder.is_dir():
        files = file_hashes(folder, cache)
        if not files:
            raise StageError(f"model.model_name: {model_name} is an empty folder")
        return {"model_name": model_name, "source": "folder", "files": files}
    if folder.exists():
        raise StageError(f"model.model_name: {model_name} is a file; give the folder that holds the model")
    return {"model_name": model_name, "source": "hub", "revision": revision}


def main() -> None:
    params = load_params()
    try:
        cache = json.loads(HASH_CACHE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    found = identity(params.model.model_name, params.model.revision, cache)
    if HASH_CACHE.parent.is_dir():
        write_json(HASH_CACHE, cache)
    old = json.loads(IDENTITY_FILE.read_text(encoding="utf-8")) if IDENTITY_FILE.exists() else None
    if old != found:
        write_json(IDENTITY_FILE, found)  # only a change touches the file
    what = f"{len(found['files'])} files hashed" if found["source"] == "folder" else \
        f"a hub model, revision {found['revision'] or 'not pinned'}"
    print(f"base model {params.model.model_name}: {what}, {'changed' if old != found else 'unchanged'}")


if __name__ == "__main__":
    run_main(main)
