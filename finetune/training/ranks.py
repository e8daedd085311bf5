"""Which process this is, in a run of one or several (torchrun, accelerate launch): one writer per file.

Every side effect of a training run (deleting or writing files, DVCLive and the trackers, checkpoint markers, the
final save, the metrics) is done by the main process, after a barrier where the others must have finished; counts
are summed over processes. With one process these are no-ops. Before the process group is set up (the Trainer does
it), the launcher's environment says which process this is (RANK, WORLD_SIZE: torchrun and accelerate set them).
"""

from __future__ import annotations

import os

import torch


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if distributed() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return torch.distributed.get_rank() if distributed() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait until every process has got here (before the main one writes what they all contributed to)."""
    if distributed():
        torch.distributed.barrier()


def summed(*counts: float) -> list[float]:
    """Each count summed over the processes (this process's share in, the run's total out)."""
    if not distributed():
        return list(counts)
    # NCCL reduces only CUDA tensors; gloo, CPU ones
    device = f"cuda:{torch.cuda.current_device()}" if torch.distributed.get_backend() == "nccl" else "cpu"
    total = torch.tensor(counts, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.tolist()


def strategy(model) -> str:
    """How the run shared the model, read from the model itself: fsdp (sharded parameters), ddp or single."""
    if any(hasattr(p, "to_local") for p in model.parameters()):
        return "fsdp"
    return "ddp" if world_size() > 1 else "single"


def parameter_share(model) -> float:
    """The fraction of the model's parameter bytes this process holds: 1 for a replica, about 1/N when FSDP has
    sharded them over N processes (what the strategy saves, measured on the model itself)."""
    held = total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor's numel() is the whole parameter's
        held += local.numel() * local.element_size()
        total += p.numel() * p.element_size()
    return held / total if total else 1.0


def gathered_state_dict(model, trained_only: bool) -> dict:
    """The model's full state dict, FSDP's shards gathered into the main process's CPU memory (empty on the
    others); with `trained_only`, the trained parameters alone (an adapter), so the frozen base is not gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only))
