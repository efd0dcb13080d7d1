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
- a hub dataset id, `owner/name`, `owner/name:split` (default split "train") or `owner/name@revision:split` (a
  commit, tag or branch: the data a resumed or repeated run reads stays the same when the dataset's main branch
  moves), when no such local path exists and `owner` is not a local folder (so a mistyped `data/sft_trian` is
  "file not found", not a hub id); loaded with `datasets.load_dataset`.

The record format is detected from the fields of the first record (see `formats.detect`), or named with `fmt`.
Every bad record either stops the read with a PipelineError (on_bad="error") or is dropped and counted by
reason (on_bad="drop"); nothing is dropped silently. Exact duplicates are kept and counted. Whatever the bytes
(not UTF-8, torn, nested thousands deep, numbers of thousands of digits, fields of the wrong type), the result
is records or a one-line PipelineError naming the file (and the line and field where there is one).
"""

from __future__ import annotations

import difflib
import gzip
import json
import os
import re
import stat
import statistics
import zlib
from collections import Counter
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from pipeline.data.formats import FORMATS, BadRecord, detect, detect_kind, shown, type_name, unrecognised
from pipeline.errors import PipelineError

KINDS = tuple(FORMATS)
MAX_PROBLEMS = 20
_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".txt")
# owner/name, then optionally @revision (a branch, tag or commit; a branch may hold slashes), then :split
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?(:[\w.\[\]%:+-]+)?$")
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
    Kind "auto" (with format "auto") takes the kind the first record's fields suggest (`pipeline data check`).

    `keep` names top-level fields copied unchanged into each record when present (e.g. "answer" for scoring).
    """
    source = str(path)
    if kind not in FORMATS and kind != "auto":
        raise PipelineError(f'unknown data kind "{kind}" (choose from {", ".join(KINDS)}, or auto)')
    if on_bad not in ("error", "drop"):
        raise PipelineError(f'on_bad must be "error" or "drop", got "{on_bad}"')
    known = ["auto", *FORMATS.get(kind, {})] + (["txt"] if kind == "text" else [])
    if fmt not in known:
        raise PipelineError(f'{source}: format "{fmt}" is not one for kind "{kind}" (choose from {", ".join(known)})')

    if _local_file(source).name.lower().endswith(".txt"):
        return _read_txt(source, "text" if kind == "auto" else kind, fmt)
    rows = _load_rows(source)
    if not rows:
        raise PipelineError(f"{source}: no records (the file is empty)")

    if fmt == "auto":
        first = next((value for _, value in rows if isinstance(value, dict)), None)
        if first is None:  # every row is malformed or not an object: report the first
            bad = rows[0][1]
            raise PipelineError(bad.message if isinstance(bad, BadRecord) else _not_object(rows[0][0], bad))
        if kind == "auto":
            kind = detect_kind(first) or ""
            if not kind:
                raise PipelineError(f"{source}: the first record's fields ({', '.join(map(shown, first)) or 'none'}) "
                                    f"are no known kind of record; name one ({', '.join(KINDS)})")
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
    try:
        result.duplicates = count_duplicates(result.records)
    except RecursionError:  # a kept field nested about as deep as the parser allows
        raise PipelineError(f"{source}: a kept field ({', '.join(keep)}) is nested too deeply to compare "
                            "records") from None
    return result


def count_duplicates(records: list[dict]) -> int:
    """How many records exactly repeat an earlier one."""
    seen = {json.dumps(r, sort_keys=True, ensure_ascii=False, default=repr) for r in records}
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
    # field names quoted from a bad record may hold lone surrogates (JSON "\ud800"), which stdout cannot encode
    return "\n".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")


# ---------------------------------------------------------------------------- loading rows


def _local_file(source: str) -> Path:
    try:
        return Path(source).expanduser()
    except RuntimeError:  # "~nobody/x": no such user's home
        return Path(source)


def path_kind(source: str | PathLike) -> str | None:
    """"file", "dir" or "other" (a FIFO, a device) for an existing path; None when nothing is there, including
    names no file can have (too long, holding a NUL), which Path.exists() would raise on."""
    try:
        mode = os.stat(_local_file(str(source))).st_mode
    except (OSError, ValueError):
        return None
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def looks_like_hub_id(source: str) -> bool:
    name = source.split(":", 1)[0].split("@", 1)[0].lower()
    return bool(_HUB_ID.match(source)) and not name.endswith(_SUFFIXES + (".gz", ".csv"))


def missing_path_hint(source: str) -> str | None:
    """None when `source` is an existing path or a hub dataset id; otherwise the end of a "file not found" message:
    "" or a suggestion from the listing of the deepest folder that exists (" (did you mean `data/x/sft_train.jsonl`?)").

    A hub-id-shaped name whose first part is a local folder (`data/sft_trian` where `data/` exists) is a mistyped
    path, not a hub id: reading it from the hub would only fail later and say something else.
    """
    if path_kind(source) is not None:
        return None
    path = _local_file(source)
    note = ""
    if looks_like_hub_id(source):
        owner = source.split("/", 1)[0]
        if path_kind(owner) != "dir":
            return None
        note = f" (not read as a hub dataset id: {owner}/ is a local folder)"
    return _nearest_existing(path) + note


def _nearest_existing(path: Path) -> str:
    """' (did you mean `p`?)' for the closest name in the deepest existing folder on the way to `path`, or ''."""
    parts = path.parts
    for depth in range(len(parts) - 1, -1, -1):
        parent = Path(*parts[:depth]) if depth else Path(".")
        if path_kind(parent) == "dir":
            break
    else:
        return ""
    try:
        names = sorted(p.name for p in parent.iterdir())
    except (OSError, ValueError):
        return ""
    match = difflib.get_close_matches(parts[depth], names, n=1, cutoff=0.6)
    if not match:
        return ""
    guess = Path(*parts[:depth], match[0], *parts[depth + 1:])
    if path_kind(guess) is None:
        guess = Path(*parts[:depth], match[0])
    return f" (did you mean `{guess}`?)"


def _load_rows(source: str) -> list[Row]:
    path = _local_file(source)
    kind = path_kind(path)
    if kind is None:
        hint = missing_path_hint(source)
        if hint is None:
            return _hub_rows(source)
        raise PipelineError(f"file not found: {shown(source)}{hint}")
    if kind == "dir":
        raise PipelineError(f"{source}: is a directory; give a data file ({', '.join(_SUFFIXES)}) or a hub id")
    if kind == "other":
        raise PipelineError(f"{source}: not a regular file (a pipe or a device); give a data file")
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
    except (OSError, EOFError, ValueError, zlib.error) as e:  # a bad header (OSError), a torn or corrupt stream
        raise PipelineError(f"{source}: cannot read: {_one_line(e)}") from None
    # two common mix-ups, named by their first bytes rather than as an invalid byte at offset 0 or 1
    if data[:2] == b"\x1f\x8b":
        raise PipelineError(f"{source}: gzip-compressed, but its name does not end in .gz; rename it "
                            f"{path.name}.gz (or decompress it)")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise PipelineError(f"{source}: UTF-16 text; convert it to UTF-8: iconv -f UTF-16 -t UTF-8 {path.name} > NEW")
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
        except (RecursionError, ValueError) as e:
            rows.append((loc, BadRecord("bad_json", f"{loc}: unreadable JSON: {_json_limit(e)}")))
    return rows


def _json_limit(e: BaseException) -> str:
    """What a valid-looking JSON text exceeded: the nesting depth or the digits of an integer."""
    if isinstance(e, RecursionError):
        return "nested too deeply (arrays or objects thousands of levels deep)"
    if "digits" in str(e):
        return "an integer with too many digits (over 4300)"
    return _one_line(e)


def _json_rows(text: str, source: str) -> list[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PipelineError(f"{source} line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
    except (RecursionError, ValueError) as e:
        raise PipelineError(f"{source}: unreadable JSON: {_json_limit(e)}") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise PipelineError(
                f"{source}: expected a JSON array of records, or an object with one list field; "
                f"got an object with {len(lists)} list fields (fields: {', '.join(map(shown, data)) or 'none'})"
            )
        if not data[lists[0]]:
            raise PipelineError(f"{source}: no records (its list field {shown(lists[0])} is empty)")
        return [(f'{source} "{lists[0]}" index {i}', value) for i, value in enumerate(data[lists[0]])]
    if not isinstance(data, list):
        raise PipelineError(f"{source}: expected a JSON array of records, got {type_name(data)}")
    if not data:
        raise PipelineError(f"{source}: no records (an empty JSON array)")
    return [(f"{source} index {i}", value) for i, value in enumerate(data)]


def _parquet_rows(path: Path, source: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise PipelineError(f"{source}: cannot read Parquet: {_one_line(e)}") from None
    return [(f"{source} row {i}", row) for i, row in enumerate(rows)]


def _hub_rows(source: str) -> list[Row]:
    name, _, split = source.partition(":")
    name, _, revision = name.partition("@")
    try:
        import datasets  # heavy import: only when a hub id is used

        dataset = datasets.load_dataset(name, split=split or "train", **({"revision": revision} if revision else {}))
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
    kind_of_path = path_kind(path)
    if kind_of_path == "dir":
        raise PipelineError(f"{source}: is a directory; give a data file ({', '.join(_SUFFIXES)}) or a hub id")
    if kind_of_path == "other":
        raise PipelineError(f"{source}: not a regular file (a pipe or a device); give a data file")
    if kind_of_path is None:
        raise PipelineError(f"file not found: {shown(source)}{missing_path_hint(source) or ''}")
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
