"""The fine-tuned model as a standalone Hugging Face model: the adapter folded into the base weights (safetensors, loads
without peft), the training prompt template as its chat template and evaluate's generation settings in its
generation_config.json; then checked against the adapter on test prompts.

The merge holds one copy of the base, in the base's own dtype (a bf16 base merges and saves in bf16), loaded onto
the GPU when there is one, and saves it in shards (`SHARD_SIZE`), so a 7B model merges in the memory it runs in.
QLoRA merges into the base loaded *unquantized*: the 4-bit weights saved memory while training, but rounding the
merged weights back to 4 bits would lose the adapter's small updates. A full fine-tune is already standalone and is
saved as is.

A classifier (params task.type) merges the same way, its head saved with the weights: the export loads with
AutoModelForSequenceClassification, and the check compares the head's logits and predicted classes.

The check runs one model at a time on its own device: the adapter's greedy outputs and logits on the check prompts
are kept, the merged model is saved, freed and reloaded as a user would load it, and its outputs are compared
(these must agree: it is the same function, summed differently; in bf16 or fp16 the logits differ by the rounding
of the merged weights). For QLoRA the merged model is also compared with the model as trained on its 4-bit base
(these differ by the quantization error, so the agreement is reported, not required)."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.config.evaluate import EvaluateParams
from finetune.config.model import ModelParams
from finetune.config.params import Params
from finetune.data.prepared import open_split, read_meta
from finetune.errors import StageError
from finetune.generation import generate
from finetune.models import (
    inference_dtype,
    inference_placement,
    input_device,
    load_finetuned,
    read_train_config,
    saved_dtype,
)
from finetune.outputs import refuse_foreign, replacing
from finetune.tasks import task_of

# what transformers refuses to save beside do_sample=False (a base's sampling defaults, e.g. an instruct model's)
SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff")


def generation_config(model, tokenizer, evaluate: EvaluateParams):
    """The model's generation config with evaluate's settings and the tokenizer's EOS and padding ids, so that plain
    `model.generate(**inputs)` on the export generates as the evaluate stage does (and tools.predict by default)."""
    generation = model.generation_config
    generation.update(do_sample=evaluate.do_sample, max_new_tokens=evaluate.max_new_tokens,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if evaluate.do_sample:
        generation.update(temperature=evaluate.temperature, top_p=evaluate.top_p)
    else:  # greedy ignores them
        for flag in SAMPLING_ONLY:
            if getattr(generation, flag, None) is not None:
                setattr(generation, flag, None)
    return generation


SHARD_SIZE = "5GB"  # per safetensors file of the export; a model bigger than this is saved in shards


def merge(params: Params, test_file: Path) -> dict:
    """Export train.finetuned_dir merged to export.merged_dir, then check it on `test_file`'s first prompts."""
    from transformers import AutoTokenizer

    finetuned_dir, merged_dir = Path(params.train.finetuned_dir), Path(params.export.merged_dir)
    config = read_train_config(finetuned_dir)
    method = config["train"]["method"]
    test_file = Path(test_file)
    if not test_file.exists():
        raise StageError(f"{test_file} not found: run the prepare stage first (dvc repro prepare)")
    refuse_foreign(merged_dir, "model", "export.merged_dir")
    tokenizer = AutoTokenizer.from_pretrained(finetuned_dir)  # saved as it is; the check pads its own copy left
    test = open_split(test_file)
    prompts = list(test.select(range(min(params.export.check_examples, len(test))))["prompt"])
    task = task_of(finetuned_dir)
    check = Check(AutoTokenizer.from_pretrained(finetuned_dir), prompts, params.export.check_max_new_tokens,
                  read_meta(test_file.parent, task.name)["chat"] is None, classify=task.name == "classification")
    placement = inference_placement()
    dtype = saved_dtype(finetuned_dir if method == "full" else ModelParams(**config["model"]))
    as_trained = None
    if method == "qlora":
        as_trained = check.outputs(load_finetuned(finetuned_dir, dtype=inference_dtype(), device_map=placement))
        release()
    model = load_finetuned(finetuned_dir, quantized=False, dtype=dtype, device_map=placement).eval()
    print(f"merging {method} into the base in {dtype} on {input_device(model)}")
    adapter = check.outputs(model)
    if method != "full":
        model = model.merge_and_unload()
    if not check.classify:  # a classifier generates nothing
        model.generation_config = generation_config(model, tokenizer, params.evaluate)
    with replacing(merged_dir, "model", "export.merged_dir") as staged:
        model.save_pretrained(staged, max_shard_size=SHARD_SIZE)  # safetensors, and generation_config.json
        tokenizer.save_pretrained(staged)
    del model
    release()
    print(f"merged {method} model saved to {merged_dir}")

    merged = check.outputs(task.model_class().from_pretrained(
        merged_dir, use_safetensors=True, dtype="auto", device_map=placement))
    release()
    agreeing = "prediction_agreement" if check.classify else "greedy_agreement"
    metrics = {"method": method, "dtype": dtype, "examples": len(check.prompts),
               **agreement(merged, adapter, agreeing)}
    if as_trained is not None:
        metrics.update({f"{k}_vs_4bit": v for k, v in agreement(merged, as_trained, agreeing).items()})
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}


class Check:
    """What the merge check compares of a model: its greedy outputs and its logits (on the CPU, in the model's
    dtype) on the check prompts; for a classifier (`classify`), its predicted classes and the head's logits."""

    def __init__(self, tokenizer, prompts: list[str], max_new_tokens: int, add_special_tokens: bool, batch: int = 8,
                 classify: bool = False):
        self.tokenizer, self.prompts, self.max_new_tokens = tokenizer, prompts, max_new_tokens
        self.add_special_tokens, self.batch, self.classify = add_special_tokens, batch, classify

    @torch.no_grad()
    def outputs(self, model) -> tuple[list[str], list[torch.Tensor]]:
        model.eval()
        if not self.classify:
            settings = EvaluateParams(batch_size=self.batch, max_new_tokens=self.max_new_tokens)
            texts = generate(model, self.tokenizer, self.prompts, settings, self.add_special_tokens)
        self.tokenizer.padding_side = "right" if self.classify else "left"
        logits = []
        for start in range(0, len(self.prompts), self.batch):
            enc = self.tokenizer(self.prompts[start:start + self.batch], return_tensors="pt", padding=True,
                                 add_special_tokens=self.add_special_tokens).to(input_device(model))
            out = model(**enc).logits
            logits.append((out if self.classify else out[enc["attention_mask"].bool()]).cpu())
        if self.classify:
            texts = [model.config.id2label[int(i)] for i in torch.cat(logits).argmax(-1)]
        return texts, logits


def agreement(a: tuple[list[str], list[torch.Tensor]], b: tuple[list[str], list[torch.Tensor]],
              name: str = "greedy_agreement") -> dict[str, float]:
    """Share of prompts with identical greedy outputs (a classifier's: predicted classes), under `name`, and max
    |logit difference| over the prompts' tokens (a classifier's: its head's logits)."""
    same = [x == y for x, y in zip(a[0], b[0], strict=True)]
    diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(a[1], b[1], strict=True))
    return {name: sum(same) / len(same), "max_abs_logit_diff": diff}


def release() -> None:
    """Give a freed model's memory back before the next one loads."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
