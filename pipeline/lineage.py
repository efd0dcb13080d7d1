"""Which weights a stage's output stands on, and whether they are still the ones on disk.

lineage.json (in an adapter stage's folder) names the base model and the chain of adapters to
apply. Paths inside the run folder are stored relative to the stage folder, so a run folder can
be copied, moved or archived and still load; hub ids stay ids; a local folder outside the run is
kept absolute (it is not part of the run).

stage.json records, for every earlier stage, the fingerprint and the run id it was trained on.
A later `--only pretrain` gives pretrain a new run id: sft and dpo then stand on weights that
are gone, and loading them is refused instead of silently mixing generations.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.artifacts import atomic_write_json, content_hashes, read_json
from pipeline.errors import PipelineError


def _portable(path_or_id: str, stage_dir: Path) -> str:
    """A path under the run folder as a path relative to stage_dir; anything else unchanged."""
    path = Path(path_or_id)
    if not path.exists():
        return path_or_id  # a hub id
    run_dir = stage_dir.resolve().parent
    resolved = path.resolve()
    if resolved == run_dir or run_dir in resolved.parents:
        return Path(os.path.relpath(resolved, stage_dir.resolve())).as_posix()
    return str(resolved)


def write_lineage(stage_dir: Path, base: str, adapters: list[Path], base_options: dict | None = None,
                  **extra) -> None:
    atomic_write_json(stage_dir / "lineage.json", {
        "base": _portable(str(base), stage_dir),
        "adapters": [_portable(str(a), stage_dir) for a in adapters],
        **({"base_options": base_options} if base_options else {}),
        **extra,
    })


def read_lineage(stage_dir: Path) -> tuple[str, list[Path], dict]:
    """(base: a folder or a hub id, adapter folders in order, base load options), relative paths resolved."""
    lineage = _record(stage_dir / "lineage.json")
    if not isinstance(lineage, dict) or "base" not in lineage or not isinstance(lineage.get("adapters"), list):
        raise PipelineError(f"{stage_dir / 'lineage.json'}: not a lineage file (needs `base` and `adapters`)")

    def resolve(entry: str) -> str:
        # what write_lineage stores: "." / "../x" (inside the run), absolute (outside it), or a hub id
        if entry.startswith("."):
            entry = str((stage_dir / entry).resolve())
        if Path(entry).is_absolute() and not Path(entry).is_dir():
            raise PipelineError(f"{stage_dir / 'lineage.json'}: {entry} is missing (moved or deleted?)")
        return entry

    options = lineage.get("base_options") or {}
    return resolve(lineage["base"]), [Path(resolve(a)) for a in lineage["adapters"]], options


def folder_record(folder: str | Path) -> dict:
    """What a local base folder holds when the base stage reads it: {"folder": its absolute path, "files": {name:
    {"size", "mtime_ns", "sha256"}}}, kept in the lineage's base options so that every later load can tell whether
    the folder still holds those weights (the run's fingerprint sees a change only when `pipeline run` runs)."""
    folder = Path(folder).expanduser().resolve()
    files = {}
    for name, digest in content_hashes([str(folder)]).items():
        stat = Path(name).stat()
        files[Path(name).relative_to(folder).as_posix()] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                                            "sha256": digest}
    return {"folder": str(folder), "files": files}


def folder_change(base: str, record: dict | None) -> str | None:
    """How the local base folder `base` differs from what the base stage recorded (folder_record), or None.

    A file of the recorded size and modification time is taken as unchanged (as make and rsync do); any other is
    hashed, so a folder copied back with new times still loads. Records of other folders (an lm_head stage's full
    model carries its SFT base's options) and runs from before the record existed are not checked."""
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict) or not Path(base).is_dir():
        return None
    folder = Path(base).resolve()
    if str(folder) != record.get("folder"):
        return None
    for name, recorded in sorted(record["files"].items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is gone"
        stat = path.stat()
        if stat.st_size == recorded.get("size") and stat.st_mtime_ns == recorded.get("mtime_ns"):
            continue
        if stat.st_size != recorded.get("size") or content_hashes([str(path)])[str(path)] != recorded.get("sha256"):
            return f"{name} has other contents"
    # a new weights or config file changes what from_pretrained loads; a new README does not
    added = sorted(name for name in (p.relative_to(folder).as_posix() for p in folder.rglob("*")
                                     if p.is_file() and p.suffix in (".safetensors", ".json"))
                   if name not in record["files"])
    return f"{added[0]} was added" if added else None


def lineage_head(stage_dir: Path) -> str:
    """What the chain ends in: "causal-lm" (every model stage), or "sequence-classification" (a reward model)."""
    path = stage_dir / "lineage.json"
    lineage = _record(path) if path.is_file() else None
    return lineage.get("head", "causal-lm") if isinstance(lineage, dict) else "causal-lm"


def stale_upstream(stage_dir: Path) -> str | None:
    """Why the stage's output no longer matches the earlier stages on disk, or None when it does.

    Compares the fingerprint and run id each upstream stage had when this stage trained with what
    that stage's folder holds now. A folder without stage.json (an exported model) is not checked.
    """
    record = _record(stage_dir / "stage.json")
    if not isinstance(record, dict):
        return None
    run_dir = stage_dir.parent
    trained_on = record.get("upstream_runs") or {}
    for name, fingerprint in (record.get("upstream") or {}).items():
        now = _record(run_dir / name / "stage.json")
        if not isinstance(now, dict) or now.get("status") != "done":
            return f"it was trained on stage {name}, which is no longer complete in {run_dir / name}"
        if now.get("fingerprint") != fingerprint or (trained_on.get(name) and now.get("run_id") != trained_on[name]):
            return (f"it was trained on another run of stage {name} (fingerprint {fingerprint}, now "
                    f"{now.get('fingerprint')}); {name} was rerun since")
    return None


def _record(path: Path):
    try:
        return read_json(path)
    except (ValueError, UnicodeDecodeError):
        raise PipelineError(f"{path}: corrupt (not JSON); rerun that stage: pipeline run RECIPE --from "
                            f"{path.parent.name}") from None


def require_current(stage_dir: Path) -> None:
    """Refuse to load a stage that did not finish (its folder holds no model, or half of one), or whose upstream
    stages were rerun after it trained."""
    record = _record(stage_dir / "stage.json")
    if isinstance(record, dict) and record.get("status") != "done":
        raise PipelineError(f"{stage_dir}: stage {record.get('stage', stage_dir.name)} did not finish (status "
                            f"{record.get('status')}); finish it first: pipeline run RECIPE")
    reason = stale_upstream(stage_dir)
    if reason:
        stage = stage_dir.name
        raise PipelineError(f"{stage_dir} is stale: {reason}. Rerun it on the current weights: "
                            f"pipeline run RECIPE --from {stage}")
