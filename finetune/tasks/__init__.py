"""The task seam: what a task decides, behind one small interface.

A task says how a raw example becomes a training record (`tokenize`), how records become batches (`collator`), which
model class loads and with what (`model_class`, `model_options`, and the PEFT task type of its adapter), the
loss when it is not the model's own (`loss`), what is saved with the tokenizer and the model for inference
(`save_with_tokenizer`, `generation_defaults`), and how a model is scored on the test split (`evaluate`, `plots`).
The data readers, the training run, the trackers and the stages are the same for every task; params task.type
chooses it.

Causal-LM supervised fine-tuning (`causal_lm`) and sequence classification (`classification`) are the tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Task(Protocol):
    name: str
    peft_task_type: str  # peft's TaskType for the adapter
    packs: bool  # whether train.packing applies (several examples in one row)

    def model_class(self) -> Any:
        """The transformers Auto class the base model loads with."""

    def model_options(self, classes: list[str] | None, pad_token_id: int | None = None) -> dict:
        """What from_pretrained takes besides the weights (a classifier's classes and padding id)."""

    def loss(self, meta: dict, task) -> tuple[Any, Any]:
        """(the Trainer's compute_loss_func, or None for the model's own loss; what to report of it, or None)."""

    def tokenize(self, example, tokenizer, prepare) -> tuple[dict | None, str]:
        """A training record (input_ids, labels, and the fields evaluate needs), or None with the reason."""

    def collator(self, tokenizer, train, prepare, model, rows: list[dict]) -> Any:
        """The data collator the Trainer batches records with."""

    def save_with_tokenizer(self, tokenizer, prepare) -> None:
        """Set what inference needs on the tokenizer before it is saved beside the model."""

    def generation_defaults(self, model, tokenizer) -> Any:
        """The generation config to save with the model, or None."""

    def evaluate(self, model, tokenizer, rows: list[dict], evaluate) -> tuple[dict, list[dict]]:
        """Metrics and one record per test example (what the predictions file holds)."""

    def plots(self, records: list[dict], evaluate) -> dict[str, list[dict]]:
        """The rows of evaluate's plot files (confusion, per_class, calibration); an empty list draws nothing."""


def task_for(name: str) -> Task:
    if name == "causal_lm":
        from finetune.tasks.causal_lm import CausalLM

        return CausalLM()
    if name == "classification":
        from finetune.tasks.classification import Classification

        return Classification()
    raise ValueError(f"no task {name!r}; the tasks are: causal_lm, classification")


def task_of(model_dir: Path) -> Task:
    """The task a fine-tuned folder was trained for (its train_config.json; causal_lm before tasks were recorded)."""
    from finetune.models import read_train_config

    return task_for(read_train_config(Path(model_dir)).get("task", "causal_lm"))


def task_of_export(model_dir: Path) -> Task:
    """The task of a plain transformers model folder (a merged export): a sequence classifier by its config's
    architectures, else a causal LM."""
    import json

    config = Path(model_dir) / "config.json"
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or [] \
        if config.exists() else []
    classifier = any(name.endswith("ForSequenceClassification") for name in architectures)
    return task_for("classification" if classifier else "causal_lm")

