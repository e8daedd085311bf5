"""QLoRA, full fine-tuning and merging, run for real at toy scale (bitsandbytes 4-bit layers run on CPU)."""

from __future__ import annotations

import json

import pytest
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import evaluate, merge, prepare, train
from stages.common import read_jsonl
from stages.params import EvaluateParams, load_params


def use(workdir, **sections) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def lora_run(workdir):
    params = load_params()
    prepare.run(params)
    return train.run(params)


def test_merged_model_loads_without_peft_and_matches_the_adapter(workdir, lora_run, toy_model_dir):
    params = load_params()
    checked = merge.run(params)
    assert checked["greedy_agreement"] == 1.0 and checked["max_abs_logit_diff"] < 1e-4

    merged = AutoModelForCausalLM.from_pretrained(workdir / "models/merged").eval()  # plain transformers
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_model_dir),
                                        workdir / "models/finetuned").eval()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "models/merged")
    prompts = [r["prompt"] for r in read_jsonl(workdir / "data/prepared/test.jsonl")]
    settings = EvaluateParams(batch_size=8, max_new_tokens=8)
    assert evaluate.generate(merged, tokenizer, prompts, settings) == \
        evaluate.generate(adapter, tokenizer, prompts, settings)


def test_qlora_trains_adapters_on_a_4bit_base(workdir, lora_run):
    use(workdir, train={"method": "qlora"}, quantization={"bnb_4bit_compute_dtype": "float32"})
    params = load_params()
    trainer, _, _ = train.setup(params)
    assert type(trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    metrics = train.run(params)
    assert metrics["method"] == "qlora" and metrics["quantization"] == "4-bit nf4 double-quant, float32 compute"
    assert metrics["base_weight_memory_mb"] < lora_run["base_weight_memory_mb"]
    assert metrics["trainable_params"] == lora_run["trainable_params"]
    config = json.loads((workdir / "models/finetuned/train_config.json").read_text())
    assert config["train"]["method"] == "qlora"

    scored, records = evaluate.run(params, "finetuned")  # loads the 4-bit base again, adapter on top
    assert scored["examples"] == len(records) > 0
    checked = merge.run(params)
    assert checked["method"] == "qlora"
    assert checked["greedy_agreement"] == 1.0  # merged vs adapter on the same unquantized base
    assert 0 <= checked["greedy_agreement_vs_4bit"] <= 1 and checked["max_abs_logit_diff_vs_4bit"] > 0


def test_full_fine_tuning_trains_every_weight(workdir, lora_run):
    use(workdir, train={"method": "full", "learning_rate": 1e-3})
    params = load_params()
    trainer, _, _ = train.setup(params)
    assert all(p.requires_grad for p in trainer.model.parameters())
    metrics = train.run(params)
    assert metrics["method"] == "full" and metrics["trainable_params"] == metrics["total_params"]
    assert (workdir / "models/finetuned/model.safetensors").exists()
    assert not (workdir / "models/finetuned/adapter_config.json").exists()
    scored, _ = evaluate.run(params, "finetuned")
    assert scored["eval_loss"] > 0
    assert merge.run(params)["greedy_agreement"] == 1.0
