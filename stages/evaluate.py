"""evaluate: score a model on the test split -- loss, perplexity, token metrics, batched generation, text metrics.

    dvc repro evaluate                        # the fine-tuned model (base + adapter, or the full model)
    dvc repro evaluate_base                   # the base model alone; cached, reruns only when its inputs change
    dvc exp run -S evaluate.max_new_tokens=64
    python -m stages.evaluate --model finetuned|base|merged

Reads params `model` and `evaluate` (not the training ones: a generation setting never retrains; the fine-tuned
model describes itself in its train_config.json). Writes metrics/eval_<model>.json,
outputs/predictions_<model>.jsonl (every prompt, reference and prediction) and metrics/confusion_<model>.json
(actual and predicted label per example when the answers are labels, for DVC's confusion-matrix plot; else empty).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from stages import metrics as M
from stages.common import (IGNORE_INDEX, StageError, load_base_model, load_finetuned, load_tokenizer, progress,
                           read_jsonl, require_safetensors, run_main, write_json, write_jsonl)
from stages.params import EvaluateParams, ModelParams, Params, load_params

TEST_FILE = Path("data/prepared/test.jsonl")


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


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], evaluate: EvaluateParams) -> list[str]:
    """Batched generation with left padding and the KV cache, prompts sorted by token length, longest first (little
    padding per batch, and an out-of-memory error shows up in the first batch, not the last). A batch that runs out
    of GPU memory is retried at half the size, and the rest of the run keeps the smaller size. Returns the
    completions in the order of `prompts`."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"  # new tokens must follow each prompt directly
    encoded = tokenizer(prompts)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    sampling = {"do_sample": True, "temperature": evaluate.temperature, "top_p": evaluate.top_p} \
        if evaluate.do_sample else {"do_sample": False}
    completions: dict[int, str] = {}
    size = BatchSize(evaluate.batch_size)
    for idx in progress(size.batches(order), total=-(-len(order) // evaluate.batch_size), desc="generate"):
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt").to(device)
        try:
            out = model.generate(**enc, max_new_tokens=evaluate.max_new_tokens, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)
        except torch.cuda.OutOfMemoryError:
            size.halve(len(idx), "evaluate.batch_size")
            continue
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        completions.update({i: t.strip() for i, t in zip(idx, texts, strict=True)})
        size.done(len(idx))
    return [completions[i] for i in range(len(prompts))]


class BatchSize:
    """Batches of a list at a size that halves when a batch does not fit in memory; a failed batch is retried."""

    def __init__(self, size: int):
        self.size, self.position = size, 0

    def batches(self, items: list):
        while self.position < len(items):
            yield items[self.position:self.position + self.size]

    def done(self, n: int) -> None:
        self.position += n

    def halve(self, failed: int, param: str) -> None:
        if failed == 1:
            raise StageError(f"{param}: out of memory on a single example; lower evaluate.max_new_tokens or "
                             "prepare.max_length, or use a bigger GPU")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.size = max(1, failed // 2)
        print(f"out of memory at a batch of {failed}: continuing at {self.size} "
              f"(set {param}: {self.size} to start there)", file=sys.stderr)


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


def load_model(params: Params, which: str):
    """'base': params.model as is; 'finetuned': as the train stage left it (LoRA, QLoRA on its 4-bit base, or full);
    'merged': the standalone directory the merge stage exported, loaded by plain transformers."""
    from transformers import AutoModelForCausalLM

    if which == "base":
        model = load_base_model(params.model)
    elif which == "finetuned":
        model = load_finetuned(Path(params.train.finetuned_dir))
    else:
        merged_dir = Path(params.export.merged_dir)
        if not (merged_dir / "config.json").exists():
            raise StageError(f"{merged_dir}: no merged model; run the merge stage first (dvc repro merge)")
        require_safetensors(merged_dir, "model.safetensors", "model.safetensors.index.json")
        model = AutoModelForCausalLM.from_pretrained(merged_dir, use_safetensors=True, attn_implementation="sdpa")
    if torch.cuda.is_available() and not getattr(model, "is_loaded_in_4bit", False):
        model = model.to("cuda")
    return model.eval()


def run(params: Params, which: str, test_file: Path = TEST_FILE) -> tuple[dict, list[dict]]:
    """Metrics and per-example predictions for `which` ('base', 'finetuned' or 'merged') on the test split."""
    from transformers import set_seed

    if not test_file.exists():
        raise StageError(f"{test_file} not found: run the prepare stage first (dvc repro prepare)")
    rows = read_jsonl(test_file)
    set_seed(params.evaluate.seed)
    # The base's tokenizer comes with params.model (revision, trust_remote_code); ours are saved beside the weights.
    tokenizer = load_tokenizer(params.model if which == "base" else ModelParams(
        model_name=params.train.finetuned_dir if which == "finetuned" else params.export.merged_dir))
    model = load_model(params, which)
    print(f"evaluating {which} on {len(rows)} test examples ({next(model.parameters()).device})")

    metrics = {"examples": len(rows)}
    metrics.update(loss_and_token_metrics(model, rows, tokenizer.pad_token_id, params.evaluate.batch_size))
    predictions = generate(model, tokenizer, [r["prompt"] for r in rows], params.evaluate)
    references = [r["response"] for r in rows]
    metrics.update(score(predictions, references, params.evaluate))
    records = [{"source": r["source"], "prompt": r["prompt"], "reference": ref, "prediction": pred}
               for r, ref, pred in zip(rows, references, predictions, strict=True)]
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}, records


def main() -> None:
    parser = argparse.ArgumentParser(description="Evaluate a model on the test split.")
    parser.add_argument("--model", choices=["finetuned", "base", "merged"], default="finetuned")
    args = parser.parse_args()
    params = load_params()
    metrics, records = run(params, args.model)
    write_jsonl(Path(f"outputs/predictions_{args.model}.jsonl"), records)
    write_json(Path(f"metrics/confusion_{args.model}.json"), confusion_rows(
        [r["prediction"] for r in records], [r["reference"] for r in records], params.evaluate))
    path = f"metrics/eval_{args.model}.json"
    write_json(Path(path), M.nest(path, metrics))
    print(f"{args.model} on the test split: "
          + ", ".join(f"{k} {metrics[k]:g}" for k in M.HEADLINE if k in metrics) + f"; every metric in {path}")


if __name__ == "__main__":
    run_main(main)
