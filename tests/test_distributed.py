"""The same global batch on 1 or 2 processes, or in 1 or 8 micro-batches, trains the same model."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.artifacts import read_json
from pipeline.recipe import load_recipe
from pipeline.run import run_recipe
from tests.conftest import dpo_section, sft_section
from tests.test_reward import reward_section
from tests.test_rl import rl_section

REPO = Path(__file__).resolve().parents[1]


def _losses(run_dir):
    lines = (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_micro_batch_1_x_8_equals_8_x_1(write_recipe):
    common = {"pretrain.max_steps": 6, "pretrain.log_every": 1, "pretrain.global_batch_size": 8}
    whole = write_recipe("whole", {**common, "pretrain.micro_batch_size": 8})
    split = write_recipe("split", {**common, "pretrain.micro_batch_size": 1})
    run_recipe(load_recipe(whole))
    records = run_recipe(load_recipe(split))
    assert records["pretrain"]["metrics"]["gradient_accumulation"] == 8
    a, b = _losses(load_recipe(whole).run_dir), _losses(load_recipe(split).run_dir)
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)


def _sft_losses(run_dir):
    lines = (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}



def free_port() -> str:
    """A port nothing listens on now: torch's default rendezvous port (29500) is taken by any other
    torch.distributed job on the machine, a second checkout's tests included."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])

@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="the accelerate launcher is not installed")
def test_two_cpu_processes_match_one(write_recipe, cli_env, tiny_world):
    """pretrain, sft and dpo on 2 gloo processes train what 1 process trains on the same global batch;
    reward and rl run there too and end with their ranks in sync."""
    common = {"pretrain.max_steps": 8, "pretrain.log_every": 1, "pretrain.global_batch_size": 8,
              "pretrain.micro_batch_size": 4,
              # 4 steps of 8 stay inside the first epoch of the 38 conversations: an epoch's last, partial
              # global batch is dealt out differently to 1 and 2 processes (accelerate evens it out)
              "sft": sft_section(tiny_world, eval_limit=4, logging_steps=1, micro_batch_size=2, max_steps=4,
                                 save_steps=2),
              "dpo": dpo_section(tiny_world, eval_limit=4, micro_batch_size=1),
              "reward": reward_section(tiny_world, eval_limit=4, max_steps=2, micro_batch_size=4),
              "rl": rl_section(tiny_world, max_steps=2)}
    single = write_recipe("single", common)
    run_recipe(load_recipe(single))

    double = write_recipe("double", common)
    launcher = Path(sys.executable).parent / "accelerate"
    env = {**cli_env, "PIPELINE_CPU_THREADS": "1"}
    result = subprocess.run([str(launcher) if launcher.exists() else "accelerate", "launch", "--config_file",
                             str(REPO / "launch" / "accelerate" / "multi_cpu_2.yaml"), "--main_process_port",
                             free_port(), "-m", "pipeline", "run",
                             str(double)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes: 2" in result.stdout
    one_dir, two_dir = load_recipe(single).run_dir, load_recipe(double).run_dir
    for stage in ("pretrain", "sft", "dpo", "reward", "rl"):
        record = read_json(two_dir / stage / "stage.json")
        assert record["world_size"] == 2 and record["metrics"]["ranks_in_sync"] is True, stage
    assert read_json(two_dir / "pretrain" / "stage.json")["metrics"]["gradient_accumulation"] == 1  # 2 x 4 x 1
    assert read_json(two_dir / "sft" / "stage.json")["metrics"]["gradient_accumulation"] == 2  # 2 x 2 x 2
    # each checkpoint is sealed once both processes wrote their random state into it
    sealed = [read_json(c / "checksums.json") for c in sorted((two_dir / "sft" / "checkpoints").glob("checkpoint-*"))]
    assert sealed and all({"rng_state_0.pth", "rng_state_1.pth"} <= set(sums) for sums in sealed), sealed

    # loss curves: the same global batches, so equal up to float summation order
    one, two = _losses(one_dir), _losses(two_dir)
    assert one.keys() == two.keys() and all(abs(one[s] - two[s]) < 1e-3 for s in one), (one, two)
    one, two = _sft_losses(one_dir), _sft_losses(two_dir)
    assert one.keys() == two.keys() and all(abs(one[s] - two[s]) < 2e-3 for s in one), (one, two)
    # the final DPO policy: log-probs of four training answers
    one = read_json(one_dir / "dpo" / "stage.json")["metrics"]["probe_chosen_logps"]
    two = read_json(two_dir / "dpo" / "stage.json")["metrics"]["probe_chosen_logps"]
    assert all(abs(a - b) < 2e-3 for a, b in zip(one, two)), (one, two)


class _NotMain:
    """A real accelerator that answers as a process other than the main one would."""

    is_main_process = False
    is_local_main_process = False

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)


def _files(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_only_the_main_process_writes(dpo_run):
    """Every stage run again as a non-main process leaves the run folder exactly as it was.

    The Trainer's own checkpoint folder is left out: the Trainer decides who writes there from
    its own process index, which this single process cannot fake.
    """
    from accelerate import Accelerator

    from pipeline.run import _run_stage

    run_dir, _ = dpo_run
    recipe = load_recipe(run_dir.parent.parent / "dpo.yaml")
    before = _files(run_dir)
    accelerator = _NotMain(Accelerator())
    upstream = {}
    for stage in ("tokenizer", "pretrain", "sft", "dpo"):
        previous = read_json(run_dir / stage / "stage.json")
        if stage != "tokenizer":
            _run_stage(recipe, stage, previous["fingerprint"], previous, run_dir / stage, accelerator, dict(upstream))
        upstream[stage] = previous
    after = {p: t for p, t in _files(run_dir).items()
             if p.relative_to(run_dir).parts[:2] not in (("sft", "checkpoints"), ("dpo", "checkpoints"))}
    changed = sorted(str(p.relative_to(run_dir)) for p, t in after.items() if before.get(p) != t)
    assert changed == []


def test_tokenized_rows_are_built_once_and_read_back(tmp_path):
    """The main process builds and saves; a later process (or a resumed run) only reads."""
    from accelerate import Accelerator

    from pipeline.data.cache import cached_rows

    accelerator = Accelerator()
    rows = [{"input_ids": [1, 2, 3], "length": 3}, {"input_ids": [4, 5], "length": 2}]
    built = []

    def build():
        built.append(1)
        return rows, {"tokenize_s": 0.5}

    def must_not_build():
        raise AssertionError("tokenized again")

    folder = tmp_path / "cache" / "train"
    first, meta = cached_rows(accelerator, folder, "key-1", build)
    again, meta_again = cached_rows(_NotMain(accelerator), folder, "key-1", must_not_build)
    assert built == [1] and meta == meta_again == {"tokenize_s": 0.5}
    assert again.to_list() == first.to_list() == rows
    rebuilt, _ = cached_rows(accelerator, folder, "key-2", build)  # another tokenizer: built afresh
    assert built == [1, 1] and rebuilt.to_list() == rows


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="the accelerate launcher is not installed")
def test_held_out_answers_are_split_across_processes_and_equal_one_process(tiny_tokenizer, cli_env, tmp_path):
    """Held-out generation is dealt out batch by batch; greedy and sampled replies match one process."""
    import torch

    from tests.fixtures.generate_across_processes import answers, tiny_model

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    launcher = Path(sys.executable).parent / "accelerate"
    result = subprocess.run([str(launcher) if launcher.exists() else "accelerate", "launch", "--config_file",
                             str(REPO / "launch" / "accelerate" / "multi_cpu_2.yaml"), "--main_process_port", free_port(),
                             str(REPO / "tests" / "fixtures" / "generate_across_processes.py"),
                             str(tmp_path / "tok"), str(tmp_path / "two.json")],
                            capture_output=True, text=True, env={**cli_env, "PIPELINE_CPU_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    threads = torch.get_num_threads()
    try:
        one = answers(tiny_model(len(tiny_tokenizer)), tiny_tokenizer)
    finally:
        torch.set_num_threads(threads)
    assert two["processes"] == 2
    assert len(two["greedy"]) == len(two["sampled"]) == 9
    assert two["greedy"] == one["greedy"] and two["sampled"] == one["sampled"]
    assert two["sampled"] != two["greedy"]  # sampling really sampled
