"""The prepare stage on `datasets`: conversation formats and files, the Arrow splits it writes, and bad records
still reported by file and line whichever reader (Arrow's, or line by line) read them."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from conftest import prepared_rows, run_prepare
from test_prepare import BAD_LINES, GOOD

from finetune.batching import IGNORE_INDEX
from finetune.config.params import load_params
from finetune.data.prepared import read_meta
from finetune.errors import StageError

SYSTEM = "You convert things."


def conversation(n: int, sharegpt: bool = False) -> dict:
    turns = [("system", SYSTEM), ("user", f"Write {n} in digits."), ("assistant", str(n)),
             ("tool", f"checked {n}"), ("user", "Now add one."), ("assistant", str(n + 1))]
    if sharegpt:
        names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
        return {"conversations": [{"from": names[r], "value": c} for r, c in turns]}
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def set_params(workdir, **changes):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        params[section][name] = value
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("form", ["messages", "sharegpt", "json", "parquet", "folder", "saved"])
def test_conversations_from_every_format_train_only_the_assistant(workdir, form):
    records = [conversation(n, sharegpt=form == "sharegpt") for n in range(60)]
    raw = workdir / "data/raw"
    if form in ("messages", "sharegpt"):
        path = raw / "chat.jsonl"
        write_lines(path, records)
    elif form == "json":
        path = raw / "chat.json"
        path.write_text(json.dumps(records, indent=1))
    else:
        import datasets

        dataset = datasets.Dataset.from_list(records)
        path = raw / {"parquet": "chat.parquet", "folder": "hub", "saved": "saved"}[form]
        if form == "parquet":
            dataset.to_parquet(str(path))
        elif form == "folder":  # a hub-style dataset folder: data files that `datasets` finds by their names
            (path / "data").mkdir(parents=True)
            dataset.to_parquet(str(path / "data/train-00000-of-00001.parquet"))
        else:
            dataset.save_to_disk(str(path))
    set_params(workdir, data__path=str(path.relative_to(workdir)), prepare__chat_template="chatml",
               prepare__max_length=128)
    stats = run_prepare(load_params())
    assert stats["train_examples"] + stats["validation_examples"] + stats["test_examples"] == 60
    meta = read_meta(workdir / "data/prepared")
    assert meta["format"] == "conversations" and set(meta["chat"]["added_tokens"]) == {"<|im_start|>", "<|im_end|>"}
    test = prepared_rows(workdir / "data/prepared", "test")
    record = test[0]
    messages = json.loads(record["messages"])
    assert messages[-1]["role"] == "assistant" and record["response"] == messages[-1]["content"]
    assert record["prompt"].endswith("<|im_start|>assistant\n") and "Now add one." in record["prompt"]
    assert re.fullmatch(rf"{re.escape(str(raw.relative_to(workdir)))}/\S+:(record )?\d+", record["source"]) or \
        record["source"].startswith(str(path.relative_to(workdir)))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(load_params().model.model_name)
    tokenizer.add_special_tokens({"additional_special_tokens": list(meta["chat"]["added_tokens"])})
    trained = tokenizer.decode([t for t in record["labels"] if t != IGNORE_INDEX])
    n = int(messages[2]["content"])
    assert trained == f"{n}<|im_end|>{n + 1}<|im_end|>"  # both answers and their end tokens, nothing else


def test_train_turns_last_and_the_template_saved_for_train(workdir):
    write_lines(workdir / "data/raw/chat.jsonl", [conversation(n) for n in range(40)])
    set_params(workdir, data__path="data/raw/chat.jsonl", prepare__chat_template="zephyr", prepare__train_turns="last",
               prepare__max_length=128)
    run_prepare(load_params())
    rows = prepared_rows(workdir / "data/prepared", "train")
    meta = read_meta(workdir / "data/prepared")
    assert "<|{{ message['role'] }}" not in meta["chat"]["chat_template"] and meta["chat"]["added_tokens"] == {}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(load_params().model.model_name)
    for row in rows[:5]:
        trained = tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])
        assert re.fullmatch(r"\d+</s>", trained), trained  # the last answer and EOS only


@pytest.mark.parametrize("problem, line", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "the last turn of 'messages' is a user turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "turn 1 of 'messages' has role 'robot'; expected one of "),
    ({"messages": "hello"}, "field 'messages' is a string, expected a list of turns"),
    ({"prompt": "x"}, "field 'messages' is missing"),
])
def test_a_bad_conversation_is_reported_by_file_and_line(workdir, problem, line):
    records = [conversation(n) for n in range(30)]
    records.insert(3, problem)
    write_lines(workdir / "data/raw/chat.jsonl", records)
    set_params(workdir, data__path="data/raw/chat.jsonl", prepare__chat_template="chatml", prepare__max_length=128)
    with pytest.raises(StageError, match=re.escape(f"data/raw/chat.jsonl:4: {line}")):
        run_prepare(load_params())
    set_params(workdir, data__on_bad_record="skip")
    stats = run_prepare(load_params())
    assert stats["bad_records"] == 1 and stats["train_examples"] + stats["validation_examples"] + \
        stats["test_examples"] == 30


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
@pytest.mark.parametrize("blank_line", [False, True], ids=["arrow-reader", "line-reader"])
def test_prepare_reports_each_bad_record_on_its_line(workdir, kind, blank_line):
    """The same file:line whether Arrow's reader read the file (clean JSON) or the line reader did (after Arrow's
    stopped, or when a blank line would shift Arrow's row numbers)."""
    data = workdir / "data/raw/toy.jsonl"
    lines = data.read_bytes().splitlines(keepends=True)
    lines.insert(5, BAD_LINES[kind])
    if blank_line:
        lines.insert(2, b"\n")
    data.write_bytes(b"".join(lines))
    where = 7 if blank_line else 6
    with pytest.raises(StageError, match=rf"data/raw/toy\.jsonl:{where}: "):
        run_prepare(load_params())
    set_params(workdir, data__on_bad_record="skip")
    stats = run_prepare(load_params())
    assert stats[f"bad_{kind}"] == 1 and stats["bad_records"] == 1


def test_every_kind_skipped_and_counted_in_one_file(workdir):
    data = workdir / "data/raw/toy.jsonl"
    data.write_bytes(GOOD.encode() * 40 + b"".join(BAD_LINES.values()) + GOOD.encode() * 40)
    set_params(workdir, data__on_bad_record="skip")
    stats = run_prepare(load_params())
    assert all(stats[f"bad_{kind}"] == 1 for kind in BAD_LINES) and stats["bad_records"] == len(BAD_LINES)


def test_the_splits_are_memory_mapped_arrow_and_train_reads_them_so(workdir):
    from finetune.data.prepared import training_split

    run_prepare(load_params())
    files = sorted(p.name for p in (workdir / "data/prepared").iterdir())
    assert files == ["prepared.json", "test.arrow", "train.arrow", "validation.arrow"]
    train = training_split(workdir / "data/prepared", "train")
    assert train.cache_files and train.cache_files[0]["filename"].endswith("train.arrow")
    assert type(train.data).__name__ == "MemoryMappedTable"
    assert train.features["input_ids"].feature.dtype == "int32"


@pytest.mark.parametrize("num_proc", [1, 2])
def test_the_splits_do_not_depend_on_the_number_of_processes(workdir, num_proc):
    """Tokenizing in two processes gives the same files, byte for byte, as in one."""
    run_prepare(load_params())
    one = {p.name: p.read_bytes() for p in (workdir / "data/prepared").iterdir()}
    set_params(workdir, prepare__num_proc=num_proc)
    run_prepare(load_params())
    assert {p.name: p.read_bytes() for p in (workdir / "data/prepared").iterdir()} == one


def test_two_records_on_one_line_are_reported_on_that_line(workdir):
    """Arrow's reader takes two objects on one line as two rows; the line reader reports the line, as before."""
    data = workdir / "data/raw/toy.jsonl"
    lines = data.read_text().splitlines(keepends=True)
    lines[3] = lines[3].rstrip("\n") + " " + lines[4]
    data.write_text("".join(lines))
    with pytest.raises(StageError, match=r"data/raw/toy\.jsonl:4: invalid JSON \(extra data at column"):
        run_prepare(load_params())


def test_pairs_trained_as_conversations_when_the_test_file_holds_conversations(workdir):
    """Pair data with a conversation test file: the pairs become one-turn conversations in the same template."""
    write_lines(workdir / "data/raw/chat_test.jsonl", [conversation(n) for n in range(20)])
    set_params(workdir, data__test_path="data/raw/chat_test.jsonl", prepare__max_length=128)
    with pytest.raises(StageError, match="has no chat template"):
        run_prepare(load_params())
    set_params(workdir, prepare__chat_template="chatml")
    stats = run_prepare(load_params())
    assert stats["test_examples"] == 20 and stats["train_examples"] > 0
    train = prepared_rows(workdir / "data/prepared", "train")
    meta = read_meta(workdir / "data/prepared")
    im_end = meta["chat"]["added_tokens"]["<|im_end|>"]
    assert meta["format"] == "conversations"
    assert all([t for t in r["labels"] if t != IGNORE_INDEX][-1] == im_end for r in train[:10])
