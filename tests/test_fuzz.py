"""Property tests (hypothesis): on any input, the readers and the override parser give a result or a one-line
PipelineError, never another exception."""

from __future__ import annotations

import copy
import gzip
import json
import os
import string
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config_schema import apply_override, build, describe
from pipeline.data.formats import FORMATS
from pipeline.data.readers import read_records
from pipeline.errors import PipelineError
from pipeline.recipe import Recipe
from tests.conftest import dpo_section, sft_section, tiny_recipe_dict

# PIPELINE_FUZZ_EXAMPLES=5000 searches harder; no example database (nothing written into the repository)
FAST = settings(max_examples=int(os.environ.get("PIPELINE_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
KINDS = tuple(FORMATS)

# ---------------------------------------------------------------------------- records

# the field names the formats look at, so random records reach deep into the converters
FIELDS = ["text", "content", "messages", "conversations", "role", "from", "value", "instruction", "input", "output",
          "history", "system", "prompt", "completion", "answer", "chosen", "rejected", "message_id", "replies",
          "rank", "deleted", "label", "turns"]
ROLES = ["user", "assistant", "system", "human", "gpt", "prompter", "tool", ""]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(ROLES + ["\n\nHuman: hi\n\nAssistant: yo", "<|end|>"]))
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(keys, inner, max_size=5)),
                           max_leaves=25)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": scalars}), max_size=5)
records = st.one_of(
    st.dictionaries(keys, json_values, max_size=6),
    st.fixed_dictionaries({"messages": messages}),
    st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=10), messages), "chosen": json_values,
                           "rejected": json_values}),
    st.fixed_dictionaries({"instruction": scalars, "output": scalars}, optional={"input": scalars,
                                                                                 "history": json_values}),
    json_values,
)


def _read(path: Path, kind: str, fmt: str, on_bad: str):
    """read_records' outcome: the result, or the PipelineError's message; anything else fails the test."""
    try:
        result = read_records(path, kind, fmt, on_bad=on_bad)
    except PipelineError as exc:
        message = str(exc)
        assert len(message.splitlines()) == 1, message
        return message
    assert result.records, "a result always holds records"
    for message in result.problems:
        assert len(message.splitlines()) == 1, message
    return result


def _formats(kind: str) -> list[str]:
    return ["auto", *FORMATS[kind]]


@FAST
@given(rows=st.lists(records, min_size=1, max_size=6), kind=st.sampled_from(KINDS), data=st.data(),
       on_bad=st.sampled_from(["error", "drop"]), as_array=st.booleans())
def test_random_records_read_or_refused(rows, kind, data, on_bad, as_array):
    fmt = data.draw(st.sampled_from(_formats(kind)))
    with tempfile.TemporaryDirectory() as tmp:
        if as_array:
            path = Path(tmp) / "records.json"
            path.write_text(json.dumps(rows))
        else:
            path = Path(tmp) / "records.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        outcome = _read(path, kind, fmt, on_bad)
        if not isinstance(outcome, str) and not as_array:
            assert len(outcome.records) + sum(outcome.dropped.values()) == len(rows)  # nothing lost silently


@FAST
@given(blob=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".jsonl.gz", ".json.gz", ".txt",
                                                           ".parquet"]),
       kind=st.sampled_from(KINDS), on_bad=st.sampled_from(["error", "drop"]), compress=st.booleans())
def test_random_bytes_read_or_refused(blob, suffix, kind, on_bad, compress):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(gzip.compress(blob) if compress and suffix.endswith(".gz") else blob)
        _read(path, kind, "auto", on_bad)


@FAST
@given(lines=st.lists(st.one_of(st.text(alphabet='{}[]":,0123456789.-eE truefalsn\\u"', max_size=40),
                                st.text(max_size=40)), min_size=1, max_size=6),
       kind=st.sampled_from(KINDS), on_bad=st.sampled_from(["error", "drop"]))
def test_json_looking_text_read_or_refused(lines, kind, on_bad):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lines.jsonl"
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        _read(path, kind, "auto", on_bad)


# ---------------------------------------------------------------------------- overrides

BASE = tiny_recipe_dict(Path("/world"), Path("/runs"))
BASE.update(sft=sft_section(Path("/world")), dpo=dpo_section(Path("/world")), eval={"limit": 8})
DOTTED = [line.split(":", 1)[0] for line in describe(Recipe)]
VALUES = ["0", "-1", "1", "2", "0.5", "1.0", "1e400", "-1e-3", ".nan", ".inf", "-.inf", "true", "null", "~", "",
          "[]", "[a, b]", "{a: 1}", "[sigmoid, sft]", "cosine", "bogus", "auto", "'3'", "0x10", "1_000",
          "2026-01-01", "!!binary aGk=", "[[[[", "{", "'", "1" * 5000, "[" * 1000, "a: b: c", "&a [*a]"]


def _check(assignments: list[str]):
    data = copy.deepcopy(BASE)
    try:
        for assignment in assignments:
            apply_override(data, assignment)
        recipe = build(Recipe, data)
    except PipelineError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)
        return str(exc)
    assert isinstance(recipe, Recipe)
    return recipe


@FAST
@given(st.lists(st.tuples(st.sampled_from(DOTTED), st.one_of(st.sampled_from(VALUES), st.text(max_size=12))),
                min_size=1, max_size=3))
def test_known_keys_with_random_values(pairs):
    _check([f"{key}={value}" for key, value in pairs])


@FAST
@given(st.lists(st.text(alphabet=string.printable + "\u2028\x00\ud800é", max_size=30), min_size=1, max_size=3))
def test_random_override_strings(assignments):
    _check(assignments)


def test_the_base_recipe_builds():
    assert isinstance(_check([]), Recipe)
