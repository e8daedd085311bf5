"""Packed batches: same logits and loss as unpacked, loss normalized by supervised tokens across accumulation."""

import pytest
import torch
from conftest import prepared_rows, run_prepare, setup_trainer
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

from finetune.batching import IGNORE_INDEX, PackedCollator, check_packing, first_fit_decreasing, real_tokens
from finetune.config.params import load_params
from finetune.errors import StageError
from finetune.models import load_tokenizer


@pytest.fixture
def prepared(workdir):
    params = load_params()
    run_prepare(params)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]}  # what training reads of a split
            for r in prepared_rows(workdir / "data/prepared", "train")]
    tokenizer = load_tokenizer(params.model)
    model = AutoModelForCausalLM.from_pretrained(params.model.model_name, attn_implementation="sdpa")
    model.config.use_cache = False
    return params, rows, tokenizer, model.eval()


def test_first_fit_decreasing_fills_rows_without_overflow():
    lengths = [30, 17, 25, 38, 20, 33, 18, 29, 21]
    bins = first_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) == 4  # 231 tokens: the fewest rows of 64 possible
    assert first_fit_decreasing([100, 5], 64) == [[0], [1]]  # longer than a row: a row of its own


def test_packed_rows_restart_positions_and_mask_boundaries(prepared):
    params, rows, tokenizer, _ = prepared
    batch = PackedCollator(tokenizer.pad_token_id, row_length=256)(rows[:8])
    assert batch["input_ids"].shape[0] < 8  # several examples per row
    assert "attention_mask" not in batch  # the mask comes from the position ids
    assert real_tokens(batch) == sum(len(r["input_ids"]) for r in rows[:8])
    starts = (batch["position_ids"] == 0) & (torch.roll(batch["position_ids"], -1, dims=1) == 1)
    assert int(starts.sum()) == 8
    assert (batch["labels"][starts] == IGNORE_INDEX).all()  # no example predicts the next example's first token


def test_example_logits_are_the_same_packed_as_alone(prepared):
    _, rows, tokenizer, model = prepared
    batch = PackedCollator(tokenizer.pad_token_id, row_length=256)(rows[:8])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        compared = 0
        for r in range(batch["input_ids"].shape[0]):
            positions = batch["position_ids"][r].tolist()
            starts = [i for i in range(len(positions) - 1) if positions[i] == 0 and positions[i + 1] == 1]
            for start in starts:
                n = next((j for j in range(start + 1, len(positions)) if positions[j] == 0), len(positions)) - start
                alone = model(input_ids=batch["input_ids"][r:r + 1, start:start + n]).logits[0]
                assert torch.allclose(packed[r, start:start + n], alone, atol=1e-5), (r, start)
                compared += 1
    assert compared == 8


def response_loss(model, batch) -> tuple[float, int]:
    """Summed cross-entropy over supervised tokens, and their number."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item(), int(keep.sum())


def test_packed_loss_equals_padded_loss(prepared):
    _, rows, tokenizer, model = prepared
    padded = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(rows[:16])
    packed = PackedCollator(tokenizer.pad_token_id, row_length=256)(rows[:16])
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    with torch.no_grad():
        (padded_sum, padded_n), (packed_sum, packed_n) = response_loss(model, padded), response_loss(model, packed)
    assert packed_n == padded_n > 0
    assert packed_sum / packed_n == pytest.approx(padded_sum / padded_n, rel=1e-5)


def test_packing_check_holds_for_examples_of_equal_length(prepared):
    _, rows, tokenizer, model = prepared
    same = [rows[0]] * 4  # templated data often has equal lengths: rows that fill exactly
    check_packing(model, PackedCollator(tokenizer.pad_token_id, 2 * len(rows[0]["input_ids"])), same)


def test_packing_is_refused_when_attention_crosses_examples(prepared, monkeypatch):
    import transformers.masking_utils as masking

    _, rows, tokenizer, model = prepared
    check_packing(model, PackedCollator(tokenizer.pad_token_id, 256), rows)  # honoured: passes
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)  # a plain causal mask
    with pytest.raises(StageError, match="train.packing: this model's attention crosses packed examples"):
        check_packing(model, PackedCollator(tokenizer.pad_token_id, 256), rows)


def one_sgd_step(workdir, batch_size: int, accumulation: int, packing: bool):
    """The loss logged and the LoRA weights after one optimizer step of plain SGD (an update proportional to the
    gradient, unlike Adam's first step)."""
    params = load_params()
    params.train.max_steps, params.train.logging_steps = 1, 1
    params.train.per_device_train_batch_size, params.train.gradient_accumulation_steps = batch_size, accumulation
    params.train.packing, params.train.warmup_steps, params.train.weight_decay = packing, 0, 0.0
    params.lora.lora_dropout = 0.0  # dropout would draw differently per micro-batch
    params.train.output_dir = str(workdir / f"ckpt-{batch_size}x{accumulation}-{packing}")
    trainer, _, _ = setup_trainer(params)
    trainer.args.optim, trainer.args.max_grad_norm = "sgd", 1e9
    trainer.train()
    loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    return loss, weights, trainer.state.num_input_tokens_seen


@pytest.mark.parametrize("packing", [True, False])
def test_gradient_accumulation_normalizes_by_supervised_tokens(workdir, packing):
    run_prepare(load_params())
    loss_1, weights_1, tokens_1 = one_sgd_step(workdir, 8, 1, packing)
    loss_4, weights_4, tokens_4 = one_sgd_step(workdir, 2, 4, packing)
    assert tokens_1 == tokens_4  # the same 8 examples in the step
    assert loss_4 == pytest.approx(loss_1, rel=1e-5)
    for name, weight in weights_1.items():
        assert torch.allclose(weights_4[name], weight, atol=1e-7, rtol=1e-5), name
    lora_b = [w for n, w in weights_1.items() if "lora_B" in n]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b)  # zero at init: the step moved them
