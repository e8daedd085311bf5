"""What a 7B model on one 24 GB GPU needs, checked at toy scale on CPU: the memory plan (7B shapes on the meta
device, its weight bytes against really loaded models), the chunked loss pass and its out-of-memory retry, training's
out-of-memory message, QLoRA's embeddings in the compute dtype, token-budget batches, a bf16 merge and a 4-bit base
evaluated."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT, prepared_rows, run_evaluate, run_merge, run_prepare, run_train, setup_trainer

from finetune.batching import IGNORE_INDEX, PackedCollator, TokenBudgetBatches
from finetune.config.model import LoraParams, QuantizationParams
from finetune.config.params import load_params
from finetune.config.train import TrainParams
from finetune.errors import StageError
from finetune.memory import Plan, check_plan, estimate, skeleton
from finetune.tasks.causal_lm import decoder_and_head, loss_and_token_metrics

# The shapes of two 7B models' public config.json files (no download: the plan needs only these).
SHAPES = {
    "llama-2-7b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                   "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
                   "tie_word_embeddings": False, "torch_dtype": "float16"},
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
}
PARAMETERS = {"llama-2-7b": 6.74e9, "qwen2.5-7b": 7.62e9}


def use(workdir, **sections) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def plan_command(config_dir, *overrides: str, memory_gib: int = 24) -> tuple[int, dict]:
    command = [sys.executable, "-m", "tools.memory_plan", "--config", str(config_dir), "--memory-gib", str(memory_gib),
               "--json", "-S", "prepare.max_length=2048", "-S", "train.per_device_eval_batch_size=1",
               "-S", "train.max_tokens_per_batch=2048"]
    for override in overrides:
        command += ["-S", override]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.mark.parametrize("shape", SHAPES)
def test_memory_plan_of_7b_shapes_qlora_fits_24gb_and_full_fp16_does_not(tmp_path, shape):
    (tmp_path / "config.json").write_text(json.dumps(SHAPES[shape]))
    from transformers import AutoConfig

    model = skeleton(AutoConfig.from_pretrained(tmp_path))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(PARAMETERS[shape], rel=0.01)
    assert all(p.device.type == "meta" for p in model.parameters())

    code, qlora = plan_command(tmp_path, "train.method=qlora", "lora.r=16", "train.bf16=true")
    assert code == 0 and qlora["fits"] and qlora["gradient_checkpointing"]  # auto: on for QLoRA
    assert qlora["tokens_per_micro_batch"] == 2048
    for part in ("weights", "trainable_params", "gradients", "optimizer_states", "activations", "logits"):
        assert qlora[f"{part}_mb"] > 0
    assert 3000 < qlora["weights_mb"] < 6000  # 4-bit linear layers, 16-bit embeddings and head
    assert qlora["total_mb"] < 24 * 1024 / 1.1

    code, full = plan_command(tmp_path, "train.method=full", "train.fp16=true")
    assert code == 1 and not full["fits"]
    assert full["optimizer_states_mb"] == pytest.approx(2 * full["weights_mb"], rel=1e-3)  # fp32 masters, AdamW
    assert full["total_mb"] > 100 * 1024


def test_memory_plan_of_fsdp_gives_each_process_its_share_and_the_layers_it_gathers(tmp_path):
    """Full fine-tuning of a 7B model does not fit one 80 GB GPU; sharded by FSDP over 8 it does: each process holds
    an eighth of the weights, gradients and AdamW's moments, plus the two decoder layers it has gathered (the one
    in use and the next). DDP over 8 keeps a whole replica on each."""
    (tmp_path / "config.json").write_text(json.dumps(SHAPES["llama-2-7b"]))
    run = ("train.method=full", "train.bf16=true", "distributed.nproc_per_node=8")
    code, one = plan_command(tmp_path, *run[:2], memory_gib=80)
    assert code == 1
    code, ddp = plan_command(tmp_path, *run, "distributed.strategy=ddp", memory_gib=80)
    assert code == 1 and ddp["total_mb"] == one["total_mb"]
    code, fsdp = plan_command(tmp_path, *run, "distributed.strategy=fsdp", memory_gib=80)
    assert code == 0 and fsdp["fits"]
    for part in ("weights", "gradients", "optimizer_states"):
        assert fsdp[f"{part}_mb"] == pytest.approx(one[f"{part}_mb"] / 8, rel=1e-3)
    # gathered in bf16 (half the fp32 weights' size): the embeddings and head (the root unit), and two of the 32
    # decoder layers; autocast has no fp32 weights left to copy
    edges_mb = 2 * SHAPES["llama-2-7b"]["vocab_size"] * SHAPES["llama-2-7b"]["hidden_size"] * 4 / 2**20
    layers_mb = one["weights_mb"] - edges_mb
    assert fsdp["fsdp_gathered_mb"] == pytest.approx((edges_mb + 2 * layers_mb / 32) / 2, rel=1e-3)
    assert fsdp["autocast_weight_copies_mb"] == 0 < one["autocast_weight_copies_mb"]
    assert fsdp["activations_mb"] == one["activations_mb"]  # each process computes its own micro-batch
    # QLoRA: the 4-bit model loads whole onto each GPU before it is sharded; the quantization constants stay whole
    _, qlora_one = plan_command(tmp_path, "train.method=qlora", "train.bf16=true", memory_gib=80)
    _, qlora = plan_command(tmp_path, "train.method=qlora", "train.bf16=true", "distributed.nproc_per_node=8",
                            "distributed.strategy=fsdp", memory_gib=80)
    assert qlora["weights_while_loading_mb"] == qlora_one["weights_mb"] and qlora["total_mb"] >= qlora_one["weights_mb"]
    assert qlora_one["weights_mb"] / 8 < qlora["weights_mb"] < qlora_one["weights_mb"] / 4


def test_memory_plan_command_reads_params_and_explains(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SHAPES["qwen2.5-7b"]))
    done = subprocess.run([sys.executable, "-m", "tools.memory_plan", "--config", str(tmp_path), "--memory-gib", "24",
                           "-S", "train.method=full"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "does NOT fit" in done.stdout and "train.method: lora or qlora" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "tools.memory_plan", "--config", str(tmp_path),
                          "-S", "train.method=qlorra"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "train.method" in bad.stderr


def quant_state_bytes(model) -> int:
    """The bytes of bitsandbytes' quantization constants, which get_memory_footprint() does not count."""
    total = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        for tensor in (state.absmax, state.code, getattr(state, "offset", None)):
            total += tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0
        if state.nested:
            total += sum(t.numel() * t.element_size() for t in (state.state2.absmax, state.state2.code))
    return total


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def qwen_shaped(tmp_path_factory, request):
    """A small random Qwen2-shaped model saved in bf16 (linear layers a good share of its weights), its output head
    its own or tied to the input embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("qwen-shaped")
    config = Qwen2Config(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=request.param)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.mark.parametrize("double_quant", [True, False])
def test_plan_weight_bytes_match_really_loaded_models_within_5_percent(qwen_shaped, double_quant):
    from transformers import AutoConfig

    from finetune.config.model import ModelParams
    from finetune.models import load_base_model
    from finetune.quantization import prepare_4bit_training

    shape = skeleton(AutoConfig.from_pretrained(qwen_shaped))
    lora, model = LoraParams(), ModelParams(model_name=str(qwen_shaped))
    quant = QuantizationParams(bnb_4bit_use_double_quant=double_quant, device_map=None)

    bf16 = load_base_model(model, dtype="bfloat16")
    planned = estimate(shape, TrainParams(method="lora", bf16=True), lora, quant, 128, 128, "bf16")
    assert planned.components["weights"] == pytest.approx(bf16.get_memory_footprint(), rel=0.05)

    # upcast when asked, or because something of the base trains (as the train stage decides)
    for upcast, lora in ((False, LoraParams()), (True, LoraParams()), (False, LoraParams(bias="all"))):
        quant.upcast_embeddings = upcast
        forced = upcast or lora.bias != "none"
        four_bit = load_base_model(model, quant, dtype="bfloat16")
        prepare_4bit_training(four_bit, forced)
        assert four_bit.get_input_embeddings().weight.dtype == (torch.float32 if forced else torch.bfloat16)
        real = four_bit.get_memory_footprint() + quant_state_bytes(four_bit)
        planned = estimate(shape, TrainParams(method="qlora"), lora, quant, 128, 128, "fp32")
        assert planned.components["weights"] == pytest.approx(real, rel=0.05)
        assert planned.components["weights"] < 0.6 * bf16.get_memory_footprint() * (2 if forced else 1)


def test_plan_counts_autocasts_16_bit_copies_of_fp32_weights(qwen_shaped):
    """Full fine-tuning under bf16 autocast: each linear layer's weight is cast to bf16 and the copy saved for the
    backward pass; counted here with a saved-tensors hook on a real step."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen_shaped, dtype=torch.float32)
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    shapes |= {shape[::-1] for shape in shapes}  # a matmul may save the transposed view of the copy
    copies: dict[int, int] = {}

    def pack(tensor):
        if tensor.dtype == torch.bfloat16 and tuple(tensor.shape) in shapes:
            copies[tensor.untyped_storage().data_ptr()] = tensor.numel() * 2
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    planned = estimate(skeleton(AutoConfig.from_pretrained(qwen_shaped)), TrainParams(method="full", bf16=True),
                       LoraParams(), QuantizationParams(), 4, 4, "bf16")
    assert planned.components["autocast_weight_copies"] == pytest.approx(sum(copies.values()), rel=0.01)
    fp32 = estimate(skeleton(AutoConfig.from_pretrained(qwen_shaped)), TrainParams(method="full"), LoraParams(),
                    QuantizationParams(), 4, 4, "fp32")
    assert fp32.components["autocast_weight_copies"] == 0


@pytest.mark.parametrize("lora", [LoraParams(r=4), LoraParams(r=8, target_modules="all-linear", use_dora=True)],
                         ids=["q_v", "all-linear-dora"])
def test_plan_counts_the_parameters_peft_trains(qwen_shaped, lora):
    from peft import get_peft_model
    from transformers import AutoConfig

    from finetune.config.model import ModelParams
    from finetune.models import load_base_model, lora_config

    planned = estimate(skeleton(AutoConfig.from_pretrained(qwen_shaped)), TrainParams(), lora, QuantizationParams(),
                       1, 1, "fp32")
    model = get_peft_model(load_base_model(ModelParams(model_name=str(qwen_shaped))), lora_config(lora, "CAUSAL_LM"))
    assert planned.components["trainable_params"] == 4 * model.get_nb_trainable_parameters()[0]


def test_a_run_that_cannot_fit_the_gpu_is_refused_naming_the_params(monkeypatch, capsys):
    import finetune.memory as memory
    from finetune.config.params import Params

    params = Params.defaults()
    plan = Plan({"weights": 8e9, "trainable_params": 1e6, "gradients": 1e6, "optimizer_states": 2e6,
                 "activations": 20e9, "logits": 4e9, "evaluation_logits": 1e9}, 4096, False)
    monkeypatch.setattr(memory, "available_memory", lambda device="cuda": (24 * 2**30, " (a 24 GB GPU)"))
    with pytest.raises(StageError) as refused:
        check_plan(plan, params, "cuda")
    message = str(refused.value)
    assert "train.max_tokens_per_batch" in message and "train.gradient_checkpointing: true" in message
    assert "24.00 GiB free (a 24 GB GPU)" in message
    params.train.memory_plan = "warn"
    check_plan(plan, params, "cuda")  # trains anyway, saying so
    assert "warning: the memory plan's peak" in capsys.readouterr().err
    check_plan(plan, Params.defaults(), "cpu")  # RAM: a warning only


@pytest.fixture
def toy_rows(toy_model_dir):
    from make_dataset import instruction_pairs
    from transformers import AutoTokenizer

    from finetune.config.data import PrepareParams
    from finetune.data.records import Example
    from finetune.tasks.causal_lm import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(toy_model_dir)
    rows = [tokenize_example(Example(p["prompt"], p["response"], f"toy:{i}"), tokenizer, PrepareParams())[0]
            for i, p in enumerate(instruction_pairs(20, seed=3))]
    return rows, tokenizer.pad_token_id


def plain_loss(model, rows, pad_id):
    """Cross-entropy and argmax predictions from the model's full logits, each row alone."""
    total, count, predictions = 0.0, 0, []
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].float()
            targets = torch.tensor(row["labels"][1:])
            keep = targets != IGNORE_INDEX
            total += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
            predictions += logits[keep].argmax(-1).tolist()
    return total / count, predictions


def test_chunked_loss_equals_the_plain_loss(toy_model_dir, toy_rows):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rows, pad_id = toy_rows
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(toy_model_dir),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"],
                                        init_lora_weights=False)).eval()
    for model in (base, adapted):
        assert decoder_and_head(model) is not None  # the decoder's states, then the head a chunk at a time
        expected, _ = plain_loss(model, rows, pad_id)
        for chunk_bytes in (2**28, 4 * 300 * 7):  # one chunk; chunks of 7 positions
            got = loss_and_token_metrics(model, rows, pad_id, batch_size=8, chunk_bytes=chunk_bytes)
            assert got["eval_loss"] == pytest.approx(expected, rel=1e-5)
    # a model whose logits are scaled takes its own logits (the head alone would be wrong)
    base.config.logit_scale = 0.5
    assert decoder_and_head(base) is None
    expected, _ = plain_loss(base, rows, pad_id)
    assert loss_and_token_metrics(base, rows, pad_id, 8, chunk_bytes=4 * 300 * 7)["eval_loss"] == \
        pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("where", ["forward", "head"])
def test_loss_pass_retries_a_batch_that_runs_out_of_memory_anywhere_in_it(toy_model_dir, toy_rows, capsys, where):
    from transformers import AutoModelForCausalLM

    rows, pad_id = toy_rows
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    expected = loss_and_token_metrics(model, rows, pad_id, batch_size=8)
    layer = model.get_decoder() if where == "forward" else model.get_output_embeddings()
    real = layer.forward
    seen = []

    def tight(*args, **kwargs):  # the memory of 3 examples' worth of work
        first = kwargs.get("input_ids", args[0] if args else None)
        n = first.shape[0] if where == "forward" else first.shape[0] // 10
        seen.append(n)
        if n > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*args, **kwargs)

    layer.forward = tight
    got = loss_and_token_metrics(model, rows, pad_id, batch_size=8, chunk_bytes=2**28)
    assert got == pytest.approx(expected)
    err = capsys.readouterr().err
    assert "out of memory at a batch of 8: continuing at 4" in err
    assert "out of memory at a batch of 4: continuing at 2" in err or where == "head"


def test_training_out_of_memory_stops_with_a_message_naming_the_knobs(workdir, monkeypatch):
    from transformers import Trainer

    params = load_params()
    run_prepare(params)

    def out_of_memory(self, model, inputs, num_items_in_batch=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")

    monkeypatch.setattr(Trainer, "training_step", out_of_memory)
    with pytest.raises(StageError) as stopped:
        run_train(params)
    message = str(stopped.value)
    for knob in ("train.max_tokens_per_batch", "train.gradient_checkpointing", "gradient_accumulation_steps",
                 "train.method: qlora", "prepare.max_length"):
        assert knob in message
    assert "Traceback" not in message and not (workdir / "models/finetuned").exists()


def test_qlora_keeps_embeddings_in_the_compute_dtype_and_checkpoints_activations(workdir):
    use(workdir, train={"method": "qlora"}, quantization={"bnb_4bit_compute_dtype": "bfloat16"})
    params = load_params()
    run_prepare(params)
    assert params.train.gradient_checkpointing == "auto" and params.train.checkpointing
    trainer, _, kept_mb = setup_trainer(params)
    model = trainer.model
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    assert trainer.args.activation_checkpointing

    use(workdir, quantization={"upcast_embeddings": True})
    _, _, upcast_mb = setup_trainer(load_params())
    assert kept_mb < upcast_mb

    use(workdir, quantization={"upcast_embeddings": False})
    metrics = run_train(load_params())  # fp32 precision on CPU: the head's input is cast to its bf16
    assert metrics["steps"] == 6 and metrics["final_eval_loss"] < 20
    assert metrics["memory_plan"]["total_mb"] > 0 and metrics["memory_plan"]["gradient_checkpointing"]


@pytest.mark.parametrize("packing", [True, False])
def test_token_budget_batches_bound_every_micro_batch(packing):
    generator = torch.Generator().manual_seed(0)
    lengths = (torch.randint(5, 96, (500,), generator=generator)).tolist()
    budget, row = 400, 96
    batches = TokenBudgetBatches(lengths, budget, max_examples=64, row_length=row, packing=packing, seed=1)
    collator = PackedCollator(0, row)
    seen = sorted(i for batch in batches for i in batch)
    assert seen == list(range(len(lengths)))  # every example once an epoch
    for batch in batches:
        features = [{"input_ids": [1] * lengths[i], "labels": [1] * lengths[i]} for i in batch]
        tokens = collator(features)["input_ids"].numel() if packing else max(lengths[i] for i in batch) * len(batch)
        assert tokens <= budget and len(batch) <= 64
    assert sum(len(b) for b in batches) / len(batches) > 3  # not one example a batch
    first = list(batches)
    batches.set_epoch(1)
    assert sorted(map(tuple, first)) == sorted(map(tuple, batches)) and first != list(batches)


def test_training_with_a_token_budget(workdir, monkeypatch):
    use(workdir, train={"max_tokens_per_batch": 192, "per_device_train_batch_size": 64})
    params = load_params()
    run_prepare(params)
    trainer, _, _ = setup_trainer(params)
    loader = trainer.get_train_dataloader()
    widths = [batch["input_ids"].numel() for batch in loader]
    assert len(widths) == len(trainer.token_batches) and max(widths) <= 192
    from transformers import Trainer

    assert callable(getattr(Trainer, "_run_epoch", None))  # where GuardedTrainer sets the token batches' epoch
    epochs = []  # each epoch takes the batches in its own order, set by the Trainer's epoch loop
    real_set_epoch = TokenBudgetBatches.set_epoch
    monkeypatch.setattr(TokenBudgetBatches, "set_epoch", lambda self, e: (epochs.append(e), real_set_epoch(self, e)))
    use(workdir, train={"max_steps": -1, "num_train_epochs": 2})
    metrics = run_train(load_params())
    assert epochs == sorted(epochs) and set(epochs) == {0, 1}
    assert metrics["memory_plan"]["tokens_per_micro_batch"] == 192
    use(workdir, train={"max_tokens_per_batch": 50})
    with pytest.raises(StageError, match="train.max_tokens_per_batch: 50 is less than one example"):
        setup_trainer(load_params())


def test_bf16_base_merges_and_saves_in_bf16_agreeing_with_the_adapter(workdir):
    """The bundled model saved in bf16, its adapter trained until the answers are learnt: bf16 rounds the merged
    weights, which moves logits by up to ~0.5 here, so only a greedy choice on a near-tie could flip (a random
    toy model, or an adapter 6 steps in, has such ties; this one agrees on every prompt for each seed tried)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16_dir = workdir / "models/bf16-base"
    AutoModelForCausalLM.from_pretrained(ROOT / "models/base").to(torch.bfloat16).save_pretrained(bf16_dir)
    AutoTokenizer.from_pretrained(ROOT / "models/base").save_pretrained(bf16_dir)
    use(workdir, model={"model_name": str(bf16_dir)}, train={"learning_rate": 8e-3, "max_steps": 240},
        export={"check_examples": 64})
    params = load_params()
    run_prepare(params)
    run_train(params)
    checked = run_merge(params)
    assert checked["dtype"] == "bfloat16" and checked["examples"] > 10 and checked["greedy_agreement"] == 1.0
    saved = json.loads((workdir / "models/merged/tokenizer_config.json").read_text())
    assert saved.get("padding_side") == json.loads(
        (workdir / "models/finetuned/tokenizer_config.json").read_text()).get("padding_side")  # not the check's
    merged = AutoModelForCausalLM.from_pretrained(workdir / "models/merged", dtype="auto")
    assert merged.dtype == torch.bfloat16  # saved in the base's dtype, not upcast
    assert json.loads((workdir / "models/merged/config.json").read_text())["dtype"] == "bfloat16"


def test_a_qlora_runs_base_evaluates_in_4_bits_on_cpu(workdir, capsys):
    use(workdir, train={"method": "qlora"}, evaluate={"base_in_4bit": True},
        quantization={"bnb_4bit_compute_dtype": "float32"})
    params = load_params()
    run_prepare(params)
    metrics, records = run_evaluate(params, "base")
    assert "(cpu, 4-bit)" in capsys.readouterr().out
    assert metrics["examples"] == len(records) == len(prepared_rows(workdir / "data/prepared", "test"))
    assert metrics["eval_loss"] > 0
    use(workdir, evaluate={"base_in_4bit": False})
    full, _ = run_evaluate(load_params(), "base")
    assert full["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=0.1) and full["eval_loss"] != \
        metrics["eval_loss"]  # the same model, rounded to 4 bits
