"""Batched generation, greedy or sampled, that gives each prompt the output it would get alone, and halves its batch
when memory runs out."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

from finetune.errors import StageError
from finetune.io import progress
from finetune.models import input_device

if TYPE_CHECKING:
    from finetune.config.evaluate import EvaluateParams


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], evaluate: EvaluateParams, add_special_tokens: bool = True) -> \
        list[str]:
    """Batched generation with left padding and the KV cache, prompts sorted by token length, longest first (little
    padding per batch, and an out-of-memory error shows up in the first batch, not the last). A batch that runs out
    of GPU memory is retried at half the size, and the rest of the run keeps the smaller size. Returns the
    completions in the order of `prompts`. Prompts rendered by a chat template hold their BOS token already:
    `add_special_tokens=False` for them."""
    device = input_device(model)
    tokenizer.padding_side = "left"  # new tokens must follow each prompt directly
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
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
