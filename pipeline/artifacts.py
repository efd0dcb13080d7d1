"""Files that must never be half-written: write to a temporary name, then rename.

A rename within one folder is atomic on POSIX, so a crash leaves either the old file
or the new one, never a torn mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any | None:
    """The JSON in `path`, or None when it is absent (a half-written file cannot exist, see above)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def append_jsonl(path: str | Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place; an older folder of that name is removed first."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def last_complete_trainer_checkpoint(folder: Path) -> str | None:
    """Newest `checkpoint-N` a transformers Trainer finished writing, or None.

    The Trainer writes checkpoints in place and trainer_state.json last, so a folder without it
    was cut off by a crash: it is removed and the previous checkpoint is used.
    """
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                        key=lambda p: int(p.name.split("-")[-1]))
    for candidate in reversed(candidates):
        if (candidate / "trainer_state.json").is_file():
            return str(candidate)
        shutil.rmtree(candidate, ignore_errors=True)
    return None


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the curve has no repeats."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))
