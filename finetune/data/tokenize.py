"""Raw records -> training records, a batch at a time inside `Dataset.map` (so in as many processes as
prepare.num_proc gives): prompt/response pairs in prepare.template, or conversations in the chat template.

Every input row gives one output row, with a status: ok, truncated, dropped_overlong, or the kind of bad record it
is (with the problem in words). The caller reports the bad ones in file order and keeps the rest, so a bad record
is reported by file and line whichever process met it.
"""

from __future__ import annotations

import json
import sys

from finetune.batching import IGNORE_INDEX
from finetune.config.data import DataParams, PrepareParams
from finetune.config.task import TaskParams
from finetune.data.chat import render, tokenize_conversations, turns
from finetune.data.records import field_names, pair_of
from finetune.data.sources import RawData
from finetune.errors import StageError
from finetune.io import progress
from finetune.tasks import classification
from finetune.tasks.causal_lm import tokenize_pairs

KEPT = ("ok", "truncated")
LOG_PART = 20_000  # in a log, rows per progress line at least (up to ten lines)
COLUMNS = {"input_ids": "int32", "labels": "int32", "status": "string", "problem": "string", "source": "string",
           "prompt": "string", "response": "string", "messages": "string"}


def features():
    from datasets import Features, List, Value

    return Features({name: List(Value(kind)) if name in ("input_ids", "labels") else Value(kind)
                     for name, kind in COLUMNS.items()})


def data_format(raw: RawData, data: DataParams, task: TaskParams | None = None) -> tuple[str | None, tuple | None]:
    """(the conversation field, None) or (None, the prompt/input/response fields), from params or the fields; for
    classification (None, the text and label fields)."""
    fields = raw.fields()
    if task is not None and task.type == "classification":
        return None, classification.fields(task, fields, raw.path)
    if data.messages_field:
        return data.messages_field, None
    if not data.prompt_field:
        for name in ("messages", "conversations"):
            if name in fields:
                return name, None
    return None, field_names(data, fields, raw.path)


class Tokenize:
    """The batch function `Dataset.map` runs (picklable, for its worker processes)."""

    offset = 0  # of the rows mapped within the file, when they are mapped a part at a time

    def __init__(self, raw: RawData, data: DataParams, prepare: PrepareParams, tokenizer, chat: bool,
                 task: TaskParams | None = None):
        self.raw, self.prepare, self.tokenizer, self.chat = raw, prepare, tokenizer, chat
        self.classify = task is not None and task.type == "classification"
        self.conversation_field, self.pair_fields = data_format(raw, data, task)

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        indices = [i + self.offset for i in indices]
        size = len(indices)
        out: dict[str, list] = {name: [[]] * size if name in ("input_ids", "labels") else [""] * size
                                for name in COLUMNS}
        good: list[tuple[int, list[dict] | tuple[str, str]]] = []  # (output row, conversation or pair)
        for n, (source, record) in enumerate(self.raw.rows(batch, indices)):
            out["source"][n] = source
            item, problem = self.parse(record)
            if problem:
                out["status"][n], out["problem"][n] = problem
            else:
                good.append((n, item))
        if self.chat:
            self.conversations(out, good)
        else:
            encode = classification.tokenize_texts if self.classify else tokenize_pairs
            for (n, _), (record, status) in zip(good, encode([p for _, p in good], self.tokenizer, self.prepare),
                                                strict=True):
                self.result(out, n, record, status)
        return out

    def parse(self, record: dict):
        if self.classify:
            return classification.example_of(record, *self.pair_fields)
        field = self.conversation_field
        if field is None:
            pair, problem = pair_of(record, self.pair_fields)
            if problem or not self.chat:
                return pair, problem
            return [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}], None
        if record.get(field) is None:
            return None, ("missing_field", f"field {field!r} is missing")
        return turns(record[field], field)

    def conversations(self, out: dict, good: list) -> None:
        prepare, limit = self.prepare, self.prepare.max_length
        tokenized = tokenize_conversations([m for _, m in good], self.tokenizer, prepare.train_roles,
                                           prepare.train_turns)
        for (n, messages), result in zip(good, tokenized, strict=True):
            if isinstance(result, str):
                self.result(out, n, None, "invalid_conversation", result)
                continue
            ids, labels = result
            status = "ok"
            if len(ids) > limit:
                if prepare.overlong == "drop":
                    self.result(out, n, None, "dropped_overlong")
                    continue
                ids, labels, status = ids[:limit], labels[:limit], "truncated"
            if all(t == IGNORE_INDEX for t in labels):
                trained = " and ".join(prepare.train_roles)
                self.result(out, n, None, "prompt_too_long" if status == "truncated" else "invalid_conversation",
                            f"no {trained} token is left within prepare.max_length={limit}" if status == "truncated"
                            else f"the conversation has no {trained} turn to train on (prepare.train_roles)")
                continue
            prompt = render(self.tokenizer, messages[:-1], add_generation_prompt=True)
            self.result(out, n, {"input_ids": ids, "labels": labels, "prompt": prompt,
                                 "response": messages[-1]["content"],
                                 "messages": json.dumps(messages, ensure_ascii=False)}, status)

    def result(self, out: dict, n: int, record: dict | None, status: str, problem: str = "") -> None:
        out["status"][n] = status
        if status == "prompt_too_long" and not problem:
            problem = (f"the prompt alone is {self.prepare.max_length}+ tokens (prepare.max_length="
                       f"{self.prepare.max_length}), so no response token would be trained on")
        out["problem"][n] = problem
        if record is not None:
            for key in ("input_ids", "labels", "prompt", "response"):
                out[key][n] = record[key]
            out["messages"][n] = record.get("messages", "")


def tokenized(raw: RawData, data: DataParams, prepare: PrepareParams, tokenizer, chat: bool, num_proc: int,
              cache_file: str, name: str, task: TaskParams | None = None):
    """`raw` tokenized, one output row per record (see the module's docstring), memory-mapped from `cache_file`.
    On a terminal `datasets` draws its bar; in a log the rows go in up to ten parts, a plain line after each."""
    import datasets
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    rows = raw.dataset
    if len(rows) == 0:
        raise StageError(f"{raw.path}: no usable examples")
    function = Tokenize(raw, data, prepare, tokenizer, chat, task)
    options = dict(function=function, batched=True, batch_size=1000, with_indices=True,
                   remove_columns=rows.column_names, features=features(), load_from_cache_file=False,
                   num_proc=num_proc if num_proc > 1 else None)
    if sys.stderr.isatty():
        return rows.map(**options, cache_file_name=cache_file, desc=f"tokenize {name}")
    parts = min(10, -(-len(rows) // LOG_PART))  # each part a map call: not more of them than the data is worth
    was_enabled = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        shards = []
        for k in progress(range(parts), total=parts, desc=f"tokenize {name}"):
            shard = rows.shard(parts, k, contiguous=True)
            offset = sum(len(s) for s in shards)  # with_indices counts within the shard: sources need the file's
            function.offset = offset
            shards.append(shard.map(**options, cache_file_name=cache_file.replace(".arrow", f"-{k}.arrow")))
        return datasets.concatenate_datasets(shards)
    finally:
        if was_enabled:
            enable_progress_bar()
