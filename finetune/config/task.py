"""params `task`: what is fine-tuned. causal_lm: a response generated after a prompt (supervised fine-tuning);
classification: one label of a fixed set for a text, through a classification head (finetune/tasks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TaskParams:
    type: Literal["causal_lm", "classification"] = "causal_lm"
    # classification: the field holding the text; null = text, sentence, else the prompt (prompt or instruction)
    text_field: str | None = None
    label_field: str = "label"  # classification: a string, or an integer or boolean (read as its name)
    # classification: none | balanced (each class's loss weighted by examples / (classes x its examples))
    class_weights: Literal["none", "balanced"] = "none"

    def problems(self) -> list[str]:
        out = []
        if not self.label_field.strip():
            out.append("task.label_field: must name a field")
        if self.text_field is not None and not self.text_field.strip():
            out.append("task.text_field: must name a field, or be null")
        return out
