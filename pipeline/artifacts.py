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


def default_file_mode() -> int:
    """The mode a plainly created file gets here (0o666 less the umask). Temporary files (ours, and
    safetensors' own writes since 0.8) are created 0o600, which would hide a run folder from the
    rest of a team on a shared machine."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())
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
        handle.flush()


def read_jsonl_tolerant(path: Path) -> list[dict]:
    """The records of a log we append to, skipping a torn last line (a crash mid-write) and any
    line that is not a JSON object; a log is evidence, not input, so it never stops a resume."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` (and the folders themselves) to disk, and give files written
    private (0o600, see default_file_mode) the mode a plainly created file would have."""
    mode = default_file_mode()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue  # removed meanwhile (a rotated checkpoint)
            try:
                _share(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _share(fd: int, mode: int) -> None:
    """A file created private (0o600) gets `mode`; any other mode was chosen by someone and stays."""
    if os.fstat(fd).st_mode & 0o777 == 0o600 and mode != 0o600:
        try:
            os.fchmod(fd, mode)
        except PermissionError:
            pass  # someone else's file: left as it is


def share_files(folder: Path) -> None:
    """Give the files under `folder` that were created private the mode a plainly created file gets."""
    mode = default_file_mode()
    for path in folder.rglob("*"):
        if path.is_file():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                _share(fd, mode)
            finally:
                os.close(fd)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_HASHES: dict[tuple, str] = {}


def content_hashes(paths: list[str]) -> dict[str, str]:
    """sha256 of every file a stage reads, by path; a folder (a local base model) by each file in it.

    Hashes are remembered per (path, size, mtime) within the process: a multi-GB base model is read
    once per command, not once for every stage that names it. Paths that do not exist (hub ids)
    are left out; the hub id itself is in the stage's config.
    """
    out = {}
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        for file in files:
            stat = file.stat()
            key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
            if key not in _HASHES:
                _HASHES[key] = file_sha256(file)
            out[str(file)] = _HASHES[key]
    return out


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place; an older folder of that name is removed first."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


CHECKSUMS = "checksums.json"


def write_checksums(folder: Path) -> None:
    """sha256 of every file in a checkpoint folder, written last: a later load can tell a
    complete, intact checkpoint from a torn or overwritten one."""
    share_files(folder)  # a checkpoint of a stage that never finishes is read by the team too
    sums = {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS and not p.name.startswith(".")}
    atomic_write_json(folder / CHECKSUMS, sums)


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted, or None when every file matches its checksum."""
    try:
        sums = read_json(folder / CHECKSUMS)
    except ValueError:
        return f"{CHECKSUMS} is corrupt"
    if not isinstance(sums, dict) or not sums:
        return f"no {CHECKSUMS} (the save did not finish)"
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != expected:
            return f"{name} does not match its checksum (corrupt or overwritten)"
    return None


def set_aside(folder: Path, problem: str, log=print) -> None:
    """Move a bad checkpoint out of the way (kept for inspection, never resumed from)."""
    target = folder.with_name(f"corrupt-{folder.name}")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(folder, target)
    log(f"checkpoint {folder} skipped: {problem}; moved to {target.name}")


def last_good_checkpoint(folder: Path, pattern: str, log=print) -> Path | None:
    """Newest checkpoint under `folder` (names `pattern`, ending in a step number) whose files all
    match their checksums. Torn or corrupt ones are set aside with a message and the previous
    one is used."""
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.glob(pattern) if p.is_dir() and p.name.split("-")[-1].isdigit()),
                        key=lambda p: int(p.name.split("-")[-1]))
    for candidate in reversed(candidates):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        set_aside(candidate, problem, log)
    return None


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the curve has no repeats."""
    if not path.is_file():
        return
    kept = [record for record in read_jsonl_tolerant(path) if record.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
