"""Read data files into text, conversation or preference records, and say what was read.

    result = read_records("data/prefs.jsonl", "preference", on_bad="drop")
    print(describe(result))

Inputs:
- `.jsonl` / `.jsonl.gz`: one JSON object per line; blank lines are skipped; records are named by line number.
- `.json` / `.json.gz`: an array of objects, or an object with exactly one list field holding them; records are
  named by their 0-based index.
- `.parquet`: one record per row (0-based row number).
- `.txt` (kind "text" only): if the file has lines that are exactly `<|endoftext|>`, those lines separate
  documents; otherwise the whole file is one document. Newlines around each document are removed, and
  whitespace-only pieces (for example after a final separator) are not documents.
- a hub dataset id, `owner/name` or `owner/name:split` (default split "train"), when no such local path exists;
  loaded with `datasets.load_dataset`.

The record format is detected from the fields of the first record (see `formats.detect`), or named with `fmt`.
Every bad record either stops the read with a PipelineError (on_bad="error") or is dropped and counted by
reason (on_bad="drop"); nothing is dropped silently. Exact duplicates are kept and counted.
"""

from __future__ import annotations

import gzip
import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from pipeline.data.formats import FORMATS, BadRecord, detect, type_name, unrecognised
from pipeline.errors import PipelineError

KINDS = tuple(FORMATS)
MAX_PROBLEMS = 20
_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".txt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(:[\w.\[\]%:+-]+)?$")
_EOT_LINE = re.compile(r"^<\|endoftext\|>[ \t\r]*$", re.MULTILINE)

Row = tuple[str, Any]  # (where: "data/x.jsonl line 3", the parsed value or a BadRecord)


@dataclass
class ReadResult:
    """What a read produced: the records, and an account of everything that was not kept."""

    records: list[dict]
    format: str  # the detected (or given) format name, e.g. "alpaca", "hh_rlhf", "txt"
    source: str  # the path or hub id as given
    kind: str = "text"  # "text" | "conversation" | "preference"
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    problems: list[str] = field(default_factory=list)  # messages of the first dropped records
    duplicates: int = 0  # records that exactly repeat an earlier kept record (kept; the caller decides)


# ---------------------------------------------------------------------------- public API


def read_records(path: str | PathLike, kind: str, fmt: str = "auto", *, on_bad: str = "error",
                 keep: tuple[str, ...] = ()) -> ReadResult:
    """Read `path` (file or hub id) as records of `kind`; `fmt` is "auto" or a format name from FORMATS[kind].

    `keep` names top-level fields copied unchanged into each record when present (e.g. "answer" for scoring).
    """
    source = str(path)
    if kind not in FORMATS:
        raise PipelineError(f'unknown data kind "{kind}" (choose from {", ".join(KINDS)})')
    if on_bad not in ("error", "drop"):
        raise PipelineError(f'on_bad must be "error" or "drop", got "{on_bad}"')
    known = ["auto", *FORMATS[kind]] + (["txt"] if kind == "text" else [])
    if fmt not in known:
        raise PipelineError(f'{source}: format "{fmt}" is not one for kind "{kind}" (choose from {", ".join(known)})')

    if _local_file(source).name.lower().endswith(".txt"):
        return _read_txt(source, kind, fmt)
    rows = _load_rows(source)
    if not rows:
        raise PipelineError(f"{source}: no records (the file is empty)")

    if fmt == "auto":
        first = next((value for _, value in rows if isinstance(value, dict)), None)
        if first is None:  # every row is malformed or not an object: report the first
            bad = rows[0][1]
            raise PipelineError(bad.message if isinstance(bad, BadRecord) else _not_object(rows[0][0], bad))
        fmt = detect(first, kind) or ""
        if not fmt:
            raise PipelineError(unrecognised(first, kind, source))
    convert = FORMATS[kind][fmt][0]

    result = ReadResult(records=[], format=fmt, source=source, kind=kind)
    dropped: Counter[str] = Counter()
    for loc, value in rows:
        try:
            if isinstance(value, BadRecord):
                raise value
            if not isinstance(value, dict):
                raise BadRecord("not_an_object", _not_object(loc, value))
            record = convert(value, loc)
            record.update({key: value[key] for key in keep if key in value})
            result.records.append(record)
        except BadRecord as bad:
            if on_bad == "error":
                raise PipelineError(bad.message) from None
            dropped[bad.reason] += 1
            if len(result.problems) < MAX_PROBLEMS:
                result.problems.append(bad.message)
    result.dropped = dict(dropped.most_common())
    if not result.records:
        reasons = ", ".join(f"{r} {n}" for r, n in result.dropped.items())
        raise PipelineError(
            f"{source}: no usable records: all {len(rows)} were dropped ({reasons}); first: {result.problems[0]}"
        )
    result.duplicates = count_duplicates(result.records)
    return result


def count_duplicates(records: list[dict]) -> int:
    """How many records exactly repeat an earlier one."""
    seen = {json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records}
    return len(records) - len(seen)


def describe(result: ReadResult) -> str:
    """A short audit of a read: source, format, counts, drops by reason, duplicates, and shape statistics."""
    n, n_dropped = len(result.records), sum(result.dropped.values())
    lines = [
        f"source:     {result.source}",
        f"format:     {result.format} (kind {result.kind})",
        f"records:    {n} kept, {n_dropped} dropped",
    ]
    if result.dropped:
        lines.append("dropped:    " + ", ".join(f"{reason} {count}" for reason, count in result.dropped.items()))
    lines.append(f"duplicates: {result.duplicates} exact repeats (kept)")
    lines += _shape_stats(result)
    if result.problems:
        lines.append("first problems:")
        lines += [f"  {p}" for p in result.problems[:5]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- loading rows


def _local_file(source: str) -> Path:
    return Path(source).expanduser()


def looks_like_hub_id(source: str) -> bool:
    name = source.split(":", 1)[0].lower()
    return bool(_HUB_ID.match(source)) and not name.endswith(_SUFFIXES + (".gz", ".csv"))


def _load_rows(source: str) -> list[Row]:
    path = _local_file(source)
    if not path.exists():
        if looks_like_hub_id(source):
            return _hub_rows(source)
        raise PipelineError(f"file not found: {source}")
    if path.is_dir():
        raise PipelineError(f"{source}: is a directory; give a data file ({', '.join(_SUFFIXES)}) or a hub id")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_rows(_read_text(path, source), source)
    if name.endswith((".json", ".json.gz")):
        return _json_rows(_read_text(path, source), source)
    if name.endswith(".parquet"):
        return _parquet_rows(path, source)
    raise PipelineError(
        f"{source}: unsupported file type (supported: {', '.join(_SUFFIXES)}, or a hub id owner/name[:split])"
    )


def _read_text(path: Path, source: str) -> str:
    try:
        data = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise PipelineError(f"{source}: cannot read: {_one_line(e)}") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PipelineError(f"{source}: not UTF-8 text (invalid byte at offset {e.start})") from None


def _jsonl_rows(text: str, source: str) -> list[Row]:
    rows: list[Row] = []
    # split on "\n" only: str.splitlines() would also split on U+2028 etc., which JSON strings may contain
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        loc = f"{source} line {number}"
        try:
            rows.append((loc, json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append((loc, BadRecord("bad_json", f"{loc}: invalid JSON: {e.msg} (column {e.colno})")))
    return rows


def _json_rows(text: str, source: str) -> list[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PipelineError(f"{source} line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise PipelineError(
                f"{source}: expected a JSON array of records, or an object with one list field; "
                f"got an object with {len(lists)} list fields (fields: {', '.join(map(str, data)) or 'none'})"
            )
        return [(f'{source} "{lists[0]}" index {i}', value) for i, value in enumerate(data[lists[0]])]
    if not isinstance(data, list):
        raise PipelineError(f"{source}: expected a JSON array of records, got {type_name(data)}")
    return [(f"{source} index {i}", value) for i, value in enumerate(data)]


def _parquet_rows(path: Path, source: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise PipelineError(f"{source}: cannot read Parquet: {_one_line(e)}") from e
    return [(f"{source} row {i}", row) for i, row in enumerate(table.to_pylist())]


def _hub_rows(source: str) -> list[Row]:
    name, _, split = source.partition(":")
    try:
        import datasets  # heavy import: only when a hub id is used

        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, no such dataset, needs a config name, ...
        raise PipelineError(
            f"{source}: no such local file, and loading it as a hub dataset failed: {type(e).__name__}: {_one_line(e)}"
        ) from e
    return [(f"{source} row {i}", row) for i, row in enumerate(dataset)]


def _read_txt(source: str, kind: str, fmt: str) -> ReadResult:
    if kind != "text":
        raise PipelineError(f'{source}: a .txt file holds plain text; kind "{kind}" needs .jsonl, .json or .parquet')
    if fmt not in ("auto", "txt"):
        raise PipelineError(f'{source}: format "{fmt}" does not apply to a .txt file (use "auto" or "txt")')
    path = _local_file(source)
    if not path.is_file():
        raise PipelineError(f"file not found: {source}")
    text = _read_text(path, source)
    pieces = _EOT_LINE.split(text) if _EOT_LINE.search(text) else [text]
    records = [{"text": piece.strip("\r\n")} for piece in pieces if piece.strip()]
    if not records:
        raise PipelineError(f"{source}: no text (the file is empty)")
    return ReadResult(records=records, format="txt", source=source, kind=kind, duplicates=count_duplicates(records))


# ---------------------------------------------------------------------------- helpers


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _not_object(loc: str, value: Any) -> str:
    return f"{loc}: expected a JSON object, got {type_name(value)}"


def _spread(values: list[int]) -> str:
    median = statistics.median(values)
    shown = int(median) if median == int(median) else round(median, 1)
    return f"min {min(values)} / median {shown} / max {max(values)}"


def _shape_stats(result: ReadResult) -> list[str]:
    records = result.records
    if result.kind == "text":
        chars = [len(r["text"]) for r in records]
        return [f"characters: {sum(chars)} in all; per document {_spread(chars)}"]
    if result.kind == "conversation":
        dialogues = [r["messages"] for r in records]
    else:
        dialogues = [r["prompt"] for r in records]
    roles = Counter(m["role"] for d in dialogues for m in d)
    turns = [sum(m["role"] != "system" for m in d) for d in dialogues]
    with_system = sum(bool(d) and d[0]["role"] == "system" for d in dialogues)
    what = "messages per conversation" if result.kind == "conversation" else "messages per prompt"
    lines = [
        f"{what}: {_spread(turns)} (system not counted); {with_system} with a system message",
        "messages by role: " + ", ".join(f"{r} {roles[r]}" for r in ("system", "user", "assistant") if roles[r]),
    ]
    if result.kind == "preference":
        chosen = [len(r["chosen"][0]["content"]) for r in records]
        rejected = [len(r["rejected"][0]["content"]) for r in records]
        lines.append(f"response characters: chosen {_spread(chosen)}; rejected {_spread(rejected)}")
    return lines
