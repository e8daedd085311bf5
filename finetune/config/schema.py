"""The schema machinery: YAML read as DVC reads it, dataclasses filled from it with every problem collected and
located by its line."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Literal

import yaml

INT_LIMIT = 2**31 - 1  # every count, size and seed fits a 32-bit signed integer


class ParamsError(ValueError):
    """Every problem found in params.yaml, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid parameters:\n  " + "\n  ".join(problems))


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        inner = typing.get_args(tp)[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(inner, _type_name(inner))
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(_matches(v, typing.get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading floats as YAML 1.2 (and DVC) do: `1e-4` and the `1e-07` that
    `dvc exp run -S train.learning_rate=1e-7` writes are numbers, not strings."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Map 'section.key' -> line number (1-based) from a composed YAML tree."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}{key_node.value}"
            lines[path] = key_node.start_mark.line + 1
            lines.update(key_lines(value_node, path + "."))
    return lines


def located(problems: list[str], node: yaml.Node | None, source: str) -> list[str]:
    """Each problem ('key: what is wrong') prefixed with `source` and the line of its key, or of the nearest
    enclosing key the file has (an unknown or missing key's section), in the order of the file."""
    lines = key_lines(node) if node is not None else {}

    def line_of(problem: str) -> int:
        key = problem.split(":", 1)[0].split(" and ")[0]
        parts = key.split(".")
        return next((lines[k] for k in (".".join(parts[:n]) for n in range(len(parts), 0, -1)) if k in lines), 0)

    return [f"{source}:{line_of(p)}: {p}" if line_of(p) else f"{source}: {p}" for p in sorted(problems, key=line_of)]


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass a field holds: `Section`, or `Section | None`."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _named_dataclasses(tp: Any) -> type | None:
    """The dataclass of a `dict[str, Section]` field (a mapping of names to sections, e.g. a search space)."""
    if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
        return typing.get_args(tp)[1]
    return None


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass `cls` from `raw`, appending every problem found to `problems`: unknown keys (with the
    closest valid one), missing required keys, wrong types, non-finite or out-of-range numbers, then the section's
    own `problems()` when all of it was well-formed. Sections nest (`Section`, `Section | None`, `dict[str, Section]`).
    Returns None when a required key is missing."""
    before = len(problems)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.')}: expected a mapping of keys, got {raw!r}")
        raw = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        hint = hints.get(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            better = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(fields)}"
            problems.append(f"{prefix}{key}: unknown key{better}")
        elif _dataclass_in(hint) and (value is not None or dataclasses.is_dataclass(hint)):
            values[key] = build(_dataclass_in(hint), value, f"{prefix}{key}.", problems)
        elif _named_dataclasses(hint):
            if not isinstance(value, dict):
                problems.append(f"{prefix}{key}: expected a mapping of names to settings, got {value!r}")
            else:
                values[key] = {name: build(_named_dataclasses(hint), spec, f"{prefix}{key}.{name}.", problems)
                               for name, spec in value.items()}
        elif not _matches(value, hint):
            problems.append(f"{prefix}{key}: {value!r} is not {_type_name(hint)}")
        elif isinstance(value, float) and not math.isfinite(value):  # YAML's .nan and .inf, or 1e400
            problems.append(f"{prefix}{key}: {value} is not a finite number")
        elif isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value <= INT_LIMIT:
            problems.append(f"{prefix}{key}: {value} is out of range (at most {INT_LIMIT} in size)")
        elif key == "seed" and value < 0:  # every section's seed: numpy and torch take only non-negative seeds
            problems.append(f"{prefix}{key}: {value} must not be negative")
        else:
            values[key] = float(value) if hint is float else value
    missing = [name for name, f in fields.items() if _required(f) and name not in raw]
    problems.extend(f"{prefix}{name}: missing" for name in missing)
    if any(_required(f) and name not in values for name, f in fields.items()):  # missing, or refused above
        return None
    instance = cls(**values)
    if hasattr(instance, "problems") and len(problems) == before:  # range checks only on well-formed sections
        problems.extend(instance.problems())
    return instance
