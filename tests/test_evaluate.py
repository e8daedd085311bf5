import json

import pytest
import torch
from conftest import prepared_rows, run_evaluate, run_prepare, run_train
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.config.data import PrepareParams
from finetune.config.evaluate import EvaluateParams
from finetune.config.params import load_params
from finetune.data.records import Example
from finetune.generation import generate
from finetune.tasks.causal_lm import confusion_rows, loss_and_token_metrics, score, tokenize_example


@pytest.fixture
def toy(toy_model_dir):
    return (AutoModelForCausalLM.from_pretrained(toy_model_dir).eval(),
            AutoTokenizer.from_pretrained(toy_model_dir))


def test_batched_greedy_generation_matches_one_prompt_at_a_time(toy):
    model, tokenizer = toy
    prompts = [f"### Instruction:\n{p}\n\n### Response:\n" for p in
               ["Spell out the number 7.", "Convert 3 km to meters.", "Reverse the word order: red cat dog sun",
                "Write the date 2001-02-03 in words.", "Convert 23:05 to 12-hour time."]]
    params = EvaluateParams(batch_size=5, max_new_tokens=8)
    batched = generate(model, tokenizer, prompts, params)
    single = [generate(model, tokenizer, [p], EvaluateParams(batch_size=1, max_new_tokens=8))[0]
              for p in prompts]
    assert batched == single
    assert len(set(batched)) > 1  # the toy model does say different things


def test_loss_pass_equals_token_weighted_model_loss(toy):
    model, tokenizer = toy
    rows = []
    for prompt, response in [("Spell out 5.", "five"), ("Convert 2 kg to grams.", "2000 g"), ("Hi", "a b c d")]:
        record, _ = tokenize_example(Example(prompt, response, "x"), tokenizer,
                                             PrepareParams())
        rows.append(record)
    out = loss_and_token_metrics(model, rows, tokenizer.pad_token_id, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            n = sum(label != -100 for label in r["labels"][1:])
            total += model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss * n
            count += n
    assert out["eval_loss"] == pytest.approx(float(total / count), rel=1e-5)
    assert out["perplexity"] == pytest.approx(float(torch.exp(total / count)), rel=1e-5)
    assert 0 <= out["token_accuracy"] <= 1


def test_run_scores_base_and_finetuned_and_writes_every_prediction(workdir):
    params = load_params()
    run_prepare(params)
    run_train(params)
    for which in ("base", "finetuned"):
        metrics, records = run_evaluate(params, which)
        test_rows = prepared_rows(workdir / "data/prepared", "test")
        assert metrics["examples"] == len(records) == len(test_rows)
        assert [r["reference"] for r in records] == [r["response"] for r in test_rows]
        assert {"exact_match", "bleu", "sentence_bleu", "rouge1", "rouge2", "rougeL", "eval_loss", "perplexity",
                "token_accuracy", "token_f1", "distinct_1", "distinct_2", "repetition_rate"} <= set(metrics)
        json.dumps(metrics)  # plain JSON types only


def test_label_metrics_appear_for_label_data():
    out = score(["yes", "no", "maybe so", "yes"], ["yes", "no", "yes", "no"], EvaluateParams())
    assert out["label_accuracy"] == 0.5 and out["label_unparseable"] == 1
    assert "label_f1" not in score(["a"], ["b"], EvaluateParams())


def test_confusion_rows_pair_each_reference_label_with_the_parsed_prediction():
    rows = confusion_rows(["Yes.", "no", "maybe so", "yes"], ["yes", "No", "yes", "no"], EvaluateParams())
    assert rows == [{"actual": "yes", "predicted": "yes"}, {"actual": "no", "predicted": "no"},
                    {"actual": "yes", "predicted": "<unparseable>"}, {"actual": "no", "predicted": "yes"}]
    free_text = ["April 5, 2023", "twelve", "3 km", "five past two"]
    assert confusion_rows(free_text, free_text, EvaluateParams()) == []  # no labels: no matrix
    assert confusion_rows(["a", "b"], ["a", "b"], EvaluateParams(labels="off")) == []


def test_generation_halves_the_batch_on_out_of_memory_and_keeps_outputs(toy, monkeypatch, capsys):
    model, tokenizer = toy
    prompts = [f"### Instruction:\nSpell out the number {n}.\n\n### Response:\n"
               for n in (3, 41, 592, 7000, 12, 8, 66, 105)]
    expected = generate(model, tokenizer, prompts, EvaluateParams(batch_size=8, max_new_tokens=6))
    real_generate, sizes = model.generate, []

    def limited(**kwargs):  # a device that holds at most 2 prompts at once
        sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", limited)
    assert generate(model, tokenizer, prompts, EvaluateParams(batch_size=8, max_new_tokens=6)) == expected
    assert sizes == [8, 4, 2, 2, 2, 2]  # 8 and 4 fail and are retried; the rest runs at 2
    assert "out of memory at a batch of 8: continuing at 4" in capsys.readouterr().err
