import json

import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq

from stages.common import IGNORE_INDEX, StageError, read_jsonl
from stages.params import DataParams, PrepareParams, load_params
from stages.prepare import Example, load_examples, run, split_examples, tokenize_example


@pytest.fixture
def tokenizer(toy_model_dir):
    return AutoTokenizer.from_pretrained(toy_model_dir)


def test_prompt_tokens_are_masked_and_response_ends_with_eos(tokenizer):
    prepare = PrepareParams()
    record, status = tokenize_example(Example("Spell out the number 12.", "twelve", "x:1"), tokenizer, prepare)
    prompt_ids = tokenizer(prepare.template.format(prompt="Spell out the number 12."))["input_ids"]
    n = len(prompt_ids)
    assert status == "ok"
    assert record["input_ids"][:n] == prompt_ids
    assert record["labels"][:n] == [IGNORE_INDEX] * n
    assert record["labels"][n:] == record["input_ids"][n:]  # every response token is supervised
    assert record["labels"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(record["input_ids"][n:-1]) == "twelve"


def test_truncation_keeps_a_supervised_token_and_overlong_prompts_are_dropped(tokenizer):
    example = Example("Reverse the word order: red blue green cat dog", "dog cat green blue red", "x:1")
    prompt_len = len(tokenizer(PrepareParams().template.format(prompt=example.prompt))["input_ids"])
    record, status = tokenize_example(example, tokenizer, PrepareParams(max_length=prompt_len + 1))
    assert status == "truncated" and len(record["input_ids"]) == prompt_len + 1
    assert sum(label != IGNORE_INDEX for label in record["labels"]) == 1
    assert tokenize_example(example, tokenizer, PrepareParams(max_length=prompt_len)) == \
        (None, "dropped_prompt_too_long")
    assert tokenize_example(example, tokenizer, PrepareParams(max_length=prompt_len + 1, overlong="drop")) == \
        (None, "dropped_overlong")


def test_padding_is_ignored_by_the_loss(tokenizer, toy_model_dir):
    """A padded batch gives each example the same loss as alone: padding gets label -100 and no attention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    short, _ = tokenize_example(Example("Spell out the number 5.", "five", "a"), tokenizer, PrepareParams())
    long, _ = tokenize_example(Example("Convert 14:30 to 12-hour time.", "2:30 PM", "b"), tokenizer, PrepareParams())
    rows = [{k: r[k] for k in ("input_ids", "labels")} for r in (short, long)]
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(rows)
    pad = batch["input_ids"].shape[1] - len(short["input_ids"])
    assert pad > 0 and (batch["labels"][0, -pad:] == IGNORE_INDEX).all()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = model(input_ids=torch.tensor([short["input_ids"]]), labels=torch.tensor([short["labels"]])).loss
    padded = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_split_is_seeded_disjoint_and_sized():
    items = list(range(1000))
    a = split_examples(items, 0.05, 0.1, seed=3)
    assert a == split_examples(items, 0.05, 0.1, seed=3)
    assert a != split_examples(items, 0.05, 0.1, seed=4)
    assert [len(a[s]) for s in ("train", "validation", "test")] == [850, 50, 100]
    assert sorted(a["train"] + a["validation"] + a["test"]) == items


def test_instruction_input_output_fields_are_recognized(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    path.write_text(json.dumps({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}) + "\n"
                    + json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}) + "\n")
    examples = load_examples(DataParams(), path)
    assert [(e.prompt, e.response) for e in examples] == [("Add the numbers.\n\n2 and 3", "5"), ("Say hi.", "hi")]
    assert examples[1].source == f"{path}:2"


def test_csv_and_configured_field_names(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nWhat is two?,2\nWhat is three?,3\n")
    examples = load_examples(DataParams(prompt_field="question", response_field="answer"), path)
    assert [(e.prompt, e.response, e.source) for e in examples] == [
        ("What is two?", "2", f"{path}:2"), ("What is three?", "3", f"{path}:3")]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n', ":2: invalid JSON"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": ""}\n', ":2: field 'response' is empty"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": 3, "response": "b"}\n', ":2: field 'prompt' is not a string"),
    ('{"question": "a", "answer": "b"}\n', "cannot tell prompt from response"),
    ("", "no examples (empty file)"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n', ":2: invalid UTF-8"),
])
def test_bad_data_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(StageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_examples(DataParams(), path)


def test_run_writes_splits_and_stats(workdir):
    stats = run(load_params())
    splits = {name: read_jsonl(workdir / f"data/prepared/{name}.jsonl") for name in ("train", "validation", "test")}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [90, 12, 18]
    assert stats["train_examples"] == 90 and stats["test_examples"] == 18
    assert stats["truncated"] == stats["dropped_overlong"] == 0
    assert stats["tokens_p50"] <= stats["tokens_p90"] <= stats["tokens_max"] <= 96
    for row in splits["train"]:
        assert any(label != IGNORE_INDEX for label in row["labels"])
    sources = [{r["source"] for r in rows} for rows in splits.values()]
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])


def test_json_array_and_parquet_load_through_datasets(tmp_path):
    import pandas as pd

    records = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    pd.DataFrame(records).to_parquet(tmp_path / "a.parquet")
    for name in ("a.json", "a.parquet"):
        examples = load_examples(DataParams(), tmp_path / name)
        assert [(e.prompt, e.response) for e in examples] == [("p1", "r1"), ("p2", "r2")]
        assert examples[1].source == f"{tmp_path / name}:record 2"


def test_unsupported_file_type_is_named(tmp_path):
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(StageError, match="unsupported file type '.xlsx'"):
        load_examples(DataParams(), tmp_path / "data.xlsx")
