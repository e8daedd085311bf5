"""The fine-tuned model as a standalone Hugging Face model: the adapter folded into the base weights (safetensors, loads
without peft), the training prompt template as its chat template and evaluate's generation settings in its
generation_config.json; then checked against the adapter on test prompts.

LoRA merges into the fp32 base. QLoRA merges into the base loaded *unquantized*: the 4-bit weights saved memory while
training, but rounding the merged weights back to 4 bits would lose the adapter's small updates. A full fine-tune is
already standalone and is saved as is. The check compares greedy outputs and the largest logit difference of the
reloaded merged model against the adapter on the same unquantized base (these must agree: it is the same function,
summed differently), and for QLoRA also against the model as trained on its 4-bit base (these differ by the
quantization error, so the agreement is reported, not required)."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.config.evaluate import EvaluateParams
from finetune.config.params import Params
from finetune.data.prepared import open_split, read_meta
from finetune.errors import StageError
from finetune.generation import generate
from finetune.models import load_finetuned, read_train_config
from finetune.outputs import refuse_foreign, replacing

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


def export(finetuned_dir: Path, merged_dir: Path, evaluate: EvaluateParams) -> None:
    """The merged weights, the fine-tuned tokenizer (its chat template is prepare.template, written by train) and
    generation_config.json with evaluate's generation settings."""
    from transformers import AutoTokenizer

    model = load_finetuned(finetuned_dir, quantized=False)
    if read_train_config(finetuned_dir)["train"]["method"] != "full":
        model = model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(finetuned_dir)
    model.generation_config = generation_config(model, tokenizer, evaluate)
    refuse_foreign(merged_dir, "model", "export.merged_dir")
    with replacing(merged_dir, "model", "export.merged_dir") as staged:
        model.save_pretrained(staged)  # safetensors, and generation_config.json
        tokenizer.save_pretrained(staged)


@torch.no_grad()
def agreement(model_a, model_b, tokenizer, prompts: list[str], max_new_tokens: int,
              add_special_tokens: bool = True) -> dict[str, float]:
    """Share of prompts with identical greedy outputs, and max |logit difference| over the prompts."""
    settings = EvaluateParams(batch_size=len(prompts), max_new_tokens=max_new_tokens)
    same = [a == b for a, b in zip(generate(model_a, tokenizer, prompts, settings, add_special_tokens),
                                   generate(model_b, tokenizer, prompts, settings, add_special_tokens), strict=True)]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    mask = enc["attention_mask"].bool()
    diff = (model_a(**enc).logits.float() - model_b(**enc).logits.float()).abs()[mask]
    return {"greedy_agreement": sum(same) / len(same), "max_abs_logit_diff": float(diff.max())}


def merge(params: Params, test_file: Path) -> dict:
    """Export train.finetuned_dir merged to export.merged_dir, then check it on `test_file`'s first prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    finetuned_dir, merged_dir = Path(params.train.finetuned_dir), Path(params.export.merged_dir)
    method = read_train_config(finetuned_dir)["train"]["method"]
    test_file = Path(test_file)
    if not test_file.exists():
        raise StageError(f"{test_file} not found: run the prepare stage first (dvc repro prepare)")
    export(finetuned_dir, merged_dir, params.evaluate)
    print(f"merged {method} model saved to {merged_dir}")

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    test = open_split(test_file)
    prompts = list(test.select(range(min(params.export.check_examples, len(test))))["prompt"])
    add_special_tokens = read_meta(test_file.parent)["chat"] is None  # a chat template writes BOS itself
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, use_safetensors=True).eval()
    max_new = params.export.check_max_new_tokens
    metrics = {"method": method, "examples": len(prompts)}
    metrics.update(agreement(merged, load_finetuned(finetuned_dir, quantized=False).eval(), tokenizer, prompts,
                             max_new, add_special_tokens))
    if method == "qlora":
        as_trained = agreement(merged, load_finetuned(finetuned_dir).eval(), tokenizer, prompts, max_new,
                               add_special_tokens)
        metrics.update({f"{k}_vs_4bit": v for k, v in as_trained.items()})
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
