"""The memory plan: a training run's peak accelerator memory, estimated from the model's config alone, before any
weight is loaded.

The model is built on PyTorch's meta device (shapes, no storage), so a 7B or 70B config costs milliseconds and no
download beyond its config.json. Each component is counted the way this pipeline trains:

- weights: the base in the dtype it trains in (4-bit for QLoRA: half a byte per weight plus bitsandbytes'
  quantization constants, with the embeddings and output head in the compute dtype unless upcast and the norms in
  fp32; fp32 master weights for full fine-tuning; the precision's dtype for a frozen LoRA base under autocast),
  and, when autocast computes fp32 weights in 16 bits, the 16-bit copies it keeps for the backward pass;
- trainable state: each trained parameter in fp32 with its gradient and AdamW's two moments (16 bytes);
- activations for `tokens` tokens per micro-batch: per layer and token, the tensors a Llama-style block saves for
  the backward pass (attention through SDPA, so no tokens-squared scores), 16-bit under autocast but fp32 for
  QLoRA, whose fp32 norms keep the residual stream in fp32; with gradient checkpointing only each layer's input is
  kept, plus one layer's activations while it is recomputed;
- logits: the output layer's logits for those tokens, their fp32 copy for the loss, its log-softmax, the gradient
  and, for 16-bit logits, the gradient cast back to 16 bits (the largest single item for big vocabularies);
- evaluation: the validation pass's logits (no activations kept), which does not coexist with training's.
Under FSDP each process holds its share of the weights and trained state, plus the units it gathers (Plan.sharded).
The total is the largest of the training, evaluation and loading peaks. What it leaves out (the CUDA context, the
allocator's fragmentation, kernels' workspaces) is covered by `HEADROOM` when it is compared with a device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 2**20
HEADROOM = 1.1  # the plan must fit with 10% to spare
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BLOCK, BLOCK2 = 64, 256  # bitsandbytes' 4-bit block size, and the blocks per second-level block (double quant)


@dataclass
class Plan:
    components: dict[str, float]  # bytes of each part of the peak
    tokens: int  # per micro-batch
    checkpointing: bool
    notes: list[str] = field(default_factory=list)
    edges: float = 0.0  # bytes of `weights` in the input embeddings and output head
    replicated: float = 0.0  # bytes of `weights` FSDP cannot shard: bitsandbytes' quantization constants
    gather_scale: float = 1.0  # FSDP gathers fp32 weights in the 16-bit autocast dtype: at half their size

    @property
    def total(self) -> float:
        c = self.components
        training = sum(v for k, v in c.items() if k not in ("evaluation_logits", "weights_while_loading"))
        evaluation = c["weights"] + c["trainable_params"] + c["optimizer_states"] + c["evaluation_logits"] \
            + c.get("fsdp_gathered", 0)
        return max(training, evaluation, c.get("weights_while_loading", 0))

    def summary_mb(self) -> dict[str, float]:
        """The components and the total in MiB, as metrics/train.json records them."""
        out = {f"{k}_mb": round(v / MIB, 1) for k, v in self.components.items()}
        return {**out, "total_mb": round(self.total / MIB, 1), "tokens_per_micro_batch": self.tokens,
                "gradient_checkpointing": self.checkpointing}

    def table(self, available: float | None = None, where: str = "") -> str:
        lines = [f"memory plan ({self.tokens} tokens per micro-batch, gradient checkpointing "
                 f"{'on' if self.checkpointing else 'off'}):"]
        lines += [f"  {k.replace('_', ' '):<20} {size(v):>12}" for k, v in self.components.items()]
        lines.append(f"  {'peak (estimate)':<20} {size(self.total):>12}")
        if available is not None:
            lines.append(f"  {'available' + where:<20} {size(available):>12}: "
                         + ("fits" if self.fits(available) else "does NOT fit")
                         + f" ({HEADROOM - 1:.0%} headroom)")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def sharded(self, processes: int, layers: int, fsdp, loads_whole: bool) -> Plan:
        """One process's plan when FSDP (params distributed.fsdp) shards the weights and the trained state over
        `processes`: a share of each (none on the GPU with cpu_offload), plus the units it gathers to compute
        with, in the autocast dtype (so no autocast copies): the root (embeddings and head) and the decoder layer
        in use and the next, prefetched (full_shard), or every unit from the forward pass through the backward
        (shard_grad_op). `loads_whole`: each process loads the whole model onto its device before it is sharded
        (QLoRA), a peak of its own."""
        c = dict(self.components)
        shardable = c["weights"] - self.replicated
        body = shardable - self.edges if fsdp.auto_wrap == "transformer_layer" else shardable
        root = shardable - body  # the edges, or nothing when the whole model is one unit
        layer = body / layers if fsdp.auto_wrap == "transformer_layer" else body
        gathered = root + (min(2 * layer, body) if fsdp.sharding == "full_shard" else body)
        share = 0.0 if fsdp.cpu_offload else 1 / processes
        c["weights"] = shardable * share + self.replicated
        c.update({k: c[k] * share for k in ("trainable_params", "gradients", "optimizer_states")})
        c["autocast_weight_copies"] = 0.0
        c["fsdp_gathered"] = gathered * self.gather_scale
        c.update({"weights_while_loading": self.components["weights"]} if loads_whole else {})
        return Plan(c, self.tokens, self.checkpointing, self.notes + [
            f"FSDP shards over {processes} processes" + (", shards in CPU memory" if fsdp.cpu_offload else "")])

    def fits(self, available: float) -> bool:
        return self.total * HEADROOM <= available


def size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def skeleton(config, model_class=None, trust_remote_code: bool = False):
    """The model of `config` on the meta device: every parameter's shape, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return (model_class or AutoModelForCausalLM).from_config(config, trust_remote_code=trust_remote_code)


def micro_batch_tokens(train, prepare) -> int:
    """Tokens per micro-batch: the token budget, else the examples per batch at the longest length."""
    return train.max_tokens_per_batch or train.per_device_train_batch_size * prepare.max_length


def estimate(model, train, lora, quantization, tokens: int, eval_tokens: int, precision: str,
             added_rows: int = 0, chat_tokens: bool = False) -> Plan:
    """The plan for training `model` (a skeleton, or a loaded model) as params `train`/`lora`/`quantization` say,
    at `tokens` tokens per micro-batch and `eval_tokens` per validation batch, under `precision` (fp32, bf16,
    fp16). `added_rows`: embedding rows a chat template's tokens add; `chat_tokens`: whether such tokens are trained
    (which keeps QLoRA's embeddings in fp32, as the train stage does)."""
    import torch

    from finetune.models import training_dtype, upcasts_embeddings

    config = model.config.get_text_config()
    method, checkpointing = train.method, train.checkpointing
    half = precision in ("bf16", "fp16")
    # autocast computes in 16 bits; QLoRA's residual stream stays fp32 even then (its norms are fp32, and a 4-bit
    # layer returns its input's dtype)
    act = 2 if half and method != "qlora" else 4
    inputs, head = model.get_input_embeddings(), model.get_output_embeddings()
    edges = {id(p) for m in (inputs, head) if m is not None for p in m.parameters()}
    upcast = upcasts_embeddings(quantization, lora, chat_tokens)
    frozen = BYTES[training_dtype(method, precision, lora, quantization)]  # the LoRA base's
    compute = BYTES[quantization.bnb_4bit_compute_dtype]
    weights = edge_weights = replicated = 0.0
    quantized_layers = 0
    seen: set[int] = set()  # a tied output head shares the input embeddings' weight: counted once
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            n = param.numel()
            if method == "qlora" and isinstance(module, torch.nn.Linear) and module is not head:
                constants = 1 / BLOCK + 4 / (BLOCK * BLOCK2) if quantization.bnb_4bit_use_double_quant else 4 / BLOCK
                size = n * (0.5 + constants)
                replicated += n * constants
                quantized_layers += 1
            elif method == "qlora":
                size = n * (compute if id(param) in edges and not upcast else 4)
            else:
                size = n * (4 if method == "full" else frozen)
            weights += size
            edge_weights += size if id(param) in edges else 0
    if quantization.bnb_4bit_use_double_quant and method == "qlora":  # the nf4 code, the 8-bit code, the offset
        weights, replicated = (w + quantized_layers * (16 * 4 + BLOCK2 * 4 + 8) for w in (weights, replicated))
    edge_bytes = (compute if not upcast else 4) if method == "qlora" else 4 if method == "full" else frozen
    tied = head is None or head.weight is inputs.weight
    weights, edge_weights = (w + added_rows * config.hidden_size * edge_bytes * (1 if tied else 2)
                             for w in (weights, edge_weights))
    # autocast's 16-bit copies of fp32 linear weights, kept for the backward pass
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    copies = 2 * linear if half and (method == "full" or (method == "lora" and frozen == 4)) else 0
    trainable = sum(p.numel() for p in model.parameters()) if method == "full" else \
        adapter_parameters(model, lora, head)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    q = heads * head_dim
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    # saved per token by one block: the two norms' inputs and outputs, q/k/v, the attention output, and the
    # SwiGLU's gate, up, activation and product
    per_layer = (4 * hidden + 2 * q + 2 * kv + 4 * mlp) * act
    if checkpointing:
        activations = tokens * (layers * hidden * act + per_layer)
    else:
        activations = tokens * layers * per_layer
    vocab = head.weight.shape[0] + added_rows if head is not None else 0  # no LM head: a classifier's few logits
    logit = compute if method == "qlora" and not upcast else 2 if half else 4
    # logits, their fp32 copy, log-softmax and gradient, and that gradient cast back to the logits' dtype
    per_logit = logit + 8 + (4 + logit if logit < 4 else 0)
    return Plan({
        "weights": weights,
        "trainable_params": 0 if method == "full" else trainable * 4,  # full: the fp32 weights themselves
        "gradients": trainable * 4,
        "optimizer_states": trainable * 8,
        "autocast_weight_copies": copies,
        "activations": activations,
        "logits": tokens * vocab * per_logit,
        "evaluation_logits": eval_tokens * vocab * (logit + (4 if logit < 4 else 0)),
    }, tokens, checkpointing, edges=edge_weights, replicated=replicated,
        gather_scale=0.5 if half and (method == "full" or frozen == 4) and method != "qlora" else 1.0)


def adapter_parameters(model, lora, head) -> int:
    """Parameters LoRA trains: r x (in + out) per targeted linear layer (DoRA: plus a magnitude per output), and
    the modules trained in full (modules_to_save)."""
    import torch

    targets = lora.target_modules
    count = 0
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear):
            hit = module is not head if targets == "all-linear" else \
                any(name == t or name.endswith("." + t) for t in targets)
            if hit:
                count += lora.r * (module.in_features + module.out_features)
                count += module.out_features if lora.use_dora else 0
        if lora.modules_to_save and short in lora.modules_to_save:
            count += sum(p.numel() for p in module.parameters())
    return count


def plan_run(params, precision: str, model_class=None, tokenizer_size: int = 0, chat_tokens: bool = False,
             processes: int = 1) -> Plan:
    """The plan for one of `processes` training as `params` say (model, train, lora, quantization, prepare,
    distributed), from the model's config alone; `tokenizer_size` and `chat_tokens` as a chat template left the
    tokenizer."""
    from transformers import AutoConfig

    from finetune.models import fetching, refuse_remote_code

    model = params.model
    refuse_remote_code(model)
    with fetching(model):
        config = AutoConfig.from_pretrained(model.model_name, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code)
    shape = skeleton(config, model_class, model.trust_remote_code)
    rows = shape.get_input_embeddings().weight.shape[0]
    plan = estimate(shape, params.train, params.lora, params.quantization,
                    micro_batch_tokens(params.train, params.prepare),
                    params.train.per_device_eval_batch_size * params.prepare.max_length, precision,
                    max(0, tokenizer_size - rows), chat_tokens)
    return for_processes(plan, params, processes, config)


def for_processes(plan: Plan, params, processes: int, config) -> Plan:
    """The plan of each of `processes`: the same under DDP (each holds a replica), sharded under FSDP."""
    distributed = getattr(params, "distributed", None)
    if processes == 1 or distributed is None or distributed.strategy != "fsdp":
        return plan
    return plan.sharded(processes, config.get_text_config().num_hidden_layers, distributed.fsdp,
                        loads_whole=params.train.method == "qlora")


def check_plan(plan: Plan, params, device: str, main: bool = True) -> None:
    """Print the plan beside the free memory of this process's device (the main process prints); on a GPU, refuse a
    run that cannot fit (train.memory_plan: enforce), naming the params that would make it fit. A CPU run only
    warns: RAM is shared and may swap."""
    import sys

    from finetune.errors import StageError

    available, where = available_memory(device)
    if main:
        print(plan.table(available, where))
    if plan.fits(available):
        return
    message = (f"the memory plan's peak, {size(plan.total)} (+{HEADROOM - 1:.0%} headroom), exceeds the "
               f"{size(available)} free{where}. To fit: {advice(plan, params.train)}")
    if device == "cuda" and params.train.memory_plan == "enforce":
        raise StageError(message + ". (train.memory_plan: warn trains anyway)")
    print(f"warning: {message}", file=sys.stderr)


def available_memory(device: str = "cuda") -> tuple[float, str]:
    """Free memory of the device a run would train on, and its name: this process's GPU (LOCAL_RANK under a
    launcher, else the first), else this machine's available RAM (MemAvailable)."""
    import os

    import torch

    if device == "cuda" and torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", 0))
        free, _ = torch.cuda.mem_get_info(index)
        return float(free), f" ({torch.cuda.get_device_name(index)})"
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024, " (RAM)"
    return float("inf"), ""


def advice(plan: Plan, train) -> str:
    """The params that would shrink the largest parts of the plan, largest first."""
    c = plan.components
    ways = {
        "activations": "train.max_tokens_per_batch (fewer tokens per micro-batch; raise "
                       "train.gradient_accumulation_steps to keep the batch)"
                       + ("" if plan.checkpointing else ", train.gradient_checkpointing: true"),
        "logits": "train.max_tokens_per_batch (logits grow with tokens x vocabulary)",
        "weights": "train.method: qlora (4-bit base)" if train.method != "qlora" else
                   "a smaller model (the base is in 4 bits already)",
        "optimizer_states": "train.method: lora or qlora (an adapter instead of every weight)"
                            if train.method == "full" else "a smaller lora.r or fewer lora.target_modules",
        "evaluation_logits": "train.per_device_eval_batch_size or prepare.max_length",
    }
    order = sorted((k for k in ways if c.get(k)), key=lambda k: -c[k])
    return "; ".join(f"{k.replace('_', ' ')} {c[k] / 2**30:.1f} GiB: {ways[k]}" for k in order[:3])
