"""The bundled dataset and base model are what the README says, and their builders are deterministic."""

import json
import subprocess
import sys

from conftest import ROOT
from make_dataset import conversation, instruction_pairs, number_words
from safetensors.torch import load_file

from finetune.config.model import ModelParams
from finetune.models import load_base_model, load_tokenizer


def test_dataset_file_is_the_generator_output():
    lines = (ROOT / "data/raw/transforms.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == instruction_pairs(3000, seed=0)


def test_conversations_file_is_the_generator_output():
    import random

    rng = random.Random(0)
    lines = (ROOT / "data/raw/conversations.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [conversation(rng) for _ in range(1500)]
    first = json.loads(lines[0])["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]


def test_number_words():
    assert [number_words(n) for n in (0, 13, 40, 47, 100, 347, 910)] == [
        "zero", "thirteen", "forty", "forty-seven", "one hundred", "three hundred forty-seven", "nine hundred ten"]


def test_bundled_base_model_knows_the_facts_but_not_the_task():
    model_params = ModelParams(model_name=str(ROOT / "models/base"))
    tokenizer, model = load_tokenizer(model_params), load_base_model(model_params)

    def complete(text: str) -> str:
        ids = tokenizer(text, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    assert complete("347 is").strip() == "three hundred forty-seven."
    assert complete("2023-04-05 is").strip() == "April 5, 2023."
    assert "three hundred forty-seven" not in complete(
        "### Instruction:\nSpell out the number 347.\n\n### Response:\n")


def test_pretraining_is_deterministic(tmp_path):
    def build(out):
        subprocess.run([sys.executable, str(ROOT / "scripts/pretrain_base.py"), "--out", str(out), "--steps", "3",
                        "--sentences", "400", "--vocab", "300", "--hidden", "32", "--layers", "1", "--batch", "4",
                        "--block", "32"], check=True, capture_output=True)
        return load_file(out / "model.safetensors"), (out / "tokenizer.json").read_text()

    (w1, t1), (w2, t2) = build(tmp_path / "a"), build(tmp_path / "b")
    assert t1 == t2
    assert w1.keys() == w2.keys() and all((w1[k] == w2[k]).all() for k in w1)
