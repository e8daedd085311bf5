import json
import re

import pytest
import torch
from conftest import ROOT, prepared_rows, run_prepare
from transformers import AutoTokenizer, DataCollatorForSeq2Seq

from finetune.batching import IGNORE_INDEX
from finetune.config.data import DataParams, PrepareParams
from finetune.config.evaluate import EvaluateParams
from finetune.config.params import load_params
from finetune.data.records import BadRecords, Example, load_examples
from finetune.data.splits import split_examples, split_labels
from finetune.errors import StageError
from finetune.tasks.causal_lm import tokenize_example


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
        (None, "prompt_too_long")
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


def test_the_bundled_data_is_free_text_so_its_split_is_the_plain_one():
    """data.stratify: auto stratifies label answers only, so the committed pipeline's split is the seeded shuffle."""
    examples = load_examples(DataParams(), ROOT / DataParams().path)
    assert split_labels([e.response for e in examples], DataParams(), EvaluateParams()) is None


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


GOOD = '{"prompt": "Spell out the number 4.", "response": "four"}\n'
BAD_LINES = {  # kind -> a line that has exactly that problem
    "invalid_json": b'{"prompt": "a", \n',
    "invalid_utf8": b'{"prompt": "\xff", "response": "b"}\n',
    "not_an_object": b'["prompt", "response"]\n',
    "duplicate_key": b'{"prompt": "a", "response": "b", "prompt": "c"}\n',
    "missing_field": b'{"prompt": "a"}\n',
    "empty_field": b'{"prompt": "a", "response": "  "}\n',
    "wrong_type": b'{"prompt": 3, "response": "b"}\n',
}


@pytest.mark.parametrize("kind, message", [
    ("invalid_json", ":2: invalid JSON"),
    ("invalid_utf8", ":2: invalid UTF-8"),
    ("not_an_object", ":2: expected a JSON object, got list"),
    ("duplicate_key", ":2: the key 'prompt' appears twice in one object"),
    ("missing_field", ":2: field 'response' is missing"),
    ("empty_field", ":2: field 'response' is empty"),
    ("wrong_type", ":2: field 'prompt' is int, expected a string"),
])
def test_bad_record_fails_with_file_and_line(tmp_path, kind, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD.encode() + BAD_LINES[kind] + GOOD.encode())
    with pytest.raises(StageError, match=re.escape(f"{path}{message}")):
        load_examples(DataParams(), path)


def test_skip_policy_counts_every_injected_bad_record(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [GOOD.encode()] * 10
    for i, line in enumerate(BAD_LINES.values()):  # each kind twice, spread through the file
        lines.insert(1 + 2 * i, line)
        lines.append(line)
    path.write_bytes(b"".join(lines))
    bad = BadRecords("skip")
    examples = load_examples(DataParams(on_bad_record="skip"), path, bad)
    assert len(examples) == 10
    assert bad.counts == {**{kind: 2 for kind in BAD_LINES}, "field_count": 0, "invalid_conversation": 0,
                          "prompt_too_long": 0}


@pytest.mark.parametrize("content", [b"", b"\n\n"])
def test_empty_dataset_is_always_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(StageError, match="no (usable )?examples"):
        load_examples(DataParams(on_bad_record="skip"), path, BadRecords("skip"))


def test_cannot_tell_prompt_from_response(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(StageError, match="cannot tell prompt from response"):
        load_examples(DataParams(), path)


def test_prompt_longer_than_max_length_is_a_bad_record(workdir):
    data = workdir / "data/raw/toy.jsonl"
    lines = data.read_text().splitlines()
    lines[4] = json.dumps({"prompt": "Spell out the number 5. " * 30, "response": "five"})
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(StageError, match=re.escape("data/raw/toy.jsonl:5: the prompt alone is")):
        run_prepare(load_params())
    params = load_params()
    params.data.on_bad_record = "skip"
    stats = run_prepare(params)
    assert stats["bad_prompt_too_long"] == 1 and stats["bad_records"] == 1
    assert stats["train_examples"] + stats["validation_examples"] + stats["test_examples"] == 119


def test_skip_policy_never_leaves_an_empty_dataset(workdir):
    (workdir / "data/raw/toy.jsonl").write_bytes(BAD_LINES["invalid_json"] * 3)
    params = load_params()
    params.data.on_bad_record = "skip"
    with pytest.raises(StageError, match="no usable examples"):
        run_prepare(params)


def test_run_writes_splits_and_stats(workdir):
    stats = run_prepare(load_params())
    splits = {name: prepared_rows(workdir / "data/prepared", name) for name in ("train", "validation", "test")}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [90, 12, 18]
    assert stats["train_examples"] == 90 and stats["test_examples"] == 18
    assert stats["truncated"] == stats["dropped_overlong"] == 0
    assert stats["tokens_p50"] <= stats["tokens_p90"] <= stats["tokens_max"] <= 96
    for row in splits["train"]:
        assert any(label != IGNORE_INDEX for label in row["labels"])
    sources = [{r["source"] for r in rows} for rows in splits.values()]
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])


def test_json_array_and_parquet_keep_each_records_place(tmp_path):
    import pandas as pd

    records = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=1))
    pd.DataFrame(records).to_parquet(tmp_path / "a.parquet")
    for name, second in (("a.json", ":6 (record 2)"), ("a.parquet", ":record 2")):
        examples = load_examples(DataParams(), tmp_path / name)
        assert [(e.prompt, e.response) for e in examples] == [("p1", "r1"), ("p2", "r2")]
        assert examples[1].source == f"{tmp_path / name}{second}"


def test_unsupported_file_type_is_named(tmp_path):
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(StageError, match="unsupported file type '.xlsx'"):
        load_examples(DataParams(), tmp_path / "data.xlsx")


def test_long_csv_fields_and_multiline_records_keep_their_lines(tmp_path):
    """A 200 KB field (over the csv module's 128 KB default) is data, not an error; a record spanning lines is
    named by the line it starts on."""
    path = tmp_path / "long.csv"
    path.write_text('prompt,response\n"two\nlines",a\n' + "b," + "x" * 200_000 + "\n" + "c,\n")
    bad = BadRecords("skip")
    examples = load_examples(DataParams(), path, bad)
    assert [(e.source, len(e.response)) for e in examples] == [(f"{path}:2", 1), (f"{path}:4", 200_000)]
    assert bad.counts["empty_field"] == 1


def test_csv_lines_count_blank_lines_and_the_header_is_checked(tmp_path):
    path = tmp_path / "gaps.csv"
    path.write_text("\nprompt,response\na,b\n\nc,d\n")
    assert [e.source for e in load_examples(DataParams(), path)] == [f"{path}:3", f"{path}:5"]
    path.write_text("prompt,response,prompt\na,b,c\n")
    with pytest.raises(StageError, match=re.escape(f"{path}:1: the header names 'prompt' more than once")):
        load_examples(DataParams(), path)


def test_json_that_python_cannot_read_is_a_bad_record_counted_once(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text("[" * 100_000 + "\n"  # nested too deeply
                    + '{"prompt": "a", "response": "b", "n": ' + "1" * 5000 + "}\n"  # too many digits
                    + '{"prompt": "a", "prompt": "b", "response": \n'  # a duplicate key, then broken JSON
                    + GOOD)
    bad = BadRecords("skip")
    assert len(load_examples(DataParams(on_bad_record="skip"), path, bad)) == 1
    assert bad.counts["invalid_json"] == 3 and bad.counts["duplicate_key"] == 0
