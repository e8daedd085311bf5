"""params `evaluate` (how models are scored on the test split) and `export` (the merged model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class EvaluateParams:
    batch_size: int = 64  # prompts per generate() call and rows per loss batch; lower it if memory runs out
    max_new_tokens: int = 24
    do_sample: bool = False  # false = greedy, reproducible
    temperature: float = 1.0  # used only when do_sample
    top_p: float = 1.0  # used only when do_sample
    labels: Literal["auto", "off"] | list[str] = "auto"  # label-set metrics: auto-detect, off, or the label list
    max_labels: int = 20  # auto: references with at most this many distinct values are treated as labels
    seed: int = 0  # for sampling; greedy decoding does not use it
    base_in_4bit: bool = False  # evaluate_base loads the base in 4 bits (params quantization), as QLoRA trains on it

    def problems(self) -> list[str]:
        out = []
        if self.batch_size < 1:
            out.append(f"evaluate.batch_size: {self.batch_size} must be at least 1")
        if self.max_new_tokens < 1:
            out.append(f"evaluate.max_new_tokens: {self.max_new_tokens} must be at least 1")
        if self.temperature <= 0:
            out.append(f"evaluate.temperature: {self.temperature} must be positive")
        if not 0 < self.top_p <= 1:
            out.append(f"evaluate.top_p: {self.top_p} is outside (0, 1]")
        if self.max_labels < 2:
            out.append(f"evaluate.max_labels: {self.max_labels} must be at least 2")
        return out


@dataclass
class ExportParams:
    merged_dir: str = "models/merged"  # standalone model: base + adapter merged, loads without peft
    check_examples: int = 32  # test prompts on which merged and adapter greedy outputs are compared
    check_max_new_tokens: int = 16  # tokens generated per prompt for that comparison

    def problems(self) -> list[str]:
        return [f"export.{name}: {getattr(self, name)} must be at least 1"
                for name in ("check_examples", "check_max_new_tokens") if getattr(self, name) < 1]

