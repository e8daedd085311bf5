"""base_model: the base model's identity, so that the stages that load it rerun exactly when it changes.

    dvc repro                      # runs first, every time (a few milliseconds for the bundled model)
    python -m stages.base_model --out models/base_model.json --cache .dvc/tmp/base_model_hashes.json

DVC can depend only on paths named in dvc.yaml, and `model.model_name` is either a folder (the bundled
`models/base`, a model of yours inside or outside the repository) or a hub id. This stage runs on every
`dvc repro` (`always_changed`) and writes the identity (finetune/identity.py): for a folder, the SHA-256 of every
file in it (cached by size and modification time in --cache, so a 15 GB model is read once); for a hub id, the id
and the pinned revision (the hub's content is not checked: pin `model.revision` for a reproducible run). The stages
that load the base model depend on that file, so overwriting a weight file reruns them, and an unchanged model lets
DVC skip them. Reads params `model.model_name` and `model.revision`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from finetune.config.params import load_params
from finetune.entrypoint import run_main
from finetune.identity import identity
from finetune.io import write_json

SECTIONS = ["model"]  # of params.yaml, checked here


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the base model's identity.")
    parser.add_argument("--out", type=Path, required=True, help="the identity file (dvc.yaml's output)")
    parser.add_argument("--cache", type=Path, required=True, help="file hashes kept between runs (not an output)")
    args = parser.parse_args()
    model = load_params(sections=SECTIONS).model
    try:
        cache = json.loads(args.cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    found = identity(model.model_name, model.revision, cache, skip=args.out)
    if args.cache.parent.is_dir():
        write_json(args.cache, cache)
    old = json.loads(args.out.read_text(encoding="utf-8")) if args.out.exists() else None
    if old != found:
        write_json(args.out, found)  # only a change touches the file
    what = f"{len(found['files'])} files hashed" if found["source"] == "folder" else \
        f"a hub model, revision {found['revision'] or 'not pinned'}"
    print(f"base model {model.model_name}: {what}, {'changed' if old != found else 'unchanged'}")


if __name__ == "__main__":
    run_main(main)
