"""params `data` (where the examples come from and how they are split) and `prepare` (how they become tokens)."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class DataParams:
    path: str = "data/raw/transforms.jsonl"  # JSONL/JSON, CSV, Parquet... anything `datasets` loads
    prompt_field: str | None = None  # null = recognize prompt/response or instruction/input/output
    input_field: str | None = None  # optional context appended to the prompt (Alpaca's "input")
    response_field: str | None = None
    messages_field: str | None = None  # null = recognize messages (role/content) or conversations (from/value)
    validation_path: str | None = None  # given split files instead of the ratio split below
    test_path: str | None = None
    validation_ratio: float = 0.05  # share of examples held out to pick checkpoints
    test_ratio: float = 0.1  # share held out for the evaluate stage; never trained on
    seed: int = 42  # fixes the split
    stratify: Literal["auto"] | bool = "auto"  # auto: keep each label's share in every split if answers are labels
    on_bad_record: Literal["fail", "skip"] = "fail"  # fail at the first bad record, or skip and count them all

    def problems(self) -> list[str]:
        out = []
        for name in ("validation_ratio", "test_ratio"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                out.append(f"data.{name}: {value} is outside [0, 1)")
        if self.validation_ratio + self.test_ratio >= 1:
            out.append(f"data.validation_ratio + data.test_ratio = {self.validation_ratio + self.test_ratio}: "
                       "must be below 1 to leave training examples")
        if self.validation_path is None and self.validation_ratio == 0:
            out.append("data.validation_ratio: 0 leaves no validation split; "
                       "set it above 0 or set data.validation_path")
        if self.test_path is None and self.test_ratio == 0:
            out.append("data.test_ratio: 0 leaves no test split; set it above 0 or set data.test_path")
        if self.messages_field and self.prompt_field:
            out.append("data.messages_field and data.prompt_field: a dataset holds conversations or prompt/response "
                       "pairs; set one")
        if (self.prompt_field is None) != (self.response_field is None):
            out.append("data.prompt_field and data.response_field: set both, or neither to auto-detect")
        return out


@dataclass
class PrepareParams:
    template: str = "### Instruction:\n{prompt}\n\n### Response:\n"  # must contain {prompt}; the response follows it
    max_length: int = 128  # tokens per example, prompt + response; longer ones are handled per `overlong`
    overlong: Literal["truncate", "drop"] = "truncate"  # truncate the response, or drop the example
    # conversations (and prompt/response pairs, when set): null = the tokenizer's own template; a name
    # (chatml, llama3, mistral, zephyr) or a Jinja template's text
    chat_template: str | None = None
    train_roles: list[str] = field(default_factory=lambda: ["assistant"])  # the roles whose turns are trained
    train_turns: Literal["all", "last"] = "all"  # every turn of those roles, or the last only
    num_proc: int | Literal["auto"] = "auto"  # tokenizing processes; auto: the cores, for 20k+ examples

    def problems(self) -> list[str]:
        out = []
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        except ValueError as err:  # a lone { or }
            fields = None
            out.append(f"prepare.template: {self.template!r}: {err}; write {{{{ and }}}} for literal braces")
        if fields is not None and fields != {"prompt"}:
            unknown = sorted(fields - {"prompt"})
            out.append(f"prepare.template: {self.template!r} " + (
                f"has unknown placeholders {', '.join('{' + f + '}' for f in unknown)}; the only one is {{prompt}} "
                "(write {{ and }} for literal braces)" if unknown else "has no {prompt} placeholder"))
        unknown_roles = [r for r in self.train_roles if r not in ROLES]
        if unknown_roles or not self.train_roles:
            out.append(f"prepare.train_roles: {self.train_roles}: " + (
                f"{', '.join(map(repr, unknown_roles))} is not a role" if unknown_roles else "names no role")
                + f"; the roles are {', '.join(ROLES)}")
        out += chat_template_problems(self.chat_template)
        if self.num_proc != "auto" and self.num_proc < 1:
            out.append(f"prepare.num_proc: {self.num_proc} must be at least 1 (or auto)")
        if self.max_length < 2:
            out.append(f"prepare.max_length: {self.max_length} must be at least 2")
        return out



def chat_template_problems(template: str | None) -> list[str]:
    """A name that is not one of the named templates, or Jinja text that does not parse."""
    import difflib

    from finetune.data.chat_templates import TEMPLATES

    if template is None or template in TEMPLATES:
        return []
    if "{{" not in template and "{%" not in template:
        close = difflib.get_close_matches(template, TEMPLATES, n=1)
        return [f"prepare.chat_template: {template!r} is neither a template name ({', '.join(TEMPLATES)}"
                + (f"; did you mean {close[0]!r}?" if close else "") + ") nor a Jinja template's text"]
    import jinja2

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as err:
        if "generation" not in str(err):  # transformers' {% generation %} tag is an extension plain Jinja lacks
            return [f"prepare.chat_template: the Jinja template does not parse: {err.message} (line {err.lineno} "
                    "of the template)"]
    return []
