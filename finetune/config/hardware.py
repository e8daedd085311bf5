"""What this machine can do (CUDA, bf16, bitsandbytes, the tracker packages) and the requests it cannot carry out."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.config.model import QuantizationParams
    from finetune.config.tracking import TrackingParams
    from finetune.config.train import TrainParams


@dataclass
class Hardware:
    cuda: bool
    cuda_bf16: bool
    bitsandbytes: bool
    mlflow: bool = True  # the optional tracker packages are installed
    wandb: bool = True
    wandb_online_mode: str | None = None  # WANDB_MODE, which overrides tracking.wandb.mode
    wandb_key: bool = True  # a W&B API key in WANDB_API_KEY or ~/.netrc

    def problems(self, params) -> list[str]:
        """What this machine cannot train or track as `params` (with train, quantization, tracking) ask."""
        return (hardware_problems(params.train, params.quantization, self) + tracking_problems(params.tracking, self)
                + distributed_problems(params.distributed, self))

    @classmethod
    def detect(cls) -> Hardware:
        import importlib.util

        import torch

        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(including_emulation=False),
                   bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
                   mlflow=importlib.util.find_spec("mlflow") is not None,
                   wandb=importlib.util.find_spec("wandb") is not None,
                   wandb_online_mode=os.environ.get("WANDB_MODE"), wandb_key=wandb_key_present())


def wandb_key_present() -> bool:
    """Whether W&B could log in without asking: a key or identity-token file in the environment, or a netrc entry
    (what `wandb login` writes; $NETRC or ~/.netrc) for the W&B host (WANDB_BASE_URL, else api.wandb.ai)."""
    import netrc
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def hardware_problems(train: TrainParams, quant: QuantizationParams, hw: Hardware) -> list[str]:
    """Requests this machine cannot carry out: refused up front instead of silently changed."""
    out = []
    if train.fp16 and not hw.cuda:
        out.append("train.fp16: true, but there is no CUDA device and fp16 training is CUDA-only; "
                   "set train.fp16=false (train.bf16=true gives bf16 on CPU)")
    if train.bf16 and hw.cuda and not hw.cuda_bf16:
        out.append("train.bf16: true, but this GPU has no bf16 support (it needs Ampere or newer); "
                   "use train.fp16=true instead")
    if train.method == "qlora":
        if not hw.bitsandbytes:
            out.append("train.method: qlora needs bitsandbytes; install it with pip install 'bitsandbytes>=0.47'")
        if quant.bnb_4bit_compute_dtype == "float16" and not hw.cuda:
            out.append("quantization.bnb_4bit_compute_dtype: float16 needs a CUDA device; "
                       "use float32 (fast) or bfloat16 on CPU")
        if quant.bnb_4bit_compute_dtype == "bfloat16" and hw.cuda and not hw.cuda_bf16:
            out.append("quantization.bnb_4bit_compute_dtype: bfloat16 is not supported by this GPU; use float16")
    return out


def distributed_problems(distributed, hw: Hardware) -> list[str]:
    """Strategies this machine cannot run as asked: FSDP's CPU offload moves parameters off the GPU, and without
    one there is nowhere to move them from."""
    if distributed is not None and distributed.strategy == "fsdp" and distributed.fsdp.cpu_offload and not hw.cuda:
        return ["distributed.fsdp.cpu_offload: true needs CUDA GPUs (it keeps parameters in CPU memory between "
                "uses on the GPU; without a GPU they are there already); set it false"]
    return []


def tracking_problems(tracking: TrackingParams, hw: Hardware) -> list[str]:
    """Trackers enabled but unusable here: refused when training starts (other stages do not track)."""
    out = []
    for name, installed in (("mlflow", hw.mlflow), ("wandb", hw.wandb)):
        if getattr(tracking, name).enabled and not installed:
            out.append(f"tracking.{name}.enabled: true, but {name} is not installed; "
                       f"install the extra with pip install -e \".[{name}]\" (or set it false)")
    wandb = tracking.wandb
    if wandb.enabled and hw.wandb and (hw.wandb_online_mode or wandb.mode) == "online" and not hw.wandb_key:
        where = "WANDB_MODE=online" if hw.wandb_online_mode == "online" else "tracking.wandb.mode: online"
        out.append(f"tracking.wandb.mode: {where} needs a W&B API key (WANDB_API_KEY in the environment, or "
                   "`wandb login`); use mode offline to log to a local run folder and `wandb sync` it later")
    return out

