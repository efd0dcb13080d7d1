"""Run a recipe's stages in order, skipping those already done with the same config and inputs.

Each stage writes into <run>/<stage>/ and finishes by writing stage.json atomically. Its
fingerprint hashes the stage's config, the seed, the hashes of its data files and the
fingerprints of every earlier stage, so changing one stage reruns it and everything after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import platform
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import __version__
from pipeline.artifacts import atomic_write_json, atomic_write_text, content_hashes, fsync_tree, read_json
from pipeline.cpu_allocator import keep_freed_memory
from pipeline.errors import Interrupted, PipelineError, StageFailed, is_out_of_memory
from pipeline.recipe import TEMPLATES_DIR, Recipe, check_data_files, read_data_files, stage_help
from pipeline.run_lock import run_folder_lock

STAGE_MODULES = {
    "tokenizer": "pipeline.stages.tokenizer",
    "pretrain": "pipeline.stages.pretrain",
    "base": "pipeline.stages.base",
    "sft": "pipeline.stages.sft",
    "dpo": "pipeline.stages.dpo",
    "reward": "pipeline.stages.reward",
    "rl": "pipeline.stages.rl",
    "eval": "pipeline.stages.eval",
}


@dataclass
class StageContext:
    """What a stage gets besides its config: where to write, the process group, earlier results."""

    recipe: Recipe
    stage: str
    run_dir: Path
    out_dir: Path
    accelerator: Any
    upstream: dict[str, dict] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, message: str) -> None:
        if self.is_main:
            print(f"[{self.stage}] {message}", flush=True)

    def output_of(self, stage: str) -> Path:
        """The folder of an earlier stage, which must have finished with the current config."""
        if stage not in self.upstream:
            raise PipelineError(
                f"stage {self.stage} needs the output of stage {stage}, but {self.run_dir / stage} is not complete "
                f"or was made with another config; run it first (pipeline run <recipe> --only {stage})"
            )
        return self.run_dir / stage


def library_versions() -> dict[str, str]:
    versions = {"pipeline": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "accelerate", "peft", "trl", "datasets"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    return versions


def enable_cpu_data_parallel() -> None:
    """Several launched processes and no GPU: tell accelerate to join them over gloo on the CPU.

    The multi-GPU launcher starts N processes on a CPU-only machine, but unless ACCELERATE_USE_CPU
    is set each one silently believes it is alone (rank 0 of 1) and trains on its own.
    """
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def use_cpu_cores(accelerator) -> int | None:
    """On the CPU, share the machine's cores among the local processes.

    `accelerate launch` sets OMP_NUM_THREADS=1 for every CPU process, which leaves a single
    process on one core (measured: 2.5x slower on 2 cores). PIPELINE_CPU_THREADS overrides.
    """
    if accelerator.device.type != "cpu":
        return None
    import os

    import torch

    local = max(1, accelerator.state.num_processes)  # one machine on the CPU
    threads = int(os.environ.get("PIPELINE_CPU_THREADS", 0)) or max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)
    return threads


def input_hashes(recipe: Recipe, stage: str, portable: bool = True) -> dict[str, str]:
    """content_hashes of the stage's inputs, a built-in chat template named by its place in the package
    ("<pipeline>/templates/chatml.jinja"), not by where the package is installed: keyed by the installed path,
    a new clone or virtual environment made every tokenizer and base stage, and all after them, rerun.
    `portable=False`: keyed by the installed path, as runs recorded before 2026-12-01 (see _visit_stages)."""
    hashes = content_hashes(recipe.input_paths(stage))
    if not portable:
        return hashes
    installed = str(TEMPLATES_DIR) + os.sep
    return {f"<pipeline>/templates/{key[len(installed):]}" if key.startswith(installed) else key: value
            for key, value in hashes.items()}


def stage_fingerprint(recipe: Recipe, stage: str, upstream_fingerprints: list[str], config: dict | None = None,
                      base: dict | None = None, portable: bool = True) -> str:
    """Hash of everything that decides a stage's output (`config` and `base`: the stage's section and the base
    section as dicts, default the recipe's; `portable`: see input_hashes)."""
    if config is None:
        section = getattr(recipe, stage)
        config = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section
    if base is None and recipe.base:
        base = dataclasses.asdict(recipe.base)
    payload = {
        "stage": stage,
        "config": config,
        "seed": recipe.seed,
        "base": base,
        "data": input_hashes(recipe, stage, portable),
        "upstream": upstream_fingerprints,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_before_new_options(recipe: Recipe, stage: str, upstream_fingerprints: list[str],
                                   previous: dict, recorded_base: dict | None = None) -> str | None:
    """The fingerprint the finished stage in `previous` (its stage.json) was recorded with, when the only
    difference is options added to the pipeline since it ran, each at its default; else None.

    A new option's default keeps the old behaviour (the rule for adding one), so a stage that ran before the
    option existed ran with that default: upgrading the pipeline must not rerun (and lose) finished stages.
    """
    section, recorded = getattr(recipe, stage), previous.get("config")
    if previous.get("status") != "done" or not dataclasses.is_dataclass(section) or not isinstance(recorded, dict):
        return None
    pruned = _only_recorded_keys(section, recorded)
    # every stage's fingerprint holds the base section too: prune it by what the base stage recorded
    recorded_base = recorded if stage == "base" else recorded_base
    base = _only_recorded_keys(recipe.base, recorded_base) if recipe.base and isinstance(recorded_base, dict) else None
    if pruned is None or (recipe.base and recorded_base is not None and base is None):
        return None
    for portable in (True, False):  # and recorded with the template's installed path (input_hashes)
        fingerprint = stage_fingerprint(recipe, stage, upstream_fingerprints, pruned, base, portable)
        if fingerprint == previous.get("fingerprint"):
            return fingerprint
    return None


def _only_recorded_keys(section, recorded: dict) -> dict | None:
    """`section` as a dict with only the keys `recorded` has; None when a key it lacks is not at its default."""
    out = {}
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if item.name not in recorded:
            default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
            if value != default:
                return None
            continue
        if dataclasses.is_dataclass(value) and isinstance(recorded[item.name], dict):
            value = _only_recorded_keys(value, recorded[item.name])
            if value is None:
                return None
        else:
            value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        out[item.name] = value
    return out


def _select(recipe: Recipe, only: str | None, from_stage: str | None) -> tuple[list[str], set[str]]:
    """Stages to visit and those to rerun regardless of their fingerprint."""
    stages = recipe.stages
    for name in filter(None, (only, from_stage)):
        if name not in stages:
            raise PipelineError(
                f"stage `{name}` is not in this recipe (its stages: {', '.join(stages)}){stage_help(name)}"
            )
    if only:
        return stages[: stages.index(only) + 1], {only}
    if from_stage:
        return stages, set(stages[stages.index(from_stage):])
    return stages, set()


def claim_run_folder(recipe: Recipe, force: bool) -> None:
    """A run folder belongs to the recipe file that made it: refuse another one (unless --force).

    Two recipe files with the same `name` would otherwise take turns wiping each other's stages.
    A folder whose recipe file was moved (the old path is gone, the file name is the same) is
    taken over quietly; one made before run.json existed is adopted.
    """
    source = getattr(recipe, "source", None)
    if source is None:
        return
    source = str(Path(source).resolve())
    try:
        owner = read_json(recipe.run_dir / "run.json")
    except (ValueError, UnicodeDecodeError):
        owner = None  # corrupt: rewritten below
    previous = owner.get("recipe_file") if isinstance(owner, dict) else None
    moved = previous and not Path(previous).exists() and Path(previous).name == Path(source).name
    if previous and previous != source and not moved and not force:
        raise PipelineError(
            f"{recipe.run_dir} belongs to another recipe ({previous}); this one is {source}. Give this recipe its "
            f"own folder (name=... or output_dir=...), or pass --force to let it take the folder over"
        )


def writable_run_folder(run_dir: Path) -> None:
    """The run folder exists (made here, by every process at once: exist_ok) and this user may write in it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"cannot make the run folder {run_dir}: {exc.strerror}; choose another "
                            "output_dir") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise PipelineError(f"cannot write in the run folder {run_dir}: permission denied; choose another output_dir")


def run_recipe(recipe: Recipe, only: str | None = None, from_stage: str | None = None,
               force: bool = False) -> dict[str, dict]:
    """Run (or skip) every stage; return each visited stage's stage.json record.

    Everything that can be checked is checked before anything is written in the run folder: data files (each
    read as its stage will read it), stage names, that the folder can be made and written, its owner.
    """
    from accelerate import Accelerator  # heavy import kept out of `check` and `--help`

    source = getattr(recipe, "source", None) or "recipe"
    check_data_files(recipe, source)
    stages, forced = _select(recipe, only, from_stage)
    read_data_files(recipe, stages, source)  # a bad record in a later stage's data stops the run now, not hours in
    writable_run_folder(recipe.run_dir)
    claim_run_folder(recipe, force)
    enable_cpu_data_parallel()
    accelerator = Accelerator()
    # before the first write: a second command on this folder is refused
    with run_folder_lock(recipe.run_dir, accelerator, " or stop it, or give this run its own folder (output_dir=...)"):
        return _visit_stages(recipe, accelerator, stages, forced, only)


def _visit_stages(recipe: Recipe, accelerator, stages: list[str], forced: set[str], only: str | None
                  ) -> dict[str, dict]:
    """run_recipe's loop, once the folder is this command's: each stage skipped when current, else run."""
    recipe.batch_splits(accelerator.num_processes)
    threads = use_cpu_cores(accelerator)
    kept_heap = accelerator.device.type == "cpu" and keep_freed_memory()  # no page faults on big tensors
    run_dir = recipe.run_dir
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if getattr(recipe, "source", None):
            atomic_write_json(run_dir / "run.json", {"recipe_file": str(Path(recipe.source).resolve()),
                                                     "name": recipe.name})
        atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))
        print(f"run folder: {run_dir}  (processes: {accelerator.num_processes}, device: {accelerator.device}"
              f"{f', {threads} CPU threads each' if threads else ''}{', freed memory kept' if kept_heap else ''})",
              flush=True)
    accelerator.wait_for_everyone()

    fingerprints: list[str] = []
    records: dict[str, dict] = {}
    for stage in stages:
        fingerprint = stage_fingerprint(recipe, stage, fingerprints)
        out_dir = run_dir / stage
        record = previous = read_stage_record(out_dir)
        if record.get("fingerprint") not in (None, fingerprint) and (
                fingerprint_before_new_options(recipe, stage, fingerprints, record,
                                               records.get("base", {}).get("config"))
                or record["fingerprint"] == stage_fingerprint(recipe, stage, fingerprints, portable=False)):
            # the same config but for options added since, or recorded with the template's installed path: the
            # record stands for this config (a rerun records the new fingerprint; later stages compare against
            # whichever fingerprint the record keeps)
            previous = {**record, "fingerprint": fingerprint}
        visiting = only is None or stage == only
        upstream_runs = {name: rec.get("run_id") for name, rec in records.items()}
        current = (previous.get("status") == "done" and previous.get("fingerprint") == fingerprint
                   and (previous.get("upstream_runs") or upstream_runs) == upstream_runs)
        if current and stage not in forced:
            if accelerator.is_main_process and visiting:
                print(f"[{stage}] done already with the same config and inputs (fingerprint {fingerprint}): skipping",
                      flush=True)
            fingerprints.append(record["fingerprint"])
            records[stage] = record
            continue
        fingerprints.append(fingerprint)
        if not visiting:
            continue  # --only: an earlier stage that is not done; refused below, before this folder is touched
        not_done = [name for name in stages[: stages.index(stage)] if name not in records]
        if not_done:  # checked before _run_stage clears the folder: a refused rerun must not lose the last output
            raise PipelineError(
                f"stage {stage} needs the earlier stages done with the current config, but {', '.join(not_done)} "
                f"{'is' if len(not_done) == 1 else 'are'} not (in {run_dir}); run them first: pipeline run "
                f"{getattr(recipe, 'source', None) or '<recipe>'} --only {not_done[0]}")
        resumable = (previous.get("status") in ("running", "failed", "interrupted")
                     and previous.get("fingerprint") == fingerprint
                     and previous.get("upstream_runs", upstream_runs) == upstream_runs)
        records[stage] = _run_stage(recipe, stage, fingerprint, previous, out_dir, accelerator, records,
                                    resume=resumable)
    return records


def read_stage_record(out_dir: Path) -> dict:
    """stage.json as a dict; {} when absent. A corrupt one is reported and treated as absent (the
    stage then starts afresh), since nothing in it can be trusted."""
    path = out_dir / "stage.json"
    try:
        record = read_json(path)
    except (ValueError, UnicodeDecodeError):
        print(f"[{out_dir.name}] {path} is unreadable (corrupt JSON): the stage will start afresh", flush=True)
        return {}
    return record if isinstance(record, dict) else {}


def _note_precision_change(recipe: Recipe, stage: str, before: str | None, now: str) -> None:
    """Say so when a stage resumes on a machine where `auto` means another precision (a run folder moved from a CPU
    with fast bf16 to one without): `auto` is in the fingerprint as written, so the checkpoints are resumed, and the
    rest of the stage trains in the other precision."""
    autos = [f"{stage}.precision"] if getattr(getattr(recipe, stage), "precision", None) == "auto" else []
    if recipe.base and recipe.base.dtype == "auto" and stage not in ("base", "eval"):
        autos.append("base.dtype")
    if autos and before and before != now:
        print(f"[{stage}] note: its checkpoints were written where `auto` meant {before}; on this machine it means "
              f"{now}, so the rest of the stage trains in {now} (set {' and '.join(autos)} to keep one precision)",
              flush=True)


def _raise_on_sigterm(signum, frame):
    raise Interrupted(f"stopped by signal {signal.Signals(signum).name}")


def _run_stage(recipe, stage, fingerprint, previous, out_dir, accelerator, upstream, resume=False) -> dict:
    if accelerator.is_main_process:
        if out_dir.exists() and not resume:
            # Checkpoints of another config, of other upstream weights, or of a forced rerun must
            # never be resumed into this run: the stage starts afresh.
            upstream_runs = {name: rec.get("run_id") for name, rec in upstream.items()}
            why = ("no usable record of the last run" if not previous
                   else "config or inputs changed since the last run" if previous.get("fingerprint") != fingerprint
                   else "an earlier stage was rerun since" if previous.get("upstream_runs", upstream_runs) != upstream_runs
                   else "rerun requested")
            print(f"[{stage}] {why}: starting this stage afresh", flush=True)
            # stage.json goes first, in one step: a removal cut short (Ctrl-C, a kill) must not leave a record
            # that says "done" beside half the files it describes
            (out_dir / "stage.json").unlink(missing_ok=True)
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    config = getattr(recipe, stage)
    record = {
        "stage": stage,
        "status": "running",
        "fingerprint": fingerprint,
        "run_id": uuid.uuid4().hex,
        "config": dataclasses.asdict(config),
        "seed": recipe.seed,
        "data": input_hashes(recipe, stage),
        "upstream": {name: rec.get("fingerprint") for name, rec in upstream.items()},
        "upstream_runs": {name: rec.get("run_id") for name, rec in upstream.items()},
        "world_size": accelerator.num_processes,
        "versions": library_versions(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # every process must agree on the run id (it names the weights later stages stand on)
    record["run_id"] = broadcast_text(record["run_id"], accelerator)
    from pipeline.models import auto_precision

    record["auto_precision"] = auto_precision(accelerator.device)
    # a resumed stage's time so far: the attempts it resumes count as much as this one. Kept in the running record
    # too, so an attempt killed outright (no time of its own recorded) does not lose the ones before it
    earlier = (previous.get("wall_time_total_s") or previous.get("wall_time_s") or 0) if resume else 0
    if earlier:
        record["wall_time_total_s"] = earlier
    if accelerator.is_main_process:
        if resume and any((out_dir / "checkpoints").glob("*")):
            _note_precision_change(recipe, stage, previous.get("auto_precision"), record["auto_precision"])
        atomic_write_json(out_dir / "stage.json", record)

    context = StageContext(recipe, stage, recipe.run_dir, out_dir, accelerator, dict(upstream))
    module = importlib.import_module(STAGE_MODULES[stage])
    context.log(f"starting (fingerprint {fingerprint}) -> {out_dir}")
    import torch
    from transformers import set_seed

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # Every stage starts from the recipe's seed. Without this, what a stage drew before its trainer seeded
    # (a fresh LoRA's A matrices, a reward head) came from a random torch seed: two runs of one recipe gave
    # other adapters (quickstart sft 0.936-0.984 held-out accuracy on one CPU).
    set_seed(recipe.seed)
    start = time.perf_counter()
    previous_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        metrics = module.run(config, context)
    except BaseException as exc:
        _close_progress_bars()
        status, reason = _failure(exc)
        record.update(status=status, error=reason, **_wall_times(start, earlier))
        if accelerator.is_main_process:
            atomic_write_json(out_dir / "stage.json", record)
        if is_out_of_memory(exc):
            raise StageFailed(f"{stage}: {reason}") from None
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    record.update(
        status="done",
        metrics=metrics,
        **_wall_times(start, earlier),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **peak_memory_mb(),
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_tree(out_dir)  # what `done` vouches for is on disk before `done` is
        atomic_write_json(out_dir / "stage.json", record)
    context.log(f"done in {record['wall_time_s']:.1f}s")
    return record


def _wall_times(start: float, earlier: float) -> dict:
    """This attempt's seconds, and with earlier attempts of the same stage (a resumed one) their sum too."""
    this = round(time.perf_counter() - start, 2)
    return {"wall_time_s": this, **({"wall_time_total_s": round(earlier + this, 2)} if earlier else {})}


def peak_memory_mb() -> dict:
    """This process's peak memory: the CUDA allocator's since the stage began, and the RSS high-water
    mark (a process-wide maximum: it covers earlier stages of the same command too)."""
    import resource

    import torch

    peaks = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB on Linux
    if torch.cuda.is_available():
        peaks["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peaks


def _close_progress_bars() -> None:
    """Finish any progress bar a failing stage left open, so the error starts on its own line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _failure(exc: BaseException) -> tuple[str, str]:
    """(status, one-line reason) for stage.json."""
    if isinstance(exc, (KeyboardInterrupt, Interrupted)):
        return "interrupted", str(exc) or "interrupted (Ctrl-C)"
    if is_out_of_memory(exc):
        return "failed", (f"out of memory ({type(exc).__name__}); lower the micro_batch_size or max_length, or "
                          f"use a smaller model")
    return "failed", f"{type(exc).__name__}: {exc}" if not isinstance(exc, PipelineError) else str(exc)


def broadcast_text(text: str, accelerator) -> str:
    """The main process's value on every process."""
    if accelerator.num_processes == 1:
        return text
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([text])[0]
