"""params `tracking`: the experiment trackers the train stage logs to besides DVCLive, and whether they can run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class MlflowParams:
    enabled: bool = False  # needs the extra: pip install -e ".[mlflow]"
    experiment_name: str = "dvc-finetune"
    run_name: str | None = None  # null = the DVC experiment's name (dvc exp run --name), else "train"
    log_model: bool = True  # the adapter (or, for full fine-tuning, the whole model) as a run artifact


@dataclass
class WandbParams:
    enabled: bool = False  # needs the extra: pip install -e ".[wandb]"
    project: str = "dvc-finetune"
    run_name: str | None = None  # null = the DVC experiment's name (dvc exp run --name), else "train"
    mode: Literal["offline", "online"] = "offline"  # offline: a local run folder, no login; WANDB_MODE overrides
    log_model: bool = True  # the adapter (or whole model) as a model artifact


@dataclass
class TrackingParams:
    """Where the train stage sends its step metrics besides DVCLive (metrics/live, always on)."""
    mlflow: MlflowParams = field(default_factory=MlflowParams)
    wandb: WandbParams = field(default_factory=WandbParams)


