"""The same global batch on 1 or 2 processes, or in 1 or 8 micro-batches, trains the same model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.artifacts import read_json
from pipeline.recipe import load_recipe
from pipeline.run import run_recipe

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


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="the accelerate launcher is not installed")
def test_two_cpu_processes_match_one(write_recipe, cli_env):
    common = {"pretrain.max_steps": 8, "pretrain.log_every": 1, "pretrain.global_batch_size": 8,
              "pretrain.micro_batch_size": 4}
    single = write_recipe("single", common)
    run_recipe(load_recipe(single))

    double = write_recipe("double", common)
    launcher = Path(sys.executable).parent / "accelerate"
    env = {**cli_env, "PIPELINE_CPU_THREADS": "1"}
    result = subprocess.run([str(launcher) if launcher.exists() else "accelerate", "launch", "--config_file",
                             str(REPO / "launch" / "accelerate" / "multi_cpu_2.yaml"), "-m", "pipeline", "run",
                             str(double)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes: 2" in result.stdout
    stage = read_json(load_recipe(double).run_dir / "pretrain" / "stage.json")
    assert stage["world_size"] == 2 and stage["metrics"]["ranks_in_sync"] is True
    assert stage["metrics"]["gradient_accumulation"] == 1  # 8 = 2 processes x 4 x 1
    one, two = _losses(load_recipe(single).run_dir), _losses(load_recipe(double).run_dir)
    assert one.keys() == two.keys()
    assert all(abs(one[s] - two[s]) < 1e-3 for s in one), (one, two)
