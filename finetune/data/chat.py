"""Conversations: their two formats, the chat template they are rendered with, and which tokens are trained.

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}   OpenAI style
    {"conversations": [{"from": "system"|"human"|"gpt"|"tool", "value": "..."}, ...]}     ShareGPT style

A conversation is rendered whole by the chat template (the tokenizer's own, or prepare.chat_template) and
tokenized once. The trained tokens are found in the rendered text, not in any template's markup: each message's
content is located in order, and a turn of a trained role (prepare.train_roles, all of them or the last:
prepare.train_turns) is trained from its content's first token through the first special token after it that
comes before the next message (the end-of-turn token: <|im_end|>, <|eot_id|>, EOS...). The role headers, the
system prompt, tool results and what separates turns are never trained. So any template that renders each message's
content verbatim (or trimmed) works, with or without `{% generation %}` markers.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from finetune.batching import IGNORE_INDEX
from finetune.config.data import ROLES
from finetune.data.chat_templates import TEMPLATE_TOKENS, TEMPLATES
from finetune.data.text import SURROGATE, Problem, encode_with_offsets
from finetune.errors import StageError

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "observation": "tool", "function_response": "tool"}
FORMATS = {"messages": ("role", "content"), "conversations": ("from", "value")}


def turns(value, field: str, answered: bool = True) -> tuple[list[dict] | None, Problem | None]:
    """A conversation field as [{"role", "content"}] in ROLES, or (None, (kind, problem)) for a bad record.
    `answered`: it must end with the assistant's answer (training data), else it must not (a conversation to
    answer)."""
    if isinstance(value, str):  # a JSON-encoded list, as CSV cells and some exports hold it
        try:
            value = json.loads(value)
        except ValueError:
            return None, ("invalid_conversation", f"field {field!r} is a string, expected a list of turns")
    if not isinstance(value, list):
        return None, ("invalid_conversation", f"field {field!r} is {type(value).__name__}, expected a list of turns")
    if not value:
        return None, ("invalid_conversation", f"field {field!r} holds no turns")
    keys = FORMATS.get(field, ("role", "content"))
    out = []
    for n, turn in enumerate(value, 1):
        if not isinstance(turn, dict):
            return None, ("invalid_conversation", f"turn {n} of {field!r} is {type(turn).__name__}, expected an "
                          "object")
        role_key, content_key = keys
        if turn.get(role_key) is None and turn.get("role") is not None:  # ShareGPT turns that use role/content
            role_key, content_key = "role", "content"
        role, content = turn.get(role_key), turn.get(content_key)
        role = SHAREGPT_ROLES.get(role, role) if role_key == "from" else role
        if role not in ROLES:
            return None, ("invalid_conversation", f"turn {n} of {field!r} has {role_key} {turn.get(role_key)!r}; "
                          "expected one of " + ", ".join(SHAREGPT_ROLES if role_key == "from" else ROLES))
        if content is None:
            content = ""  # an assistant turn that only calls tools
        if not isinstance(content, str):
            return None, ("invalid_conversation", f"turn {n} of {field!r}: {content_key} is "
                          f"{type(content).__name__}, expected a string")
        if SURROGATE.search(content):
            return None, ("invalid_utf8", f"turn {n} of {field!r}: {content_key} holds invalid UTF-8 (or an "
                          "unpaired surrogate escape)")
        out.append({"role": role, "content": content})
    if not answered:
        if out[-1]["role"] == "assistant":
            return None, ("invalid_conversation", f"the last turn of {field!r} is the assistant's; end with the "
                          "turn to answer")
        return out, None
    if out[-1]["role"] != "assistant" or not out[-1]["content"].strip():
        last = "an empty assistant turn" if out[-1]["role"] == "assistant" else f"a {out[-1]['role']} turn"
        return None, ("invalid_conversation", f"the last turn of {field!r} is {last}; a conversation ends with "
                      "the assistant's answer (it is what evaluate scores)")
    return out, None


@dataclass
class ChatFormat:
    """The template conversations are rendered with, the tokens it added to the tokenizer (with their ids), and
    the EOS token: the template's end-of-turn token, so that generation stops where an answer ends."""
    template: str
    added_tokens: dict[str, int]
    eos_token: str

    def meta(self) -> dict:
        return {"chat_template": self.template, "added_tokens": self.added_tokens, "eos_token": self.eos_token}


def apply_chat(tokenizer, meta: dict | None) -> None:
    """Set up `tokenizer` as prepare did (prepared.json's "chat"): the same template, added tokens at the same ids
    and EOS; nothing for prompt/response data."""
    if not meta:
        return
    missing = [t for t in meta["added_tokens"] if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in meta["added_tokens"]}
    if ids != meta["added_tokens"]:
        raise StageError(f"the tokenizer gives the chat template's tokens the ids {ids}, the prepared data has "
                         f"{meta['added_tokens']}: the model changed since prepare ran (dvc repro prepare)")
    tokenizer.chat_template = meta["chat_template"]
    tokenizer.eos_token = meta["eos_token"]


def setup_chat(tokenizer, chat_template: str | None, model_name: str) -> ChatFormat:
    """Put the chat template on `tokenizer` (a name, a Jinja text, or None for the tokenizer's own) and add the
    special tokens a named template needs; returns what was set."""
    added: dict[str, int] = {}
    if chat_template is None:
        if not isinstance(tokenizer.chat_template, str) or not tokenizer.chat_template:
            raise StageError(f"prepare.chat_template: the tokenizer of {model_name} has no chat template, so "
                             f"conversations cannot be rendered; name one ({', '.join(TEMPLATES)}) or give a Jinja "
                             "template's text")
    elif chat_template in TEMPLATES:
        vocab = tokenizer.get_vocab()
        missing = [t for t in TEMPLATE_TOKENS[chat_template] if t not in vocab]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
            added = {t: tokenizer.convert_tokens_to_ids(t) for t in missing}
        tokenizer.chat_template = TEMPLATES[chat_template]
    else:
        tokenizer.chat_template = chat_template
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    try:
        text = render(tokenizer, probe)
    except Exception as err:  # jinja2's TemplateError, or a raise_exception in the template
        raise StageError(f"prepare.chat_template: the template does not render a user/assistant exchange: {err}") \
            from None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    after = text.rfind("pong") + len("pong")
    specials = set(tokenizer.all_special_ids)
    end = [t for t, (s, _) in zip(enc["input_ids"], enc["offset_mapping"], strict=True) if s >= after and t in specials]
    if not end:
        print("warning: prepare.chat_template: the template ends an assistant turn with no special token, so the "
              "model does not learn where an answer ends; generation stops only at EOS or evaluate.max_new_tokens",
              file=sys.stderr)
    elif end[0] != tokenizer.eos_token_id:  # <|im_end|>, <|eot_id|>: what generation must stop at
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(end[0])
    return ChatFormat(tokenizer.chat_template, added, tokenizer.eos_token)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def content_spans(tokenizer, text: str, messages: list[dict]) -> list[tuple[int, int] | None]:
    """Where each message's content lies in the rendered `text` (verbatim, or trimmed as some templates write it);
    None for a message the template leaves out (a system prompt some templates drop).

    The conversation is rendered again with a unique placeholder for each content, so the text between contents
    (headers, separators) is known; walking both renderings together places each content in its own slot, never in
    a header that happens to hold the same letters. Where the two renderings part (a template that changes a
    content, or decides on it), the rest is found by searching the text in order."""
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    try:
        skeleton = render(tokenizer, [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)])
    except Exception:  # a template that refuses the placeholders: search instead
        return search_spans(text, messages, 0)
    spans: list[tuple[int, int] | None] = []
    pos = slot = 0  # in text, in skeleton
    for i, message in enumerate(messages):
        at = skeleton.find(marks[i], slot)
        if at < 0:
            spans.append(None)  # not rendered
            continue
        between = skeleton[slot:at]
        content = message["content"]
        found = next((c for c in (content, content.strip()) if text.startswith(between + c, pos)), None)
        if found is None:
            return spans + search_spans(text, messages[i:], pos)
        start = pos + len(between)
        spans.append((start, start + len(found)))
        pos, slot = start + len(found), at + len(marks[i])
    return spans


def search_spans(text: str, messages: list[dict], cursor: int) -> list[tuple[int, int] | None]:
    """Each message's content found by searching `text` in order from `cursor`."""
    spans: list[tuple[int, int] | None] = []
    for message in messages:
        content = message["content"]
        found = None
        for needle in (content, content.strip()):
            if needle:
                at = text.find(needle, cursor)
                if at >= 0:
                    found = (at, at + len(needle))
                    break
        spans.append(found)
        if found:
            cursor = found[1]
    return spans


def trained_spans(tokenizer, text: str, messages: list[dict], special: list[str], roles: list[str],
                  turns_: str) -> list[tuple[int, int]]:
    """Character spans to train on: each trained turn's content through its end-of-turn special token (the first
    special token after the content, before the next message's content)."""
    spans = content_spans(tokenizer, text, messages)
    chosen = [i for i, m in enumerate(messages) if m["role"] in roles and m["content"].strip()]
    if turns_ == "last":
        chosen = chosen[-1:]
    out = []
    for i in chosen:
        if spans[i] is None:
            raise ValueError(f"the chat template does not render turn {i + 1} ({messages[i]['role']}) verbatim, so "
                             "its tokens cannot be found")
        start, end = spans[i]
        stop = next((s[0] for s in spans[i + 1:] if s is not None and s[1] > s[0]), len(text))
        between = [(text.find(tok, end, stop), tok) for tok in special]
        between = [(at, tok) for at, tok in between if at >= 0]
        if between:
            at, tok = min(between)
            end = at + len(tok)
        out.append((start, end))
    return out


def tokenize_conversations(conversations: list[list[dict]], tokenizer, roles: list[str], turns_: str) -> \
        list[tuple[list[int], list[int]] | str]:
    """(input_ids, labels) of each conversation, or the reason it cannot be tokenized; one batched tokenizer call."""
    texts, problems = [], {}
    for n, messages in enumerate(conversations):
        try:
            texts.append(render(tokenizer, messages))
        except Exception as err:  # the template refused this conversation (raise_exception, a role it lacks)
            problems[n] = f"the chat template refused the conversation: {err}"
            texts.append("")
    special = sorted(set(tokenizer.all_special_tokens), key=len, reverse=True)
    all_ids, all_offsets = encode_with_offsets(tokenizer, texts)
    out: list[tuple[list[int], list[int]] | str] = []
    for n, messages in enumerate(conversations):
        if n in problems:
            out.append(problems[n])
            continue
        try:
            spans = trained_spans(tokenizer, texts[n], messages, special, roles, turns_)
        except ValueError as err:
            out.append(str(err))
            continue
        ids, offsets = all_ids[n], all_offsets[n]
        labels = [IGNORE_INDEX] * len(ids)
        k = 0
        for start, end in spans:
            while k < len(ids) and offsets[k][1] <= start:
                k += 1
            while k < len(ids) and offsets[k][0] < end:
                if offsets[k][1] > offsets[k][0]:  # a token that covers text of the span
                    labels[k] = ids[k]
                k += 1
        out.append((ids, labels))
    return out

