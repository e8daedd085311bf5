"""Causal-LM supervised fine-tuning: a prompt in the template, the response after it the only tokens trained on
(and EOS, so the model learns to stop); scored by its loss on the responses and by the answers it generates."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from finetune import metrics as M
from finetune.batching import IGNORE_INDEX, PackedCollator, check_packing
from finetune.generation import BatchSize, generate
from finetune.io import progress

if TYPE_CHECKING:
    from finetune.config.data import PrepareParams
    from finetune.config.evaluate import EvaluateParams
    from finetune.data.records import Example


def tokenize_example(example: Example, tokenizer, prepare: PrepareParams) -> tuple[dict | None, str]:
    """Token ids and labels with the prompt masked out; returns (record or None if dropped, 'ok'|'truncated'|reason).

    Prompt and response are tokenized separately and concatenated, so the mask boundary is exact whatever the
    tokenizer merges; EOS ends the response so the model learns to stop.
    """
    prompt_text = prepare.template.format(prompt=example.prompt)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    status = "ok"
    if len(prompt_ids) + len(response_ids) > prepare.max_length:
        if prepare.overlong == "drop":
            return None, "dropped_overlong"
        if len(prompt_ids) >= prepare.max_length:  # nothing of the response would be left to learn from
            return None, "prompt_too_long"
        response_ids = response_ids[:prepare.max_length - len(prompt_ids)]
        status = "truncated"
    record = {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        "prompt": prompt_text,
        "response": example.response,
        "source": example.source,
    }
    return record, status

CHAT_TEMPLATE_MARKER = "{# dvc-finetune: params prepare.template, one user message #}"  # how predict knows it


def chat_template(template: str) -> str:
    """prepare.template as the tokenizer's Jinja chat template: one user message renders to exactly
    `template.format(prompt=message)` with add_generation_prompt, and to the text up to the last {prompt} without
    it; anything else is refused, as the model only ever saw single prompts. The template's text goes in as JSON
    string literals, whose escapes Jinja reads alike, so none of it is Jinja syntax; and no text stands outside a
    tag, where the tokenizer's trim_blocks/lstrip_blocks would eat whitespace."""
    def literal(text: str) -> str:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"

    sentinel = "\x00prompt\x00"
    *parts, generation_prompt = template.format(prompt=sentinel).split(sentinel)
    content = "{{ messages[0]['content'] }}"
    refusal = json.dumps("this model was fine-tuned on single prompts (params prepare.template): give one user message")
    return (CHAT_TEMPLATE_MARKER
            + "{% if messages | length != 1 or messages[0]['role'] != 'user' %}"
            + "{{ raise_exception(" + refusal + ") }}{% endif %}"
            + "".join(literal(part) + content for part in parts)
            + "{% if add_generation_prompt %}" + literal(generation_prompt) + "{% endif %}")


@torch.no_grad()
def loss_and_token_metrics(model, rows: list[dict], pad_id: int, batch_size: int) -> dict[str, float]:
    """Mean cross-entropy over response tokens (token-weighted, prompt and padding excluded), perplexity, and
    next-token accuracy/precision/recall/F1 of the argmax predictions on those tokens."""
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    y_true: list[int] = []
    y_pred: list[int] = []
    ordered = sorted(rows, key=lambda r: -len(r["input_ids"]))  # similar lengths together: less padding
    size = BatchSize(batch_size)
    for batch in progress(size.batches(ordered), total=-(-len(ordered) // batch_size), desc="loss"):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([r["labels"] + [IGNORE_INDEX] * (width - len(r["labels"])) for r in batch])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(r["input_ids"]) for r in batch])[:, None]).long()
        try:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        except torch.cuda.OutOfMemoryError:
            size.halve(len(batch), "evaluate.batch_size")
            continue
        size.done(len(batch))
        # Position t predicts token t+1.
        logits, targets = logits[:, :-1], labels[:, 1:].to(device)
        keep = targets != IGNORE_INDEX
        total_loss += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        total_tokens += int(keep.sum())
        y_true += targets[keep].tolist()
        y_pred += logits[keep].argmax(-1).tolist()
        del logits  # a batch x length x vocabulary float32 tensor: not held through the next forward pass
    loss = total_loss / total_tokens
    return {"eval_loss": loss, "perplexity": float(torch.exp(torch.tensor(loss))),
            **M.classification(y_true, y_pred, "token")}


def label_set(references: list[str], evaluate: EvaluateParams) -> list[str] | None:
    """The labels to score generations against: given in params, detected (auto), or none (off / free text)."""
    labels = evaluate.labels if isinstance(evaluate.labels, list) else None
    if evaluate.labels == "auto":
        labels = M.detect_labels(references, evaluate.max_labels)
    return [M.normalize_label(label) for label in labels] if labels else None


def score(predictions: list[str], references: list[str], evaluate: EvaluateParams) -> dict[str, float]:
    out = {"exact_match": M.exact_match(predictions, references)}
    out.update(M.bleu(predictions, references))
    out.update(M.rouge(predictions, references))
    out.update(M.generation_stats(predictions))
    labels = label_set(references, evaluate)
    if labels:
        out.update(M.label_metrics(predictions, references, labels))
    return out


def confusion_rows(predictions: list[str], references: list[str], evaluate: EvaluateParams) -> list[dict]:
    """{actual, predicted} label per test example, for DVC's confusion-matrix plot; empty (no plot drawn) when the
    answers are free text rather than labels."""
    labels = label_set(references, evaluate)
    if not labels:
        return []
    return [{"actual": M.normalize_label(r), "predicted": M.parse_label(p, labels)}
            for p, r in zip(predictions, references, strict=True)]


class CausalLM:
    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"

    def model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def tokenize(self, example: Example, tokenizer, prepare: PrepareParams) -> tuple[dict | None, str]:
        return tokenize_example(example, tokenizer, prepare)

    def collator(self, tokenizer, train, prepare: PrepareParams, model, rows: list[dict]):
        """Packed rows of prepare.max_length (checked against the model on a few rows), else padded batches."""
        if train.packing:
            collator = PackedCollator(tokenizer.pad_token_id, prepare.max_length)
            check_packing(model, collator, rows)
            return collator
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)

    def save_with_tokenizer(self, tokenizer, prepare: PrepareParams) -> None:
        tokenizer.chat_template = chat_template(prepare.template)

    def generation_defaults(self, model, tokenizer):
        """The model's generation config with the saved tokenizer's EOS and padding ids (padding may be EOS, set by
        load_tokenizer). The sampling settings are evaluate's, which train does not read (a generation change must
        not retrain): the merge stage writes those into the export."""
        generation = model.generation_config
        generation.eos_token_id, generation.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        return generation

    def evaluate(self, model, tokenizer, rows: list[dict], evaluate: EvaluateParams) -> tuple[dict, list[dict]]:
        """Loss and next-token metrics on the responses, then the generated answers scored against them."""
        metrics = {"examples": len(rows)}
        metrics.update(loss_and_token_metrics(model, rows, tokenizer.pad_token_id, evaluate.batch_size))
        predictions = generate(model, tokenizer, [r["prompt"] for r in rows], evaluate)
        references = [r["response"] for r in rows]
        metrics.update(score(predictions, references, evaluate))
        records = [{"source": r["source"], "prompt": r["prompt"], "reference": ref, "prediction": pred}
                   for r, ref, pred in zip(rows, references, predictions, strict=True)]
        return metrics, records
