"""params.yaml, typed and checked, section by section.

The dataclasses of the sections *are* the schema, and their defaults are params.yaml's values (a test holds them
equal). `load_params(sections=...)` reads params.yaml and checks the sections a stage reads, and only those (importing
only their modules): unknown keys (naming the closest valid one), wrong types and out-of-range values, the paths, and,
for the stage that trains, the machine. Every problem is collected and raised at once as a `ParamsError`, each with
its line in the file. Values set with `dvc exp run -S` land in params.yaml first, so they get the same checks. The
`params` stage checks the whole file.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from finetune.config.schema import ParamsError, build, load_yaml, located

if TYPE_CHECKING:
    from finetune.config.data import DataParams, PrepareParams
    from finetune.config.distributed import DistributedParams
    from finetune.config.evaluate import EvaluateParams, ExportParams
    from finetune.config.hardware import Hardware
    from finetune.config.model import LoraParams, ModelParams, QuantizationParams
    from finetune.config.resources import ResourcesParams
    from finetune.config.task import TaskParams
    from finetune.config.tracking import TrackingParams
    from finetune.config.train import TrainParams

# section -> the module and class of its schema, in params.yaml's order
SECTIONS = {
    "task": ("finetune.config.task", "TaskParams"),
    "data": ("finetune.config.data", "DataParams"),
    "prepare": ("finetune.config.data", "PrepareParams"),
    "model": ("finetune.config.model", "ModelParams"),
    "train": ("finetune.config.train", "TrainParams"),
    "lora": ("finetune.config.model", "LoraParams"),
    "quantization": ("finetune.config.model", "QuantizationParams"),
    "evaluate": ("finetune.config.evaluate", "EvaluateParams"),
    "export": ("finetune.config.evaluate", "ExportParams"),
    "tracking": ("finetune.config.tracking", "TrackingParams"),
    "distributed": ("finetune.config.distributed", "DistributedParams"),
    "resources": ("finetune.config.resources", "ResourcesParams"),
}


def section_class(name: str) -> type:
    module, cls = SECTIONS[name]
    return getattr(importlib.import_module(module), cls)


PARAMS_FILE = Path("params.yaml")


@dataclass
class Params:
    """params.yaml's sections; those a stage did not load are None."""
    task: TaskParams | None = None
    data: DataParams | None = None
    prepare: PrepareParams | None = None
    model: ModelParams | None = None
    train: TrainParams | None = None
    lora: LoraParams | None = None
    quantization: QuantizationParams | None = None
    evaluate: EvaluateParams | None = None
    export: ExportParams | None = None
    tracking: TrackingParams | None = None
    distributed: DistributedParams | None = None
    resources: ResourcesParams | None = None

    @classmethod
    def defaults(cls) -> Params:
        """Every section at its defaults (params.yaml's values)."""
        return cls(**{name: section_class(name)() for name in SECTIONS})


def parse_params(text: str, source: str = str(PARAMS_FILE), hardware: Hardware | None = None,
                 training: bool = False, root: Path | None = None, writes: tuple[str, ...] = (),
                 sections: Iterable[str] | None = None, raw_dir: Path | None = None) -> Params:
    """Parse and validate params YAML text; raise ParamsError with every problem, each with its line.
    `sections` limits the parsing and the checks to those sections (the others are None); all of them, and no
    unknown one, when not given. With `hardware` and `training`, also refuse what that machine cannot train with
    and the trackers it cannot run; with `root`, the paths that would read or write where they must not
    (`path_problems`; the data paths only with `raw_dir`)."""
    from finetune.config.paths import path_problems

    try:
        node = yaml.compose(text)
        raw = load_yaml(text)
    except yaml.YAMLError as err:
        raise ParamsError([f"{source}: not valid YAML: {err}"]) from err
    problems: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"expected a mapping of sections ({', '.join(SECTIONS)}), got {raw!r}")
        raw = {}
    if sections is None:  # the whole file: every section, and nothing else
        wanted = list(SECTIONS)
        for key in raw:
            if key not in SECTIONS:
                close = difflib.get_close_matches(str(key), SECTIONS, n=1, cutoff=0.6)
                better = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(SECTIONS)}"
                problems.append(f"{key}: unknown key{better}")
    else:
        wanted = list(sections)
        if unknown := set(wanted) - set(SECTIONS):
            raise ValueError(f"no params section {', '.join(sorted(unknown))}")
    params = Params(**{name: build(section_class(name), raw.get(name), f"{name}.", problems) for name in wanted})
    if not problems:  # the values are well-formed: check them against the repository and the machine
        if root is not None:
            problems.extend(path_problems(params, root, writes, raw_dir))
        if hardware is not None and training:  # what this machine can do matters only to the stage that trains
            problems.extend(hardware.problems(params))
    if problems:
        raise ParamsError(located(problems, node, source))
    return params


def load_params(path: Path | str = PARAMS_FILE, sections: Iterable[str] | None = None,
                hardware: Hardware | None = None, writes: tuple[str, ...] = (), raw_dir: Path | None = None) -> Params:
    """params.yaml, its `sections` checked against the schema and the repository's paths: what every stage calls
    first. The train stage passes this machine's `hardware` (what it can train with, the trackers it can run); a stage
    that replaces the output folders named by the params `writes` has them checked for files it did not write; the
    prepare stage passes its declared input `raw_dir`, where the data must lie."""
    path = Path(path)
    if not path.exists():
        raise ParamsError([f"{path}: not found (run from the repository root)"])
    return parse_params(path.read_text(encoding="utf-8"), source=str(path), hardware=hardware,
                        training=hardware is not None, root=Path.cwd(),
                        writes=writes, sections=sections, raw_dir=raw_dir)


def as_dict(section: Any) -> dict[str, Any]:
    return dataclasses.asdict(section)
