"""Turn plain dicts (from YAML and `key=value` overrides) into typed dataclasses, strictly.

Unknown keys and values of the wrong type are user errors that name the dotted key and
suggest the nearest valid name, the way TRL's and nanoGPT's parsers refuse them.

Each field may also declare its valid values beside its doc, and `build` enforces them before
the dataclass's own `validate` (cross-field checks) runs:

    option(16, "blocks per step", min=1)                      # an integer >= 1
    option(1e-3, "peak learning rate", min_exclusive=0)       # a float > 0 (and finite: NaN and inf are refused)
    option(0.0, "dropout", min=0, max_exclusive=1)            # 0 <= x < 1
    option("cosine", "scheduler", choices=lambda: NAMES)      # one of a list (computed when first needed)

On a list field the bounds and choices apply to every item. Errors are one line naming the
dotted key and the allowed range.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union

import yaml

from pipeline.errors import PipelineError


def option(default: Any, doc: str, *, min=None, max=None, min_exclusive=None, max_exclusive=None,
           finite: bool = True, choices=None, refused: dict | None = None, why: str = "", data: Reads | None = None,
           **kwargs):
    """A dataclass field with its one-line doc and its valid values kept beside it.

    min / max: inclusive bounds; min_exclusive / max_exclusive: strict bounds. finite=False lets a float
    field hold NaN or inf (none does). choices: the allowed strings, or a function returning them (called
    only when a value is checked, so a library's list costs nothing until then). refused: choices that
    exist but cannot be used here, each with the reason. why: said after a range error. data: a Reads, where
    the field names data files a stage reads (they are checked to exist, read by `check` and before a run the
    way the stage reads them, and hashed into the stage's fingerprint).
    The doc, range and choices are shown by `pipeline check --explain`.
    """
    metadata = {"doc": doc, "min": min, "max": max, "min_exclusive": min_exclusive, "max_exclusive": max_exclusive,
                "finite": finite, "choices": choices, "refused": refused or {}, "why": why, "data": data}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def _number(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def range_text(metadata) -> str:
    """The declared bounds as text: '>= 1', '> 0', 'in [0, 1)', or '' when there are none."""
    low, high = metadata.get("min"), metadata.get("max")
    low_x, high_x = metadata.get("min_exclusive"), metadata.get("max_exclusive")
    lower = (("(", low_x) if low_x is not None else ("[", low)) if (low_x is not None or low is not None) else None
    upper = ((")", high_x) if high_x is not None else ("]", high)) if (high_x is not None or high is not None) else None
    if lower and upper:
        return f"in {lower[0]}{_number(lower[1])}, {_number(upper[1])}{upper[0]}"
    if lower:
        return f"{'>' if lower[0] == '(' else '>='} {_number(lower[1])}"
    if upper:
        return f"{'<' if upper[0] == ')' else '<='} {_number(upper[1])}"
    return ""


def choices_of(metadata) -> tuple:
    """The declared choices (the callable, if one was given, is called now), or ()."""
    choices = metadata.get("choices")
    if choices is None:
        return ()
    return tuple(choices() if callable(choices) else choices)


def printable(text: str) -> str:
    """`text` with control characters escaped, so an error about it stays on one line."""
    text = str(text)
    return text if text.isprintable() else repr(text)[1:-1]


def check_value(value: Any, metadata, key: str) -> None:
    """Refuse `value` (already of the field's type) when it is outside the field's declared range or choices."""
    if value is None or not metadata:
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_value(item, metadata, f"{key}[{i}]")
        return
    if isinstance(value, str):
        choices = choices_of(metadata)
        if choices and value not in choices:
            raise PipelineError(f"{key}: unknown value {value!r} (choose from {', '.join(choices)})"
                                f"{closest(value, choices)}")
        refused = metadata.get("refused") or {}
        if value in refused:
            usable = ", ".join(c for c in choices if c not in refused)
            raise PipelineError(f"{key}: {value!r} cannot be used here: {refused[value]} (usable: {usable})")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    bounds = range_text(metadata)
    why = f" ({metadata['why']})" if metadata.get("why") else ""
    if isinstance(value, float) and not math.isfinite(value):
        if metadata.get("finite", True):
            raise PipelineError(f"{key}: must be a finite number{f' {bounds}' if bounds else ''}, got {value}{why}")
        return
    low, high = metadata.get("min"), metadata.get("max")
    low_x, high_x = metadata.get("min_exclusive"), metadata.get("max_exclusive")
    if ((low is not None and value < low) or (high is not None and value > high)
            or (low_x is not None and value <= low_x) or (high_x is not None and value >= high_x)):
        raise PipelineError(f"{key}: must be {bounds}, got {_number(value)}{why}")


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
        try:
            return float(value)
        except OverflowError:
            digits = len(str(abs(value)))
            raise PipelineError(f"{key}: must be a finite number, got an integer of {digits} digits") from None
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
            raise PipelineError(f"unknown key `{printable(dotted)}`{closest(str(key), fields)}")
        kwargs[key] = _convert(value, hints[key], dotted)
        check_value(kwargs[key], fields[key].metadata, dotted)
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
        raise PipelineError(f"override `{printable(assignment)}` is not of the form key=value "
                            "(e.g. pretrain.max_steps=50)")
    dotted, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, RecursionError, ValueError, OverflowError):
        value = raw  # not YAML (or nested or sized beyond reason): the text itself, which the type check judges
    node = data
    parts = dotted.strip().split(".")
    if not all(parts):
        raise PipelineError(f"override `{printable(assignment)}`: the key must be dotted names, e.g. sft.epochs")
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise PipelineError(f"override `{printable(assignment)}`: `{printable(part)}` is not a section")
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
        allowed = range_text(f.metadata).removeprefix("in ")
        allowed = f"; valid: {allowed}" if allowed else ""
        if choices_of(f.metadata):
            allowed = "; one of: " + ", ".join(c for c in choices_of(f.metadata) if c not in f.metadata["refused"])
        lines.append(f"{key}: {default!r}  # {doc}{allowed}")
    return lines


def to_dict(obj) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


@dataclasses.dataclass(frozen=True)
class Reads:
    """How a stage reads the files of one data field: the kind of record ("text", "conversation" or
    "preference"), the format, and what a bad record does ("error" stops the stage, "drop" counts it). `fmt`
    and `on_bad` may instead name another field of the same section (`format`, `bad_pairs`) that holds them."""

    kind: str
    fmt: str = "auto"
    on_bad: str = "error"

    def resolve(self, section) -> tuple[str, str, str]:
        """(kind, format, on_bad) for this section's values."""
        fields = {f.name for f in dataclasses.fields(section)}
        return (self.kind, getattr(section, self.fmt) if self.fmt in fields else self.fmt,
                getattr(section, self.on_bad) if self.on_bad in fields else self.on_bad)


def data_fields(obj, prefix: str = "") -> list[tuple[str, list[str], tuple[str, str, str]]]:
    """(dotted field name, its files, (kind, format, on_bad)) for every field declared with `data` in a built
    config, nested sections included."""
    found = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("data"):
            files = value if isinstance(value, list) else [value] if value else []
            found.append((f"{prefix}{f.name}", files, f.metadata["data"].resolve(obj)))
        elif dataclasses.is_dataclass(value):
            found += data_fields(value, f"{prefix}{f.name}.")
    return found


def reads(section, name: str) -> tuple[str, str, str]:
    """(kind, format, on_bad) of one data field of a built section: what its stage reads it with, as declared."""
    field = next(f for f in dataclasses.fields(section) if f.name == name)
    return field.metadata["data"].resolve(section)


def data_paths(obj) -> list[str]:
    """Every data file named in a built config (the fields declared with `data`), nested sections included."""
    return [file for _, files, _ in data_fields(obj) for file in files]
