"""Causal-LM supervised fine-tuning: a prompt in the template, the response after it the only tokens trained on
(and EOS, so the model learns to stop); scored by its loss on the responses and by the answers it generates."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from finetune import metrics as M
from finetune.batching import IGNORE_INDEX, PackedCollator, check_packing
from finetune.data.text import encode
from finetune.generation import BatchSize, generate
from finetune.io import progress
from finetune.models import input_device

if TYPE_CHECKING:
    from finetune.config.data import PrepareParams
    from finetune.config.evaluate import EvaluateParams
    from finetune.data.records import Example


def tokenize_example(example: Example, tokenizer, prepare: PrepareParams) -> tuple[dict | None, str]:
    """Token ids and labels with the prompt masked out; returns (record or None if dropped, 'ok'|'truncated'|reason).

    Prompt and response are tokenized separately and concatenated, so the mask boundary is exact whatever the
    tokenizer merges; EOS ends the response so the model learns to stop.
    """
    record, status = tokenize_pairs([(example.prompt, example.response)], tokenizer, prepare)[0]
    if record is not None:
        record["source"] = example.source
    return record, status


def tokenize_pairs(pairs: list[tuple[str, str]], tokenizer, prepare: PrepareParams) -> list[tuple[dict | None, str]]:
    """tokenize_example for a batch of (prompt, response) pairs: two batched tokenizer calls."""
    prompts = [prepare.template.format(prompt=prompt) for prompt, _ in pairs]
    prompt_ids = encode(tokenizer, prompts, add_special_tokens=True)
    response_ids = encode(tokenizer, [response for _, response in pairs], add_special_tokens=False)
    eos, limit = tokenizer.eos_token_id, prepare.max_length
    out: list[tuple[dict | None, str]] = []
    for prompt_text, (_, response), p_ids, r_ids in zip(prompts, pairs, prompt_ids, response_ids, strict=True):
        r_ids = r_ids + [eos]
        status = "ok"
        if len(p_ids) + len(r_ids) > limit:
            if prepare.overlong == "drop":
                out.append((None, "dropped_overlong"))
                continue
            if len(p_ids) >= limit:  # nothing of the response would be left to learn from
                out.append((None, "prompt_too_long"))
                continue
            r_ids = r_ids[:limit - len(p_ids)]
            status = "truncated"
        out.append(({"input_ids": p_ids + r_ids, "labels": [IGNORE_INDEX] * len(p_ids) + r_ids,
                     "prompt": prompt_text, "response": response}, status))
    return out


CHAT_TEMPLATE_MARKER = "{# dvc-finetune: params prepare.template, one user message #}"  # how predict knows it
CONVERSATION_MARKER = "{# dvc-finetune: trained on conversations in this template #}"


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
def loss_and_token_metrics(model, rows, pad_id: int, batch_size: int, chunk_bytes: int = 2**28) -> dict[str, float]:
    """Mean cross-entropy over response tokens (token-weighted, prompt and padding excluded), perplexity, and
    next-token accuracy/precision/recall/F1 of the argmax predictions on those tokens. `rows`: a Dataset, read a
    batch at a time (or a list of records). A batch that runs out of memory anywhere in it (forward pass, loss or
    argmax) is retried at half the size."""
    rows = as_dataset(rows)
    device = input_device(model)
    total_loss, total_tokens = 0.0, 0
    y_true: list[int] = []
    y_pred: list[int] = []
    lengths = token_counts(rows)
    ordered = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # similar lengths together: less padding
    size = BatchSize(batch_size)
    for idx in progress(size.batches(ordered), total=-(-len(ordered) // batch_size), desc="loss"):
        batch = rows[idx]
        width = max(len(ids) for ids in batch["input_ids"])
        ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in batch["input_ids"]])
        labels = torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in batch["labels"]])
        mask = (torch.arange(width)[None, :] < torch.tensor([lengths[i] for i in idx])[:, None]).long()
        try:
            loss, targets, predictions = response_loss(model, ids.to(device), mask.to(device), labels, chunk_bytes)
        except torch.cuda.OutOfMemoryError:
            size.halve(len(idx), "evaluate.batch_size")
            continue
        size.done(len(idx))
        total_loss += loss
        total_tokens += len(targets)
        y_true += targets
        y_pred += predictions
    loss = total_loss / total_tokens
    return {"eval_loss": loss, "perplexity": float(torch.exp(torch.tensor(loss))),
            **M.classification(y_true, y_pred, "token")}


# config fields of models whose logits are not simply the output layer applied to the last hidden state
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                 "lm_head_multiplier", "scale_width", "dim_model_base")


def decoder_and_head(model):
    """(the decoder, the output layer) of a model whose logits are exactly head(last hidden state), else None."""
    config = model.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in SCALED_LOGITS):
        return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return (decoder, head) if decoder is not None and head is not None and decoder is not model else None


def response_loss(model, ids, mask, labels, chunk_bytes: int) -> tuple[float, list[int], list[int]]:
    """Summed cross-entropy of a padded batch's response tokens, their targets and argmax predictions. The logits
    are computed for the response positions only, a chunk of `chunk_bytes` of fp32 logits at a time, from the
    decoder's hidden states; a model with scaled logits gives its own logits (one batch, in its dtype), upcast a
    chunk at a time. Position t predicts token t+1."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    split = decoder_and_head(model)
    if split:  # a model spread over GPUs leaves its hidden states on the last one
        decoder, head = split
        states = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]
    else:
        states, head = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1], None
    states, targets = states[keep.to(states.device)], targets[keep]
    vocab = head.weight.shape[0] if head is not None else states.shape[-1]
    step = max(1, chunk_bytes // (4 * vocab))
    loss, predictions = 0.0, []
    for start in range(0, len(targets), step):
        part = states[start:start + step]
        logits = (head(part) if head is not None else part).float()
        part_targets = targets[start:start + step].to(logits.device)
        loss += F.cross_entropy(logits, part_targets, reduction="sum").item()
        predictions += logits.argmax(-1).tolist()
        del logits
    return loss, targets.tolist(), predictions


def as_dataset(rows):
    """Records as a Dataset: a list of them in memory, as tests build them; a Dataset as it is."""
    if isinstance(rows, list):
        from datasets import Dataset

        return Dataset.from_list(rows)
    return rows


def column(rows, name: str) -> list:
    """One field of every record, through Arrow (no row dicts)."""
    return rows.with_format("arrow")[name].to_pylist()


def token_counts(rows) -> list[int]:
    import pyarrow.compute as pc

    return pc.list_value_length(rows.with_format("arrow")["input_ids"]).to_pylist()


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
    packs = True

    def model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def model_options(self, classes: list[str] | None = None, pad_token_id: int | None = None) -> dict:
        return {}

    def loss(self, meta: dict, task) -> tuple[None, None]:
        return None, None  # the model's own: mean cross-entropy over the trained tokens

    def tokenize(self, example: Example, tokenizer, prepare: PrepareParams) -> tuple[dict | None, str]:
        return tokenize_example(example, tokenizer, prepare)

    def collator(self, tokenizer, train, prepare: PrepareParams, model, rows: list[dict]):
        """Packed rows of prepare.max_length (checked against the model on a few rows), else padded batches."""
        if train.packing:
            collator = PackedCollator(tokenizer.pad_token_id, prepare.max_length)
            check_packing(model, collator, [rows[i] for i in range(min(4, len(rows)))])
            return collator
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)

    def save_with_tokenizer(self, tokenizer, prepare: PrepareParams, chat: dict | None = None) -> None:
        """The prompt template as the chat template; conversations keep the chat template they were rendered with
        (already on the tokenizer, with the tokens it added)."""
        if not chat:
            tokenizer.chat_template = chat_template(prepare.template)
        elif CONVERSATION_MARKER not in tokenizer.chat_template:  # a Jinja comment: renders nothing
            tokenizer.chat_template += CONVERSATION_MARKER

    def generation_defaults(self, model, tokenizer):
        """The model's generation config with the saved tokenizer's EOS and padding ids (padding may be EOS, set by
        load_tokenizer). The sampling settings are evaluate's, which train does not read (a generation change must
        not retrain): the merge stage writes those into the export."""
        generation = model.generation_config
        generation.eos_token_id, generation.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        return generation

    def evaluate(self, model, tokenizer, rows, evaluate: EvaluateParams, chat: bool = False) -> \
            tuple[dict, list[dict]]:
        """Loss and next-token metrics on the trained tokens, then the generated answers scored against the
        references. Conversations: the model answers the final turn from the conversation before it, rendered by
        the chat template with its generation prompt (which holds any BOS token itself); the records keep the
        conversation."""
        metrics = {"examples": len(rows)}
        metrics.update(loss_and_token_metrics(model, rows, tokenizer.pad_token_id, evaluate.batch_size))
        prompts, references, sources = column(rows, "prompt"), column(rows, "response"), column(rows, "source")
        predictions = generate(model, tokenizer, prompts, evaluate, add_special_tokens=not chat)
        metrics.update(score(predictions, references, evaluate))
        records = [{"source": source, "prompt": prompt, "reference": ref, "prediction": pred}
                   for source, prompt, ref, pred in zip(sources, prompts, references, predictions, strict=True)]
        if chat:
            for record, messages in zip(records, column(rows, "messages"), strict=True):
                record["messages"] = json.loads(messages)
        return metrics, records

    def plots(self, records: list[dict], evaluate: EvaluateParams) -> dict[str, list[dict]]:
        """The confusion matrix of labels parsed from the generations, when the answers are labels."""
        return {"confusion": confusion_rows([r["prediction"] for r in records], [r["reference"] for r in records],
                                            evaluate), "per_class": [], "calibration": []}
