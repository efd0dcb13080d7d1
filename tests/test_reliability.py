"""Nothing lost, nothing stale: run folders, resumes, checkpoints and failing training."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.artifacts import atomic_write_json, read_json
from pipeline.errors import PipelineError, StageFailed
from pipeline.recipe import load_recipe
from pipeline.run import run_recipe
from tests.conftest import sft_section

# ---------------------------------------------------------------- a run folder belongs to one recipe


def test_another_recipe_with_the_same_name_is_refused_and_nothing_is_touched(write_recipe, tmp_path):
    first = write_recipe("tiny", {"pretrain.max_steps": 4, "pretrain.checkpoint_every": 100})
    run_recipe(load_recipe(first))
    run_dir = load_recipe(first).run_dir
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    other = tmp_path / "other.yaml"
    data = json.loads(json.dumps(__import__("yaml").safe_load(first.read_text())))
    data["pretrain"]["max_steps"] = 5
    other.write_text(json.dumps(data))
    with pytest.raises(PipelineError, match=r"belongs to another recipe .*tiny.yaml.*--force"):
        run_recipe(load_recipe(other))
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before

    # a misspelt --only is refused before anything is written, too
    with pytest.raises(PipelineError, match="did you mean `pretrain`"):
        run_recipe(load_recipe(first), only="prtrain")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before

    records = run_recipe(load_recipe(other), force=True)  # taken over on request
    assert records["pretrain"]["metrics"]["steps"] == 5
    assert read_json(run_dir / "run.json")["recipe_file"] == str(other.resolve())


def test_a_folder_in_use_by_another_command_is_refused_and_a_killed_holder_leaves_it_free(write_recipe, cli_env,
                                                                                           tmp_path):
    path = write_recipe("busy", {"pretrain.max_steps": 3, "pretrain.checkpoint_every": 100})
    run_dir = load_recipe(path).run_dir
    run_recipe(load_recipe(path))
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"}
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from pipeline.run_lock import try_lock; fd, taken = try_lock(Path(sys.argv[1])); "
                               "print('held' if fd else taken, flush=True); time.sleep(120)", str(run_dir)],
                              env=cli_env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        in_use = rf"{re.escape(str(run_dir))} is in use by another pipeline command \(pid {holder.pid} on .* since .*\)"
        for command, advice in ((["run", str(path), "--from", "pretrain"], "; wait for it to finish or stop it, or "
                                 r"give this run its own folder \(output_dir=...\)\n"),
                                (["eval", str(run_dir)], "; wait for it to finish\n"),
                                (["export", str(run_dir / "pretrain"), str(tmp_path / "out")], "; wait for it")):
            refused = subprocess.run([sys.executable, "-m", "pipeline", *command], env=cli_env,
                                     capture_output=True, text=True, timeout=120)
            assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
            assert re.search(f"^error: {in_use}{advice}", refused.stderr), (command, refused.stderr)
        assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"} == before
        assert not (tmp_path / "out").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait(timeout=30)
    assert run_recipe(load_recipe(path), from_stage="pretrain")["pretrain"]["status"] == "done"


# ---------------------------------------------------------------- stale stages are refused


@pytest.fixture
def sft_run(write_recipe, tiny_world):
    path = write_recipe("chain", {"pretrain.checkpoint_every": 100, "sft": sft_section(tiny_world, max_steps=2)})
    records = run_recipe(load_recipe(path))
    return path, load_recipe(path).run_dir, records


def test_rerunning_an_earlier_stage_makes_later_ones_stale_until_rerun(sft_run):
    from pipeline.models import load_stage_model

    path, run_dir, _ = sft_run
    load_stage_model(run_dir / "sft")  # current: loads
    run_recipe(load_recipe(path, ["pretrain.max_steps=6"]), only="pretrain")
    with pytest.raises(PipelineError, match=r"sft is stale: it was trained on another run of stage pretrain.*--from sft"):
        load_stage_model(run_dir / "sft")

    # the same config rerun by force (--only) gives pretrain a new run id: sft is stale again
    records = run_recipe(load_recipe(path, ["pretrain.max_steps=6"]))
    assert records["sft"]["upstream_runs"]["pretrain"] == records["pretrain"]["run_id"]
    load_stage_model(run_dir / "sft")
    run_recipe(load_recipe(path, ["pretrain.max_steps=6"]), only="pretrain")
    with pytest.raises(PipelineError, match="stale"):
        load_stage_model(run_dir / "sft")


def test_a_stage_that_did_not_finish_is_refused_by_name(tmp_path):
    """A stage that failed leaves stage.json and no model: chat, score, serve, eval and export say it did not finish
    (before, "neither a model folder nor an adapter stage")."""
    from pipeline.models import load_stage_model
    from pipeline.rewards import load_reward_model

    for status in ("failed", "running", "interrupted"):
        stage = tmp_path / status / "dpo"
        stage.mkdir(parents=True)
        (stage / "stage.json").write_text(json.dumps({"stage": "dpo", "status": status}))
        for load in (load_stage_model, load_reward_model):
            with pytest.raises(PipelineError, match=rf"dpo: stage dpo did not finish \(status {status}\); finish it "
                                                    r"first: pipeline run RECIPE$"):
                load(stage)


def test_only_a_stage_whose_earlier_stage_is_stale_is_refused_before_its_folder_is_touched(sft_run):
    path, run_dir, _ = sft_run
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "sft").rglob("*") if p.is_file()}
    run_recipe(load_recipe(path, ["pretrain.max_steps=6"]), only="pretrain")
    with pytest.raises(PipelineError, match=r"stage sft needs the earlier stages done .* but pretrain is not .*--only pretrain"):
        run_recipe(load_recipe(path), only="sft")  # pretrain now differs from the recipe
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "sft").rglob("*") if p.is_file()} == before
    assert read_json(run_dir / "sft" / "stage.json")["status"] == "done"


def test_an_option_added_since_a_stage_ran_does_not_rerun_it_at_its_default(sft_run):
    """A stage that finished before an option existed (its stage.json lacks the key) is current while the option
    sits at its default; set to anything else, the stage reruns."""
    from pipeline.artifacts import atomic_write_json
    from pipeline.run import stage_fingerprint

    path, run_dir, first = sft_run
    recipe = load_recipe(path)
    record = read_json(run_dir / "sft" / "stage.json")
    del record["config"]["padding_free"], record["config"]["lora"]["dropout"]  # as written before these existed
    upstream = [first[name]["fingerprint"] for name in ("tokenizer", "pretrain")]
    record["fingerprint"] = stage_fingerprint(recipe, "sft", upstream, record["config"])
    atomic_write_json(run_dir / "sft" / "stage.json", record)

    again = run_recipe(recipe)
    assert again["sft"]["run_id"] == first["sft"]["run_id"]  # skipped, not retrained
    forced = run_recipe(load_recipe(path), only="sft")  # a rerun records today's fingerprint: later runs skip it
    assert forced["sft"]["run_id"] != first["sft"]["run_id"]
    assert run_recipe(load_recipe(path))["sft"]["run_id"] == forced["sft"]["run_id"]
    changed = run_recipe(load_recipe(path, ["sft.padding_free=true"]))
    assert changed["sft"]["run_id"] != first["sft"]["run_id"]


def test_where_the_package_is_installed_does_not_rerun_a_stage(sft_run, tmp_path, monkeypatch):
    """The built-in chat template was hashed under its installed path: a new clone or venv reran the whole chain.
    A stage recorded that way (before 2026-12-01) stays current where the package has not moved."""
    import shutil

    import pipeline.recipe
    import pipeline.run
    from pipeline.artifacts import atomic_write_json
    from pipeline.run import stage_fingerprint

    path, run_dir, first = sft_run
    recipe = load_recipe(path)
    assert "<pipeline>/templates/chatml.jinja" in read_json(run_dir / "tokenizer" / "stage.json")["data"]
    moved = tmp_path / "elsewhere" / "templates"
    shutil.copytree(pipeline.recipe.TEMPLATES_DIR, moved)
    with monkeypatch.context() as patch:  # the package installed elsewhere: same template, another path
        patch.setattr(pipeline.recipe, "TEMPLATES_DIR", moved)
        patch.setattr(pipeline.run, "TEMPLATES_DIR", moved)
        assert stage_fingerprint(recipe, "tokenizer", []) == first["tokenizer"]["fingerprint"]
        assert stage_fingerprint(recipe, "tokenizer", [], portable=False) != first["tokenizer"]["fingerprint"]

    fingerprints = []  # the chain as recorded before: the template under its installed path
    for stage in ("tokenizer", "pretrain", "sft"):
        record = read_json(run_dir / stage / "stage.json")
        record["fingerprint"] = stage_fingerprint(recipe, stage, fingerprints, portable=False)
        atomic_write_json(run_dir / stage / "stage.json", record)
        fingerprints.append(record["fingerprint"])
    again = run_recipe(recipe)
    assert {name: again[name]["run_id"] for name in again} == {name: first[name]["run_id"] for name in first}


def test_an_option_added_to_the_base_section_does_not_rerun_the_chain(tiny_world, gemma_folder, tmp_path):
    """Every stage's fingerprint holds the base section: a base option added since the chain ran (absent from the
    base stage's record), at its default, leaves base and sft current."""
    from pipeline.artifacts import atomic_write_json
    from pipeline.run import stage_fingerprint

    path = tmp_path / "based.yaml"
    path.write_text(json.dumps({"name": "based", "output_dir": str(tmp_path / "runs"),
                                "base": {"path": str(gemma_folder), "dtype": "float32"},
                                "sft": sft_section(tiny_world, max_steps=1, eval_limit=0)}))
    recipe = load_recipe(path)
    first = run_recipe(recipe)
    base_record = read_json(recipe.run_dir / "base" / "stage.json")
    del base_record["config"]["revision"]  # as written before `revision` existed
    old_base = {k: v for k, v in base_record["config"].items()}
    base_record["fingerprint"] = stage_fingerprint(recipe, "base", [], base_record["config"], old_base)
    atomic_write_json(recipe.run_dir / "base" / "stage.json", base_record)
    sft_record = read_json(recipe.run_dir / "sft" / "stage.json")
    sft_record["fingerprint"] = stage_fingerprint(recipe, "sft", [base_record["fingerprint"]], sft_record["config"],
                                                  old_base)
    atomic_write_json(recipe.run_dir / "sft" / "stage.json", sft_record)

    again = run_recipe(load_recipe(path))
    assert [again[s]["run_id"] for s in ("base", "sft")] == [first[s]["run_id"] for s in ("base", "sft")]


def test_a_forced_rerun_starts_afresh(sft_run, capsys):
    path, run_dir, first = sft_run
    records = run_recipe(load_recipe(path), only="sft")
    assert "rerun requested: starting this stage afresh" in capsys.readouterr().out
    assert records["sft"]["metrics"]["steps"] == 2  # trained again from step 0, not resumed at the end
    assert records["sft"]["run_id"] != first["sft"]["run_id"]


def test_a_removal_cut_short_never_leaves_a_done_record(sft_run, monkeypatch):
    """A stage started afresh removes its folder first; a removal cut short (Ctrl-C, a kill) left stage.json saying
    done beside half the files it describes, and the next run skipped the stage. Now the next run reruns it."""
    import pipeline.run as run_module

    path, run_dir, first = sft_run
    real_rmtree = run_module.shutil.rmtree

    def cut_short(folder, *args, **kwargs):
        (Path(folder) / "adapter_model.safetensors").unlink()  # the weights go first, then the interrupt
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module.shutil, "rmtree", cut_short)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(path), only="sft")
    monkeypatch.setattr(run_module.shutil, "rmtree", real_rmtree)
    records = run_recipe(load_recipe(path))
    assert records["sft"]["run_id"] != first["sft"]["run_id"] and records["sft"]["status"] == "done"
    assert (run_dir / "sft" / "adapter_model.safetensors").is_file()


def test_pipeline_eval_into_the_eval_stages_folder_drops_its_record(write_recipe, capsys):
    """`pipeline eval RUN --limit 2` rewrites RUN/eval's report; the eval stage's record, which vouched for another
    report, goes, so the next `pipeline run` evaluates again instead of skipping as done."""
    from pipeline.cli import main

    path = write_recipe("evaluated", {"eval": {"limit": 4}})
    first = run_recipe(load_recipe(path))
    run_dir = load_recipe(path).run_dir
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--limit", "2"]) == 0
    assert "its stage.json is removed, so `pipeline run` runs the eval stage again" in capsys.readouterr().out
    assert not (run_dir / "eval" / "stage.json").exists() and (run_dir / "eval" / "report.md").is_file()
    again = run_recipe(load_recipe(path))
    assert again["eval"]["run_id"] != first["eval"]["run_id"] and again["eval"]["status"] == "done"
    assert again["pretrain"]["run_id"] == first["pretrain"]["run_id"]


def test_a_moved_run_folder_still_loads(sft_run, tmp_path):
    import torch

    from pipeline.models import load_stage_model

    _, run_dir, _ = sft_run
    model, tokenizer = load_stage_model(run_dir / "sft")
    ids = torch.tensor([tokenizer("Nozan lives in").input_ids])
    expected = model(input_ids=ids).logits
    moved = tmp_path / "archive" / "chain"
    shutil.copytree(run_dir, moved)
    shutil.rmtree(run_dir)  # the original is gone: the copy must not point at it
    lineage = read_json(moved / "sft" / "lineage.json")
    assert lineage == {"base": "../pretrain", "adapters": ["."]}
    model, _ = load_stage_model(moved / "sft")
    assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-6)


# ---------------------------------------------------------------- training that goes wrong stops


def _poison_gradients_from(step: int, monkeypatch):
    """From optimizer step `step` on, every gradient is NaN (as a too-high learning rate makes them)."""
    from pipeline.trainer_args import StopOnNonFinite

    original = StopOnNonFinite.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = original(self, model, inputs, num_items_in_batch)
        if self.state.global_step + 1 >= step:
            for param in model.parameters():
                if param.grad is not None:
                    param.grad.fill_(math.nan)
        return loss

    monkeypatch.setattr(StopOnNonFinite, "training_step", training_step)


def test_sft_stops_at_the_first_nan_and_keeps_the_last_good_checkpoint(write_recipe, tiny_world, monkeypatch):
    from safetensors.torch import load_file

    path = write_recipe("nan", {"pretrain.checkpoint_every": 100,
                                "sft": sft_section(tiny_world, max_steps=6, save_steps=2, eval_limit=2)})
    recipe = load_recipe(path)
    with monkeypatch.context() as patch:
        _poison_gradients_from(4, patch)
        with pytest.raises(StageFailed, match=r"sft: non-finite training at step 4 .*gradient norm nan.*checkpoint-2"):
            run_recipe(recipe)
    checkpoints = recipe.run_dir / "sft" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*checkpoint-*")) == ["checkpoint-2"]
    weights = load_file(checkpoints / "checkpoint-2" / "adapter_model.safetensors")
    assert all(t.isfinite().all() for t in weights.values())
    record = read_json(recipe.run_dir / "sft" / "stage.json")
    assert record["status"] == "failed" and "step 4" in record["error"]

    records = run_recipe(recipe)  # the cause is gone: resumes from checkpoint-2 and finishes
    assert records["sft"]["status"] == "done" and records["sft"]["metrics"]["steps"] == 6


def test_dpo_stuck_or_nan_margin_stops():
    from pipeline.stages.dpo import StuckMarginCheck

    class State:
        global_step = 3

    check = StuckMarginCheck(after_steps=3, metrics_path=Path("/nonexistent"), enabled=False)
    with pytest.raises(StageFailed, match="still exactly 0 after 3 steps"):
        check.on_log(None, State(), None, logs={"rewards/margins": 0.0})
    with pytest.raises(StageFailed, match="reward margin is nan at step 3"):
        StuckMarginCheck(10, Path("/nonexistent"), False).on_log(None, State(), None, logs={"rewards/margins": math.nan})


def test_nan_weights_are_named_not_blamed_on_the_processes():
    import torch
    from accelerate import Accelerator

    from pipeline.distributed import require_ranks_agree

    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(StageFailed, match="not finite"):
        require_ranks_agree("sft", model, Accelerator(cpu=True))


# ---------------------------------------------------------------- resume survives torn and corrupt files


def _interrupt_pretrain_at(step: int, monkeypatch):
    import pipeline.stages.pretrain as pretrain

    original = pretrain.lr_at

    def lr_at(at, cfg):
        if at == step:
            raise KeyboardInterrupt
        return original(at, cfg)

    monkeypatch.setattr(pretrain, "lr_at", lr_at)


def test_resume_skips_a_corrupt_checkpoint_and_a_torn_log_line(write_recipe, capsys, monkeypatch):
    path = write_recipe("crash", {"pretrain.max_steps": 12, "pretrain.checkpoint_every": 3, "pretrain.log_every": 1,
                                  "pretrain.precision": "auto"})
    recipe = load_recipe(path)
    with monkeypatch.context() as patch:
        _interrupt_pretrain_at(10, patch)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(recipe)
    out_dir = recipe.run_dir / "pretrain"
    record = read_json(out_dir / "stage.json")
    assert record["status"] == "interrupted" and record["auto_precision"] in ("bf16", "fp32")
    # as if written on a CPU of the other kind: `auto` meant another precision there, and resuming says so
    elsewhere = {"bf16": "fp32", "fp32": "bf16"}[record["auto_precision"]]
    atomic_write_json(out_dir / "stage.json", {**record, "auto_precision": elsewhere})
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == ["step-0000006", "step-0000009"]
    newest = out_dir / "checkpoints" / "step-0000009" / "model.safetensors"
    newest.write_bytes(b"\0" * newest.stat().st_size)  # overwritten with garbage, same size
    with open(out_dir / "metrics.jsonl", "a") as log:
        log.write('{"step": 11, "loss": 1.2')  # torn by the crash

    records = run_recipe(recipe)
    out = capsys.readouterr().out
    assert "step-0000009 skipped: model.safetensors does not match its checksum" in out
    assert "resuming from step-0000006 (step 6)" in out
    assert (f"[pretrain] note: its checkpoints were written where `auto` meant {elsewhere}; on this machine it means "
            f"{record['auto_precision']}, so the rest of the stage trains in {record['auto_precision']} (set "
            "pretrain.precision to keep one precision)") in out
    assert records["pretrain"]["status"] == "done"
    assert (out_dir / "checkpoints" / "corrupt-step-0000009").is_dir()
    steps = [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [s for s, line in zip(steps, (out_dir / "metrics.jsonl").read_text().splitlines()) if '"loss"' in line]
    assert losses == list(range(1, 13))  # every step logged once, the torn line gone


def test_an_interrupted_sft_resumes_to_the_bytes_an_uninterrupted_run_writes(write_recipe, tiny_world, monkeypatch):
    """Two runs of one recipe train the same adapter (a fresh LoRA was drawn from a random seed), and a run cut
    in its second epoch and resumed trains it too (the epoch's batches were drawn again from another RNG state)."""
    import torch

    from pipeline.trainer_args import StopOnNonFinite

    sft = sft_section(tiny_world, max_steps=10, save_steps=3, eval_limit=2)  # 38 conversations: 5 steps an epoch
    recipe = load_recipe(write_recipe("whole", {"pretrain.checkpoint_every": 100, "sft": sft}))
    run_recipe(recipe)
    adapters = [(recipe.run_dir / "sft" / "adapter_model.safetensors").read_bytes()]
    torch.seed()  # as a new process starts: `pipeline run --only sft` has no pretraining to seed torch before sft
    run_recipe(recipe, only="sft")
    adapters.append((recipe.run_dir / "sft" / "adapter_model.safetensors").read_bytes())
    assert adapters[0] == adapters[1]

    recipe = load_recipe(write_recipe("cut", {"pretrain.checkpoint_every": 100, "sft": sft}))
    original = StopOnNonFinite.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 7:  # in step 8, after checkpoint-6
            raise KeyboardInterrupt
        return original(self, model, inputs, num_items_in_batch)

    with monkeypatch.context() as patch:
        patch.setattr(StopOnNonFinite, "training_step", training_step)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(recipe)
    assert read_json(recipe.run_dir / "sft" / "stage.json")["status"] == "interrupted"
    records = run_recipe(recipe)
    assert records["sft"]["status"] == "done" and records["sft"]["metrics"]["steps"] == 10
    assert (recipe.run_dir / "sft" / "adapter_model.safetensors").read_bytes() == adapters[0]


def test_sigterm_records_interrupted_and_the_rerun_resumes(write_recipe, cli_env):
    path = write_recipe("term", {"pretrain.max_steps": 400, "pretrain.checkpoint_every": 5, "pretrain.log_every": 1})
    run_dir = load_recipe(path).run_dir
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path)], env=cli_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run_dir / "pretrain" / "checkpoints").glob("step-*")):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "Traceback" not in err
    assert "\nstopped by signal SIGTERM; rerun the same command to resume from the newest checkpoint\n" in err
    record = read_json(run_dir / "pretrain" / "stage.json")
    assert record["status"] == "interrupted" and record["error"] == "stopped by signal SIGTERM"
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "pretrain.max_steps=400"], env=cli_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from step-" in done.stdout
    resumed = read_json(run_dir / "pretrain" / "stage.json")
    assert resumed["status"] == "done"
    # the summary's time covers the interrupted attempt too, not only the part after the resume
    assert resumed["wall_time_total_s"] == pytest.approx(record["wall_time_s"] + resumed["wall_time_s"], abs=0.02)
    assert f"s; {resumed['wall_time_total_s']:.0f}s with the attempts it resumed]" in done.stdout


# ---------------------------------------------------------------- the fingerprint sees every input


def test_every_file_field_is_declared_as_data():
    """data_files() is derived from the schema: a new `*_data` field cannot be forgotten by hand."""
    import dataclasses
    import typing

    from pipeline.recipe import Recipe

    def walk(cls):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            inner = [a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)]
            if inner:
                yield from walk(inner[0])
            else:
                yield cls.__name__, f

    names = [(owner, f.name) for owner, f in walk(Recipe) if f.name.endswith("_data") or f.name == "corpus"]
    assert len(names) >= 12
    assert [(o, f.name) for o, f in walk(Recipe) if (o, f.name) in names and not f.metadata.get("data")] == []


def test_an_edited_chat_template_file_or_base_folder_reruns_the_stage(write_recipe, tmp_path):
    from pipeline.recipe import load_recipe as load
    from pipeline.run import stage_fingerprint

    template = tmp_path / "mine.jinja"
    template.write_text((Path(__file__).parents[1] / "pipeline" / "templates" / "chatml.jinja").read_text())
    path = write_recipe("tpl", {"tokenizer.chat_template": str(template)})
    before = stage_fingerprint(load(path), "tokenizer", [])
    template.write_text(template.read_text() + "\n")
    assert stage_fingerprint(load(path), "tokenizer", []) != before

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    from pipeline.artifacts import content_hashes
    from pipeline.recipe import BaseModelConfig

    recipe = load(path)
    recipe.base = BaseModelConfig(path=str(base))
    assert str(base) in recipe.input_paths("base")  # later stages see it through the base stage's fingerprint
    first = content_hashes(recipe.input_paths("base"))
    (base / "config.json").write_text('{"changed": true}')
    assert content_hashes(recipe.input_paths("base")) != first


def test_finished_stage_files_are_readable_like_any_new_file(dpo_run):
    """safetensors (0.8) and our atomic writes create files 0o600; a finished stage gives them the mode a
    plainly created file gets (0o666 less the umask), so a shared machine's team can read a run."""
    from pipeline.artifacts import default_file_mode

    run_dir, _ = dpo_run
    modes = {str(f.relative_to(run_dir)): oct(f.stat().st_mode & 0o777)
             for stage in ("pretrain", "sft", "dpo") for f in (run_dir / stage).rglob("*") if f.is_file()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert {name: mode for name, mode in modes.items() if mode != oct(default_file_mode())} == {}
    assert default_file_mode() == 0o666 & ~_umask()


def _umask() -> int:
    import os

    current = os.umask(0)
    os.umask(current)
    return current
