"""The Slurm script passes the recipe and overrides through as single arguments, whatever they contain."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_recipe_path_with_spaces_and_shell_characters_stays_one_argument(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "scontrol", 'echo node-a; echo node-b')
    _fake(bin_dir, "srun", 'shift; "$@"')  # drop --kill-on-bad-exit=1, run the command once
    _fake(bin_dir, "accelerate", f'printf "%s\\n" "$@" > {tmp_path}/argv')
    recipe = "my recipes/$(touch pwned) a;b.yaml"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "SLURM_NODEID": "1"}
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "multinode.sbatch"), recipe, "sft.lora.r=32"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[-4:] == ["pipeline", "run", recipe, "sft.lora.r=32"]
    assert argv[argv.index("--num_processes") + 1] == "16" and argv[argv.index("--machine_rank") + 1] == "1"
    assert argv[argv.index("--main_process_ip") + 1] == "node-a"
    assert not (tmp_path / "pwned").exists()
