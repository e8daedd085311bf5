"""4-bit (QLoRA) loading and training set-up through bitsandbytes: the quantization config, the layers left
unquantized and their dtypes, and the layout bitsandbytes may repack 4-bit weights into on a CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.config.model import QuantizationParams
    from finetune.config.params import Params


def quantization_config(quant: QuantizationParams, storage: str | None = None):
    """params.quantization -> transformers' BitsAndBytesConfig (4-bit). `storage`: for a model FSDP is to shard,
    which shards only floating-point tensors, the dtype the packed 4-bit weights are stored in (the same bytes,
    viewed as floats) so that they are sharded too instead of replicated on every process: the dtype FSDP gathers
    parameters in (see sharded_storage), or it would cast the packed bytes as numbers."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
        bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=getattr(torch, quant.bnb_4bit_compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, storage) if storage else torch.uint8)


def sharded_storage(quant: QuantizationParams, precision: str) -> str:
    """The dtype FSDP gathers a QLoRA model's parameters in: its mixed-precision dtype under bf16/fp16 autocast,
    else the parameters' own, the compute dtype."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, quant.bnb_4bit_compute_dtype)


def unpacked_4bit_layers(model, all_layers: bool = True) -> None:
    """bitsandbytes >= 0.49 repacks a 4-bit layer's weights for AVX512-BF16 inference the first time it runs in eval
    mode on such a CPU. It cannot repack a layer whose input width is not a multiple of its block size (it fails on
    the reshape), and it keeps the repacked layout when training resumes, where the backward pass fails ("a view of
    a leaf Variable ... in-place operation"). Keep the plain layout for those layers, or, for a model being trained
    (`all_layers`), for every layer: validation runs in eval mode between training steps."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            state = getattr(module.weight, "quant_state", None)
            if all_layers or state is None or module.in_features % state.blocksize:
                module.support_avx512bf16_for_cpu = False


def prepare_4bit_training(model, upcast_embeddings: bool) -> None:
    """peft's prepare_model_for_kbit_training, except for the embeddings and the output head: every weight frozen,
    the unquantized ones (norms, biases) in fp32 for stable training, the embeddings and output head left in the
    compute dtype they loaded in unless `upcast_embeddings` (for a 7B model with a 152k vocabulary that is 2.2 GB
    instead of 4.4 GB). The output head then gets its input in its own dtype, as autocast would give it, so the fp32
    norm before it needs no autocast. Gradient checkpointing is the Trainer's (non-reentrant: no input grads
    needed)."""
    import torch

    layers = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    kept = set() if upcast_embeddings else {id(p) for layer in layers for p in layer.parameters()}
    for param in model.parameters():
        param.requires_grad = False
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit" \
                and id(param) not in kept:
            param.data = param.data.to(torch.float32)
    head = model.get_output_embeddings()
    if not upcast_embeddings and head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype), *args[1:]))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quantization_summary(params: Params) -> str:
    if params.train.method != "qlora":
        return "none"
    q = params.quantization
    return (f"4-bit {q.bnb_4bit_quant_type}{' double-quant' if q.bnb_4bit_use_double_quant else ''}, "
            f"{q.bnb_4bit_compute_dtype} compute")
