"""Sequence classification: a text in, one label of a fixed set out, through a classification head on the base model
(transformers' AutoModelForSequenceClassification: the hidden state of the last token that is not padding, through a
linear layer, `score` on Llama-like models). LoRA trains the adapter and the head: peft's SEQ_CLS task type keeps
the head in `modules_to_save`, saved beside the adapter and merged with it.

prepare reads a text field and a label field (params task), tokenizes the text as it is (no prompt template), and
maps the labels to ids once: the training split's labels, sorted, are the classes (prepared.json), and a validation
or test label that training never saw is refused by file and line. The model's config carries them (id2label,
label2id), so a saved or merged model names its predictions. The prepared records keep the shape of the causal
ones (`labels` a list, here of the one class id), so the splits, statistics and batching are shared.

Scored from the softmax of the head's logits: cross-entropy, accuracy, precision, recall and F1 (weighted and
macro, scikit-learn), per class, and calibration (expected calibration error and a reliability diagram's points).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from finetune import metrics as M
from finetune.data.text import SURROGATE, encode
from finetune.errors import StageError
from finetune.generation import BatchSize
from finetune.io import progress
from finetune.models import input_device
from finetune.tasks.causal_lm import column, token_counts

if TYPE_CHECKING:
    from finetune.config.data import PrepareParams
    from finetune.config.evaluate import EvaluateParams
    from finetune.config.task import TaskParams

TEXT_FIELDS = ("text", "sentence", "prompt", "instruction")  # recognized in this order when task.text_field is null
UNMAPPED = -1  # a record's class id until prepare maps the training split's labels


def fields(task: TaskParams, keys, path) -> tuple[str, str]:
    """(text field, label field) of a data file, from params task or recognized from its fields."""
    keys = set(keys)
    if task.text_field and task.text_field not in keys:
        raise StageError(f"{path}: no field {task.text_field!r} (task.text_field) in fields {sorted(keys)}")
    text = task.text_field or next((name for name in TEXT_FIELDS if name in keys), None)
    if text is None:
        raise StageError(f"{path}: no text to classify in fields {sorted(keys)}; expected one of "
                         f"{', '.join(TEXT_FIELDS)}, or set task.text_field")
    if task.label_field not in keys:
        raise StageError(f"{path}: no field {task.label_field!r} (task.label_field) in fields {sorted(keys)}: "
                         "classification needs each record's label")
    return text, task.label_field


def example_of(record: dict, text_key: str, label_key: str):
    """((text, label), None) of a record, or (None, (kind, problem)) when it is a bad record. A label may be an
    integer or a boolean, read as its name ("1", "true")."""
    text, label = record.get(text_key), record.get(label_key)
    for key, value in ((text_key, text), (label_key, label)):
        if value is None:
            return None, ("missing_field", f"field {key!r} is missing")
    if isinstance(label, bool):
        label = str(label).lower()
    elif isinstance(label, int):
        label = str(label)
    for key, value in ((text_key, text), (label_key, label)):
        if not isinstance(value, str):
            kind = "a string" if key == text_key else "a string, an integer or a boolean"
            return None, ("wrong_type", f"field {key!r} is {type(value).__name__}, expected {kind}")
        if not value.strip():
            return None, ("empty_field", f"field {key!r} is empty")
        if SURROGATE.search(value):
            return None, ("invalid_utf8", f"field {key!r} holds invalid UTF-8 (or an unpaired surrogate escape)")
    return (text, label.strip()), None


def tokenize_texts(pairs: list[tuple[str, str]], tokenizer, prepare: PrepareParams) -> list[tuple[dict | None, str]]:
    """(text, label) pairs -> records: the text's tokens (cut to prepare.max_length, or dropped, as prepare.overlong
    says), the label kept as `response` until prepare maps it to its id."""
    out = []
    for (text, label), ids in zip(pairs, encode(tokenizer, [t for t, _ in pairs], add_special_tokens=True),
                                  strict=True):
        status = "ok"
        if len(ids) > prepare.max_length:
            if prepare.overlong == "drop":
                out.append((None, "dropped_overlong"))
                continue
            ids, status = ids[:prepare.max_length], "truncated"
        out.append(({"input_ids": ids, "labels": [UNMAPPED], "prompt": text, "response": label}, status))
    return out


def unseen_labels(labels: list[str], sources: list[str], classes: list[str], split: str) -> None:
    """Refuse a validation or test example whose label the training split does not have, by file and line."""
    known = set(classes)
    for label, source in zip(labels, sources, strict=True):
        if label not in known:
            raise StageError(f"{source}: label {label!r} ({split} split) is not among the training split's "
                             f"{len(classes)} labels ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})"
                             ": the head cannot learn a class it never trains on; fix the label or add training "
                             "examples of it")


def class_weights(counts: dict[str, int], classes: list[str], setting: str) -> list[float] | None:
    """Each class's loss weight: balanced, examples / (classes x the class's examples) (scikit-learn's
    'balanced'); None for an unweighted loss."""
    if setting == "none":
        return None
    total = sum(counts.values())
    return [round(total / (len(classes) * counts[label]), 6) for label in classes]


def classifier_loss(weights: list[float] | None = None):
    """The Trainer's compute_loss_func: cross-entropy summed over a micro-batch and divided by the examples of the
    whole accumulated batch (num_items_in_batch), as the Trainer expects of a loss function (the model's own loss
    is a micro-batch's mean, which the Trainer would not divide by the accumulation steps). With `weights`, each
    example's term is weighted by its class while training; the validation loss stays unweighted, comparable
    between runs weighted differently."""
    weight = torch.tensor(weights, dtype=torch.float32) if weights else None

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits.float()
        weighted = weight.to(logits.device) if weight is not None and torch.is_grad_enabled() else None
        total = F.cross_entropy(logits, labels.to(logits.device), weight=weighted, reduction="sum")
        return total / (num_items_in_batch if num_items_in_batch is not None else len(labels))

    return loss


def padded(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Token ids padded to the longest (on the right: the head reads the last token that is not padding), and
    their attention mask."""
    width = max(len(ids) for ids in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, row in enumerate(sequences):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class Collator:
    """Texts padded to the longest of the batch, the class ids as one tensor."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return {**padded([r["input_ids"] for r in rows], self.pad_id),
                "labels": torch.tensor([r["labels"][0] for r in rows])}


@torch.no_grad()
def probabilities(model, rows, pad_id: int, batch_size: int) -> np.ndarray:
    """Softmax probabilities (examples x classes, fp32) of the head on `rows` (a Dataset), in the rows' order; a
    batch that runs out of memory is retried at half the size."""
    lengths = token_counts(rows)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # similar lengths together: less padding
    out = np.zeros((len(lengths), model.config.num_labels), dtype=np.float32)
    device, size = input_device(model), BatchSize(batch_size)
    for idx in progress(size.batches(order), total=-(-len(order) // batch_size), desc="classify"):
        batch = padded(rows[idx]["input_ids"], pad_id)
        try:
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))\
                .logits.float()
        except torch.cuda.OutOfMemoryError:
            size.halve(len(idx), "evaluate.batch_size")
            continue
        size.done(len(idx))
        out[idx] = torch.softmax(logits, -1).cpu().numpy()
    return out


class Classification:
    name = "classification"
    peft_task_type = "SEQ_CLS"
    packs = False  # one text per row: the head reads each row's last token

    def model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_options(self, classes: list[str] | None, pad_token_id: int | None = None) -> dict:
        """What the model loads with: the classes, by id and by name, and the padding id (the head reads the last
        token that is not padding); saved in its config."""
        if not classes:
            raise StageError("the prepared data names no classes: rerun the prepare stage (dvc repro prepare)")
        return {"num_labels": len(classes), "id2label": dict(enumerate(classes)), "pad_token_id": pad_token_id,
                "label2id": {label: i for i, label in enumerate(classes)},
                "problem_type": "single_label_classification"}

    def tokenize(self, example, tokenizer, prepare: PrepareParams) -> tuple[dict | None, str]:
        return tokenize_texts([(example.prompt, example.response)], tokenizer, prepare)[0]

    def collator(self, tokenizer, train, prepare: PrepareParams, model, rows) -> Collator:
        return Collator(tokenizer.pad_token_id)

    def loss(self, meta: dict, task: TaskParams):
        """(the Trainer's compute_loss_func, each class's weight by name or None), as task.class_weights says."""
        weights = class_weights(meta["label_counts"], meta["labels"], task.class_weights)
        return classifier_loss(weights), dict(zip(meta["labels"], weights, strict=True)) if weights else None

    def save_with_tokenizer(self, tokenizer, prepare: PrepareParams, chat: dict | None = None) -> None:
        """Nothing: the text is classified as it is, with no prompt template."""

    def generation_defaults(self, model, tokenizer):
        return None

    def evaluate(self, model, tokenizer, rows, evaluate: EvaluateParams, chat: bool = False) -> \
            tuple[dict, list[dict]]:
        """The metrics of the head's predictions (argmax) and probabilities against the test labels, and one record
        per example: its text, reference, prediction, the prediction's probability and every class's."""
        classes = [model.config.id2label[i] for i in range(model.config.num_labels)]
        probs = probabilities(model, rows, tokenizer.pad_token_id, evaluate.batch_size)
        y_true = np.array([labels[0] for labels in column(rows, "labels")])
        y_pred = probs.argmax(-1)
        loss = float(-np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, None)).mean())
        metrics = {"examples": len(y_true), "eval_loss": loss, "classes": len(classes),
                   **M.classifier_scores(y_true, y_pred, probs.max(-1), classes)}
        records = [{"source": source, "text": text, "reference": classes[t], "prediction": classes[p],
                    "confidence": round(float(row.max()), 6),
                    "probabilities": {label: round(float(v), 6) for label, v in zip(classes, row, strict=True)}}
                   for source, text, t, p, row in zip(column(rows, "source"), column(rows, "prompt"), y_true, y_pred,
                                                      probs, strict=True)]
        return metrics, records

    def plots(self, records: list[dict], evaluate: EvaluateParams) -> dict[str, list[dict]]:
        """The rows of the evaluation's plots: the confusion matrix, the per-class bars (points) and the reliability
        diagram (each bin's mean confidence against its accuracy)."""
        per_class = M.per_class([r["reference"] for r in records], [r["prediction"] for r in records])
        bars = [{"class": label, "metric": metric, "score": round(100 * values[metric], 4)}
                for label, values in per_class.items() for metric in ("precision", "recall", "f1")]
        confidence = np.array([r["confidence"] for r in records])
        correct = np.array([r["prediction"] == r["reference"] for r in records])
        return {"confusion": [{"actual": r["reference"], "predicted": r["prediction"]} for r in records],
                "per_class": bars, "calibration": M.reliability(confidence, correct)}


def label_counts(labels: list[str], source) -> dict[str, int]:
    """Each class's training examples; fewer than two classes is no classification."""
    counts = dict(sorted(Counter(labels).items()))
    if len(counts) < 2:
        raise StageError(f"{source}: the training split has {len(counts)} label(s) ({', '.join(counts)}): "
                         "classification needs at least 2 classes (task.label_field)")
    return counts


def training_holds_every_class(positions: dict[str, list[int]], labels: list[str]) -> list[str]:
    """Split positions (of the examples, by split) changed so that the training split holds an example of every
    class: a class whose few examples all fell in validation or test gives one of them to training (a split by
    ratio rounds a rare class's share, down to none). The classes moved, for a warning."""
    in_training = {labels[p] for p in positions["train"]}
    moved = []
    for name in ("validation", "test"):
        for p in list(positions[name]):
            if labels[p] not in in_training:
                positions[name].remove(p)
                positions["train"].append(p)
                in_training.add(labels[p])
                moved.append(labels[p])
    positions["train"].sort()
    return moved
