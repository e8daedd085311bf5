"""params `model` (the base model), `quantization` (its 4-bit loading for QLoRA) and `lora` (the adapter)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelParams:
    model_name: str = "models/base"  # a local directory or a Hugging Face hub id, e.g. Qwen/Qwen2.5-0.5B
    revision: str | None = None  # pin a hub commit so a hub model is as reproducible as a local one
    trust_remote_code: bool = False  # run Python code shipped with the model; only after reviewing it

    def problems(self) -> list[str]:
        return [] if self.model_name.strip() else ["model.model_name: must not be empty"]



@dataclass
class QuantizationParams:
    """bitsandbytes 4-bit loading of the base model, used when train.method is qlora."""
    bnb_4bit_use_double_quant: bool = True  # quantize the quantization constants too: ~0.4 bit/param less
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"  # nf4 suits normally distributed weights
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # dtype of the matmuls
    device_map: str | None = "auto"  # where the quantized layers go; auto = the GPU if there is one
    # the layers left unquantized: norms are trained in fp32; the embeddings and output head stay in the compute
    # dtype (as peers keep them) unless this is true (peft's prepare_model_for_kbit_training upcasts them)
    upcast_embeddings: bool = False


@dataclass
class LoraParams:
    r: int = 8  # adapter rank: higher = more capacity, more memory
    lora_alpha: int = 32  # scale = lora_alpha / r (or / sqrt(r) with use_rslora)
    target_modules: list[str] | Literal["all-linear"] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_dropout: float = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = False  # weight-decomposed LoRA: closer to full fine-tuning, ~2x slower steps
    use_rslora: bool = False  # rank-stabilized scale alpha/sqrt(r): keeps high ranks learning
    modules_to_save: list[str] | None = None  # modules trained in full beside the adapter, e.g. [lm_head]

    def problems(self) -> list[str]:
        out = []
        if self.r < 1:
            out.append(f"lora.r: {self.r} must be at least 1")
        if self.lora_alpha <= 0:
            out.append(f"lora.lora_alpha: {self.lora_alpha} must be positive")
        if not 0 <= self.lora_dropout < 1:
            out.append(f"lora.lora_dropout: {self.lora_dropout} is outside [0, 1)")
        if not self.target_modules:
            out.append("lora.target_modules: must name at least one module")
        return out

