"""A model scored on the test split: the base (params model), the fine-tuned one (as train left it) or the merged
export, each loaded as a user would load it, then scored by its task."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.config.model import ModelParams
from finetune.config.params import Params
from finetune.data.chat import apply_chat
from finetune.data.prepared import open_split, read_meta
from finetune.errors import StageError
from finetune.models import (
    fit_embeddings,
    inference_dtype,
    inference_placement,
    input_device,
    load_base_model,
    load_finetuned,
    load_tokenizer,
    require_safetensors,
)
from finetune.tasks import Task, task_for, task_of, task_of_export

MODELS = ("base", "finetuned", "merged")


def load_model(params: Params, which: str, task: Task, classes: list[str] | None = None, pad_token_id=None):
    """'base': params.model as is (in 4 bits with params.quantization when evaluate.base_in_4bit; a classifier's head
    as initialized, for `classes`); 'finetuned': as the train stage left it (LoRA, QLoRA on its 4-bit base, or full);
    'merged': the standalone directory the merge stage exported, loaded by plain transformers with its task's Auto
    class. Each in the precision a user would run it in here (bf16 or fp16 on a GPU, loaded straight onto it; fp32
    on a CPU)."""
    dtype, placement = inference_dtype(), inference_placement()
    if which == "base":
        quantization = params.quantization if params.evaluate.base_in_4bit else None
        model = load_base_model(params.model, quantization, dtype, task.model_class(), device_map=placement,
                                options=task.model_options(classes, pad_token_id))
    elif which == "finetuned":
        model = load_finetuned(Path(params.train.finetuned_dir), dtype=dtype, device_map=placement)
    else:
        merged_dir = Path(params.export.merged_dir)
        if not (merged_dir / "config.json").exists():
            raise StageError(f"{merged_dir}: no merged model; run the merge stage first (dvc repro merge)")
        require_safetensors(merged_dir, "model.safetensors", "model.safetensors.index.json")
        model = task.model_class().from_pretrained(
            merged_dir, use_safetensors=True, attn_implementation="sdpa", dtype=getattr(torch, dtype),
            device_map=placement)
    return model.eval()


def evaluate(params: Params, which: str, test_file: Path) -> tuple[dict, list[dict], Task]:
    """Metrics and per-example predictions for `which` ('base', 'finetuned' or 'merged') on `test_file`, and the
    task that scored them (params task.type for the base; the one the model was trained for otherwise)."""
    from transformers import set_seed

    test_file = Path(test_file)
    task = task_for(params.task.type if params.task else "causal_lm") if which == "base" else \
        task_of(Path(params.train.finetuned_dir)) if which == "finetuned" else task_of_export(params.export.merged_dir)
    meta = read_meta(test_file.parent, task.name)
    rows = open_split(test_file)
    chat = meta["chat"]
    set_seed(params.evaluate.seed)  # also the base's untrained classification head
    # The base's tokenizer comes with params.model (revision, trust_remote_code); ours are saved beside the weights.
    tokenizer = load_tokenizer(params.model if which == "base" else ModelParams(
        model_name=params.train.finetuned_dir if which == "finetuned" else params.export.merged_dir))
    model = load_model(params, which, task, meta.get("labels"), tokenizer.pad_token_id)
    classes = getattr(model.config, "id2label", None) if task.name == "classification" else None
    if classes and [classes[i] for i in range(len(classes))] != meta["labels"]:
        raise StageError(f"the {which} model's classes ({', '.join(classes.values())}) are not those of "
                         f"{test_file.parent} ({', '.join(meta['labels'])}): rerun the pipeline (dvc repro)")
    if which == "base" and chat:  # conversations: the base reads them as train did, untrained rows for added tokens
        apply_chat(tokenizer, chat)
        fit_embeddings(model, len(tokenizer), sorted(chat["added_tokens"].values()))
    print(f"evaluating {which} on {len(rows)} test examples ({input_device(model)}, {describe_dtype(model)})")
    metrics, records = task.evaluate(model, tokenizer, rows, params.evaluate, chat=chat is not None)
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}, records, task


def describe_dtype(model) -> str:
    return "4-bit" if getattr(model, "is_loaded_in_4bit", False) else str(model.dtype).removeprefix("torch.")
