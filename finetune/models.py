"""Loading models and tokenizers from a local folder or the hub: safetensors only, no remote code unless params opt in,
4-bit through bitsandbytes for QLoRA, and a fine-tuned folder as the train stage left it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

from finetune.config.model import LoraParams, ModelParams, QuantizationParams
from finetune.errors import StageError
from finetune.quantization import quantization_config, sharded_storage, unpacked_4bit_layers


@contextlib.contextmanager
def fetching(model: ModelParams):
    """A hub model that cannot be fetched is one line naming the model, the reason and the fixes, not a traceback
    (transformers raises OSError with several lines; the hub client's own errors subclass it)."""
    try:
        yield
    except OSError as err:
        if Path(model.model_name).exists():
            raise  # a local folder: the problem is with its files, and the error names them
        text = str(err)
        if "couldn't connect" in text or "offline" in text.lower() or "Connection" in text:
            reason = "no connection to the Hugging Face hub and no copy in the local cache"
        elif "gated" in text or "401" in text or "403" in text:
            reason = "the hub refused access (a gated or private model needs a token with access)"
        elif "not a valid model identifier" in text or "404" in text:
            reason = "no such model on the hub, and no folder of that name here"
        else:
            reason = text.splitlines()[0] if text else type(err).__name__
        name = model.model_name + (f" (revision {model.revision})" if model.revision else "")
        offline = "HF_HUB_OFFLINE is set, so only the Hugging Face cache was searched" \
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else "or set HF_HUB_OFFLINE=1 to use the cache"
        raise StageError(
            f"model.model_name: cannot fetch {name}: {reason}. Point model.model_name at a local copy (e.g. "
            f"`huggingface-cli download {model.model_name} --local-dir models/mine`), set HF_TOKEN for a gated "
            f"model, {offline}") from None


def refuse_remote_code(model: ModelParams) -> None:
    """A model or tokenizer that ships its own Python code (`auto_map`) runs only when params opt in; reading the
    config JSON executes nothing."""
    if model.trust_remote_code:
        return
    from transformers import PretrainedConfig
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    with fetching(model):
        config, _ = PretrainedConfig.get_config_dict(model.model_name, revision=model.revision)
        tokenizer_config = get_tokenizer_config(model.model_name, revision=model.revision)
    for name, found in (("config.json", config), ("tokenizer_config.json", tokenizer_config)):
        if found.get("auto_map"):
            raise StageError(
                f"model.model_name: {model.model_name} ships its own code ({name} has an auto_map: "
                f"{sorted(found['auto_map'])}); review that code, then set model.trust_remote_code: true to run it")


def load_tokenizer(model: ModelParams):
    from transformers import AutoTokenizer

    refuse_remote_code(model)
    with fetching(model):
        tokenizer = AutoTokenizer.from_pretrained(model.model_name, revision=model.revision,
                                                  trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token is None:  # Llama-style tokenizers ship without one; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise StageError(f"model.model_name: the tokenizer of {model.model_name!r} has no EOS token, "
                         "so the model could not learn where a response ends")
    return tokenizer


def inference_dtype() -> str:
    """The dtype a user would run a model in here: bf16 on a GPU that has it, else fp16 on a GPU, fp32 on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"


def inference_placement() -> str | None:
    """Where a model for inference loads: straight onto the GPU(s) when there are any (no host copy first)."""
    import torch

    return "auto" if torch.cuda.is_available() else None


def training_dtype(method: str, precision: str, lora: LoraParams, quantization: QuantizationParams) -> str:
    """The dtype the base loads in for training. A frozen LoRA base under autocast needs no fp32 copy; trained weights
    (full fine-tuning, or base copies LoRA trains: modules_to_save, biases) keep fp32 master weights, and peft keeps
    the adapter in fp32. QLoRA's unquantized layers load in the compute dtype (prepare_4bit_training upcasts)."""
    if method == "qlora":
        return quantization.bnb_4bit_compute_dtype
    if method == "lora" and not base_trains(lora):
        return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    return "float32"


def base_trains(lora: LoraParams) -> bool:
    """Whether LoRA trains weights of the base besides the adapter (modules_to_save, biases)."""
    return bool(lora.modules_to_save) or lora.bias != "none"


def upcasts_embeddings(quantization: QuantizationParams, lora: LoraParams, chat_tokens: bool) -> bool:
    """Whether QLoRA's embeddings and output head go to fp32: when asked, or when something of the base trains
    (modules_to_save, biases, the rows of tokens a chat template added)."""
    return quantization.upcast_embeddings or base_trains(lora) or chat_tokens


def load_base_model(model: ModelParams, quantization: QuantizationParams | None = None, dtype: str = "float32",
                    model_class=None, device_map: str | None = None, fsdp_precision: str | None = None,
                    options: dict | None = None):
    """The base model, from a local directory or the hub, weights through safetensors only; in 4-bit when
    `quantization` is given (QLoRA; its layers that stay unquantized in `dtype`), else in `dtype`: float32 unless
    the weights stay frozen under mixed precision (LoRA with bf16/fp16), where half-size weights halve the memory
    and autocast computes in that dtype anyway. `model_class` is the task's Auto class (a causal LM when not given);
    `device_map` places an unquantized model as it loads (the quantized one goes where quantization.device_map
    says); `fsdp_precision`: the training precision, when FSDP is to shard the model (the 4-bit weights are stored
    in the dtype it gathers them in, quantization.sharded_storage); `options`: the task's (a classifier's classes)."""
    import torch
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    refuse_remote_code(model)
    kwargs = {"device_map": device_map} if device_map else {}
    if quantization is not None:
        storage = sharded_storage(quantization, fsdp_precision) if fsdp_precision else None
        kwargs = {"quantization_config": quantization_config(quantization, storage),
                  "device_map": quantization.device_map}
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process of several: its 4-bit model on its own device
            local = int(os.environ.get("LOCAL_RANK", "0"))
            kwargs["device_map"] = {"": local if torch.cuda.is_available() else "cpu"}
    with fetching(model):
        loaded = model_class.from_pretrained(
            model.model_name, revision=model.revision, dtype=getattr(torch, dtype), use_safetensors=True,
            attn_implementation="sdpa", trust_remote_code=model.trust_remote_code, **kwargs, **(options or {}))
    if quantization is not None:
        unpacked_4bit_layers(loaded, all_layers=False)
    return loaded


def saved_dtype(model: ModelParams | Path) -> str:
    """The dtype a model's weights are saved in (its config.json; float32 when it names none): a base model, or a
    folder of one (a full fine-tune)."""
    from transformers import PretrainedConfig

    if isinstance(model, ModelParams):
        with fetching(model):
            config, _ = PretrainedConfig.get_config_dict(model.model_name, revision=model.revision)
    else:
        config, _ = PretrainedConfig.get_config_dict(str(model))
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def input_device(model):
    """Where a model's inputs go: its input embeddings' device (a model placed over several devices starts there)."""
    return model.get_input_embeddings().weight.device


def read_train_config(finetuned_dir: Path) -> dict:
    path = finetuned_dir / "train_config.json"
    if not path.exists():
        raise StageError(f"{finetuned_dir}: no fine-tuned model found; run the train stage first (dvc repro train)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise StageError(f"{path}: not valid JSON ({err}); rerun the train stage (dvc repro -f train)") from err


def require_safetensors(folder: Path, *names: str) -> None:
    """Refuse a model folder whose weights are not safetensors: a pickle (.bin, .pt) can run code when loaded."""
    if not any((folder / name).exists() for name in names):
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        found = f"it holds {', '.join(pickles)} (pickle, which can run code when loaded)" if pickles else \
            "it holds no weights"
        raise StageError(f"{folder}: no {' or '.join(names)}: {found}; only safetensors weights are loaded. "
                         "Convert them with safetensors, or rerun the train stage")


def load_finetuned(finetuned_dir: Path, quantized: bool = True, dtype: str = "float32", device_map: str | None = None):
    """The fine-tuned model as the train stage left it, read from its own train_config.json (its task's model class):
    a full model, or the base (in 4-bit for QLoRA, unless `quantized` is false) with the adapter on top; weights
    that are not 4-bit in `dtype` (the adapter's own stay fp32, as peft keeps them), placed by `device_map`."""
    import torch

    from finetune.tasks import task_for

    config = read_train_config(finetuned_dir)
    task = task_for(config.get("task", "causal_lm"))  # causal_lm before tasks were recorded
    if config["train"]["method"] == "full":
        require_safetensors(finetuned_dir, "model.safetensors", "model.safetensors.index.json")
        return task.model_class().from_pretrained(finetuned_dir, use_safetensors=True, attn_implementation="sdpa",
                                                  dtype=getattr(torch, dtype), device_map=device_map)
    from peft import PeftModel

    require_safetensors(finetuned_dir, "adapter_model.safetensors")

    known = {f.name for f in dataclasses.fields(QuantizationParams)}  # train_config.json may hold retired keys
    quant = QuantizationParams(**{k: v for k, v in config["quantization"].items() if k in known}) \
        if config["train"]["method"] == "qlora" and quantized else None
    base = load_base_model(ModelParams(**config["model"]), quant, dtype, task.model_class(), device_map=device_map,
                           options=task.model_options(config.get("labels"), config.get("pad_token_id")))
    fit_embeddings(base, config.get("tokenizer_size", 0))  # the tokens a chat template added
    return PeftModel.from_pretrained(base, finetuned_dir)


def lora_config(lora: LoraParams, task_type: str, new_tokens: dict[str, list[int]] | None = None):
    """params.lora -> peft's LoraConfig for the task's model (task_type: peft's TaskType, e.g. CAUSAL_LM).
    `new_tokens`: embedding layer name -> the ids of tokens a chat template added, whose rows are trained too
    (peft's trainable tokens: those rows only, not the whole matrix)."""
    from peft import LoraConfig

    trains_embeddings = any(m in ("embed_tokens", "lm_head", "wte") for m in lora.modules_to_save or [])
    return LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, target_modules=lora.target_modules,
                      lora_dropout=lora.lora_dropout, bias=lora.bias, task_type=task_type,
                      use_dora=lora.use_dora, use_rslora=lora.use_rslora,
                      modules_to_save=lora.modules_to_save,
                      trainable_token_indices=new_tokens if new_tokens and not trains_embeddings else None)


def fit_chat_tokens(model, tokenizer, chat: dict | None) -> dict[str, list[int]] | None:
    """For conversations (prepared.json's "chat"): the embeddings grown to the tokens the template added, their rows
    at the mean, and the template's end-of-turn token as the model's EOS (the Trainer would align it, noisily).
    Returns what peft trains of the new rows (layer name -> token ids), or None."""
    if not chat:
        return None
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    new_ids = sorted(chat["added_tokens"].values())
    fit_embeddings(model, len(tokenizer), new_ids)
    if not new_ids:
        return None
    print(f"embeddings: rows {new_ids} for the chat template's tokens, trained with the model")
    return dict.fromkeys(embedding_layers(model), new_ids)


def embedding_layers(model) -> list[str]:
    """The names (last part) of the input embedding and, when it is not tied to it, the output layer."""
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    tied = outputs is None or outputs.weight.data_ptr() == inputs.weight.data_ptr()
    return [names[id(inputs)]] + ([] if tied else [names[id(outputs)]])


def fit_embeddings(model, size: int, new_ids: list[int] = ()) -> None:
    """Grow the model's embeddings to `size` tokens (the tokenizer's, after a chat template added some), and start
    the rows of `new_ids` at the mean of the others (also rows a padded vocabulary already had), the same on every
    load."""
    import torch

    rows = model.get_input_embeddings().weight.shape[0]
    if size > rows:
        model.resize_token_embeddings(size, mean_resizing=False)
    if not new_ids:
        return
    with torch.no_grad():
        for layer in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                      if m is not None}.values():
            keep = torch.ones(layer.weight.shape[0], dtype=torch.bool)
            keep[list(new_ids)] = False
            layer.weight[list(new_ids)] = layer.weight[keep].float().mean(0).to(layer.weight.dtype)


def check_target_modules(model, lora, model_name: str) -> None:
    """Refuse LoRA targets that name no module of the model, listing the modules that could be targeted."""
    import torch

    names = [name for name, _ in model.named_modules()]
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    for key in ("target_modules", "modules_to_save"):
        wanted = getattr(lora, key)
        if not wanted or wanted == "all-linear":
            continue
        missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            raise StageError(f"lora.{key}: {', '.join(missing)} names no module of {model_name}; its linear layers "
                             f"are {', '.join(linear)} (or use lora.target_modules: all-linear)")


def trained_in_fp32(model):
    """The peft model with the copies of base modules it trains (modules_to_save: a classifier's head, which peft
    adds itself) in fp32, master weights as the adapters have, when the frozen base loaded in 16 bits."""
    import torch

    for name, parameter in model.named_parameters():
        if ".modules_to_save." in name and parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return model


def trainable_parameters(model) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):  # peft counts 4-bit weights at their unpacked size
        return model.get_nb_trainable_parameters()
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())
