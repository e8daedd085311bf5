"""params `distributed`: how many processes train, and how they share the work (PyTorch's own DDP or FSDP)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class FsdpParams:
    """PyTorch's FSDP2 (fully_shard) through accelerate, used when strategy is fsdp (CUDA, or gloo on CPU)."""
    # full_shard: parameters gathered for each use, then resharded | shard_grad_op: kept gathered from the forward
    # pass through the backward pass (one all-gather less, more memory)
    sharding: Literal["full_shard", "shard_grad_op"] = "full_shard"
    # transformer_layer: one unit per decoder layer (gathered one at a time) | none: the whole model one unit
    auto_wrap: Literal["transformer_layer", "none"] = "transformer_layer"
    cpu_offload: bool = False  # parameters and gradients in CPU memory between uses: slower, fits bigger models
    state_dict_type: Literal["full", "sharded"] = "full"  # checkpoints: gathered on the main process, or per shard


@dataclass
class DistributedParams:
    nproc_per_node: int = 1  # processes on this node (one per GPU); more than 1 starts them with torch.distributed.run
    strategy: Literal["ddp", "fsdp"] = "ddp"  # ddp: a replica per process | fsdp: parameters sharded over them
    fsdp: FsdpParams = field(default_factory=FsdpParams)

    def problems(self) -> list[str]:
        return [] if self.nproc_per_node >= 1 else [
            f"distributed.nproc_per_node: {self.nproc_per_node} must be at least 1"]
