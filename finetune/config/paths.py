"""Paths in params that would read stale data or write where the pipeline must not."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.config.schema import ParamsError

if TYPE_CHECKING:
    from finetune.config.params import Params

DATA_PATHS = ("path", "validation_path", "test_path")  # in params.data
OUTPUT_FOLDERS = {"train.output_dir": "checkpoints", "train.finetuned_dir": "model", "export.merged_dir": "model"}
REPOSITORY_PATHS = {".git": "git's repository", ".dvc": "DVC's folder", "dvc.yaml": "dvc.yaml",
                    "dvc.lock": "dvc.lock", "params.yaml": "params.yaml"}


def pipeline_paths(root: Path) -> dict[str, str]:
    """What no output folder may be, hold or lie inside, as dvc.yaml declares it: every stage's inputs and outputs
    (the folders of its code as a whole), and the repository's own files. Paths set from params (`${...}`) are the
    output folders themselves, checked against each other instead."""
    from finetune.config.schema import load_yaml

    found = dict(REPOSITORY_PATHS)
    dvc_yaml = root / "dvc.yaml"
    stages = (load_yaml(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {}) if dvc_yaml.exists() else {}
    for name, stage in stages.items():
        for kind in ("deps", "outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                path = next(iter(entry)) if isinstance(entry, dict) else str(entry)
                if "${" in path:
                    continue
                if path.endswith(".py"):  # code: its package as a whole
                    found.setdefault(Path(path).parts[0], "the pipeline's code")
                else:
                    found.setdefault(path, f"the {name} stage's {'input' if kind == 'deps' else 'output'} {path}")
    return found


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def tracked_files(root: Path) -> list[str]:
    """Files git tracks under `root` (none outside a git repository). Raises ParamsError when `root` is a git
    repository whose tracked files cannot be listed: the outputs could not be checked against them."""
    try:
        found = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=False)
    except OSError as err:
        found = subprocess.CompletedProcess([], 1, b"", str(err).encode())
    said = found.stderr.decode("utf-8", "replace").strip()
    if found.returncode == 0:
        return found.stdout.decode("utf-8", "replace").split("\0")[:-1]
    if "not a git repository" in said and not (root / ".git").exists():
        return []
    raise ParamsError([f"{root}: cannot list the files git tracks, so the output paths cannot be checked "
                       f"against them (git says: {said or 'nothing'})"])


def path_problems(params: Params, root: Path, writes: tuple[str, ...] = (), raw_dir: Path | None = None) -> list[str]:
    """Paths in params that would read stale data or write where the pipeline must not, seen from `root` (the
    repository, where the stages run): data outside data/raw, outputs outside the repository or over its sources,
    outputs overlapping each other, and, for the output folders the running stage `writes` (param names), files in
    them that the pipeline did not write. With `raw_dir` (the prepare stage's declared input), the data paths must
    lie in it. Only the sections `params` holds are checked."""
    from finetune.outputs import TMP_INFIX, ownership_problem

    root = root.resolve()
    out = []
    if raw_dir is not None and params.data is not None:
        raw = (root / raw_dir).resolve()
        for key in DATA_PATHS:
            value = getattr(params.data, key)
            if value is not None and not (root / value).resolve().is_relative_to(raw):
                out.append(f"data.{key}: {value} is outside {raw_dir}/, the prepare stage's declared input, so DVC "
                           f"would not rerun prepare when it changes; move it under {raw_dir}/ "
                           f"(or `dvc add` or `dvc import` it there)")
    protected = {}
    if params.model is not None and (root / params.model.model_name).exists():
        protected[(root / params.model.model_name).resolve()] = "the base model (model.model_name)"
    protected.update({(root / path).resolve(): what for path, what in pipeline_paths(root).items()})
    tracked = tracked_files(root)
    folders: dict[str, Path] = {}
    for name, kind in OUTPUT_FOLDERS.items():
        section, key = name.split(".")
        if getattr(params, section) is None:
            continue
        value = getattr(getattr(params, section), key)
        path = (root / value).resolve()
        if Path(value).is_absolute() or not path.is_relative_to(root):
            out.append(f"{name}: {value} is outside the repository; give a path relative to it, like models/x")
            continue
        if path == root:
            out.append(f"{name}: {value} is the repository itself; give a folder of its own, like models/x")
            continue
        if path != Path(os.path.normpath(root / value)):
            out.append(f"{name}: {value} is a symbolic link or lies under one; give a folder of its own, "
                       "like models/x")
            continue
        if any(part.startswith(".") and TMP_INFIX in part for part in Path(value).parts):
            out.append(f"{name}: {value} is named like the stages' staging folders (.<name>{TMP_INFIX}...), "
                       "which are removed as leftovers; choose another name")
            continue
        clash = next((what for where, what in protected.items() if _overlap(path, where)), None)
        relative = path.relative_to(root).as_posix()
        clash = clash or next((f"{f}, which git tracks" for f in tracked if f == relative
                               or f.startswith(relative + "/")), None)
        if clash:
            out.append(f"{name}: {value} would overwrite {clash}; give a folder of its own, like models/x")
            continue
        other = next((n for n, p in folders.items() if _overlap(path, p)), None)
        if other:
            out.append(f"{name}: {value} overlaps {other}; each output needs a folder of its own")
            continue
        folders[name] = path
        problem = ownership_problem(Path(value), kind, name) if name in writes else None
        if problem:
            out.append(problem)
    return out

