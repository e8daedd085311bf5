"""The layout holds: stages are thin, the library has no command line, and each stage of dvc.yaml depends on every
module of the library whose code it runs (found by reading the imports), so DVC reruns it when that code changes,
and on no params section it does not read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
LIBRARY = ROOT / "finetune"


def module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    for found in (path.with_suffix(".py"), path / "__init__.py"):
        if found.exists():
            return found
    return None


def imported(path: Path) -> set[Path]:
    """The library modules `path` imports, anywhere in it (functions included; not imports for type checking), and
    the packages on the way to them (importing finetune.config.data runs finetune/config/__init__.py)."""
    tree = ast.parse(path.read_text())
    checking = [node for node in ast.walk(tree) if isinstance(node, ast.If)
                and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"]
    skipped = {id(n) for block in checking for stmt in block.body for n in ast.walk(stmt)}
    names = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        if name.split(".")[0] != "finetune":
            continue
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # the packages on the way, and the module itself
            if (file := module_file(".".join(parts[:depth]))) is not None:
                found.add(file)
    return found


def closure(start: Path) -> set[Path]:
    seen, todo = set(), [start]
    while todo:
        for found in imported(todo.pop()) - seen:
            seen.add(found)
            todo.append(found)
    return seen


def loaded_sections(stage: dict) -> set[str]:
    """The params sections a stage loads: its module's SECTIONS (by --model for evaluate)."""
    import importlib

    words = stage["cmd"].split()
    sections = importlib.import_module(words[2]).SECTIONS
    return set(sections[words[words.index("--model") + 1]] if isinstance(sections, dict) else sections)


def stage_module(stage: dict) -> Path:
    return ROOT / (stage["cmd"].split()[2].replace(".", "/") + ".py")


@pytest.mark.parametrize("name", STAGES)
def test_each_stage_depends_on_the_library_code_it_runs(name):
    stage = STAGES[name]
    deps = [ROOT / (next(iter(d)) if isinstance(d, dict) else d) for d in stage.get("deps", [])]
    assert stage_module(stage) in deps, f"{name} does not depend on its own module"
    from finetune.config.params import SECTIONS

    runs = closure(stage_module(stage))  # and the schema modules of the sections it loads (imported by name)
    for section in loaded_sections(stage):
        runs |= {module_file(SECTIONS[section][0])} | closure(module_file(SECTIONS[section][0]))
    covered = [LIBRARY / "__init__.py", *deps]  # the package's __init__: a logging setting
    uncovered = sorted(str(path.relative_to(ROOT)) for path in runs
                       if not any(path == d or path.is_relative_to(d) for d in covered))
    assert uncovered == [], f"{name} runs code dvc.yaml does not list as its deps: {uncovered}"


@pytest.mark.parametrize("name", [n for n in STAGES if n != "params"])
def test_each_stage_loads_only_params_sections_dvc_yaml_says_it_reads(name):
    from conftest import stage_params

    assert loaded_sections(STAGES[name]) <= stage_params(name)


def test_a_tracking_option_is_code_only_train_depends_on():
    readers = {name for name, stage in STAGES.items() if any(
        str(next(iter(d)) if isinstance(d, dict) else d) in ("finetune/config/tracking.py", "finetune/config")
        for d in stage.get("deps", []))}
    assert readers == {"train", "params"}


def test_stages_are_thin_and_the_library_has_no_command_line():
    for path in (ROOT / "stages").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 80, path
    for path in LIBRARY.rglob("*.py"):
        text = path.read_text()
        assert "argparse" not in text and "__main__" not in text, path
        assert len(text.splitlines()) <= 300, path  # a module that grows past this holds more than one concern
