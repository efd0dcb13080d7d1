"""Turn plain dicts (from YAML and `key=value` overrides) into typed dataclasses, strictly.

Unknown keys and values of the wrong type are user errors that name the dotted key and
suggest the nearest valid name, the way TRL's and nanoGPT's parsers refuse them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

import yaml

from pipeline.errors import PipelineError


def option(default: Any, doc: str, **kwargs):
    """A dataclass field with its one-line doc kept beside it (shown by `pipeline check --explain`)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kwargs)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata={"doc": doc}, **kwargs)
    return dataclasses.field(default=default, metadata={"doc": doc}, **kwargs)


def closest(name: str, candidates) -> str:
    """' (did you mean `x`?)' for the nearest candidate, or '' when nothing is near."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean `{match[0]}`?)" if match else ""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (nested dataclasses built)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except PipelineError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else PipelineError(
            f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = closest(str(value), [str(c) for c in choices])
            raise PipelineError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}{hint}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item_tp is str:
            value = [value]  # a single path where a list is expected is the common case
        if not isinstance(value, list):
            raise PipelineError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads `3e-4` (no dot) as a string; every user means the number
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a hub revision written as a number
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise PipelineError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def build(cls, data: Any, prefix: str = ""):
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types."""
    where = prefix or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PipelineError(f"{where}: expected a mapping of keys, got {data!r} ({type(data).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise PipelineError(f"unknown key `{dotted}`{closest(str(key), fields)}")
        kwargs[key] = _convert(value, hints[key], dotted)
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise PipelineError(f"{where}: missing required key `{(prefix + '.' if prefix else '') + missing[0]}`")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(prefix)
    return obj


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` to a nested dict; the value is parsed as YAML (so 3 is an int)."""
    if "=" not in assignment:
        raise PipelineError(f"override `{assignment}` is not of the form key=value (e.g. pretrain.max_steps=50)")
    dotted, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise PipelineError(f"override `{assignment}`: `{part}` is not a section")
        node = node[part]
    node[parts[-1]] = value


def describe(cls, prefix: str = "") -> list[str]:
    """One line per field, `key: default  # doc`, for `pipeline check --explain`."""
    lines = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        doc = f.metadata.get("doc", "")
        hint = typing.get_type_hints(cls)[f.name]
        sub = [a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)]
        if sub:
            lines.append(f"{key}:  # {doc}")
            lines.extend(describe(sub[0], key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)"
        )
        lines.append(f"{key}: {default!r}  # {doc}")
    return lines


def to_dict(obj) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
