"""params `resources`: how the experiments running at once on one machine share its cores and GPUs.

No stage depends on this section (dvc.yaml lists it for none): how many threads a run uses and which GPU it runs on
change what it computes at most in the rounding of float sums, so changing them reruns nothing.
finetune/resources.py applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ResourcesParams:
    # auto: the cores (those this process may run on) divided among the stage processes running now on this
    # machine, looked at again as training goes | a number of threads per stage process
    threads: int | Literal["auto"] = "auto"
    # auto: each stage takes GPUs no other running experiment holds (the train stage one per process of
    # distributed.nproc_per_node, the others one), waiting while none is free | a number per stage | all: every
    # GPU CUDA_VISIBLE_DEVICES lists, shared (one run spreading a model over all of them)
    gpus: int | Literal["auto", "all"] = "auto"

    def problems(self) -> list[str]:
        out = []
        if self.threads != "auto" and self.threads < 1:
            out.append(f"resources.threads: {self.threads} must be at least 1 (or auto)")
        if self.gpus not in ("auto", "all") and self.gpus < 1:
            out.append(f"resources.gpus: {self.gpus} must be at least 1 (or auto, or all)")
        return out
