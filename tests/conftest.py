"""Shared fixtures: a tiny generated world and tiny recipes written to temporary folders."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A model small enough that a few dozen steps take seconds on 2 CPU cores.
TINY_MODEL = {
    "architecture": "llama",
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    from pipeline.data.world import write_world

    out = tmp_path_factory.mktemp("world")
    write_world(out, seed=0, people=12)
    return out


def tiny_recipe_dict(world: Path, out_dir: Path, name: str = "tiny") -> dict:
    return {
        "name": name,
        "output_dir": str(out_dir),
        "seed": 0,
        "tokenizer": {"corpus": [str(world / "pretrain.jsonl")], "vocab_size": 512},
        "pretrain": {
            "train_data": [str(world / "pretrain.jsonl")],
            "eval_data": [str(world / "pretrain_heldout.jsonl")],
            "model": dict(TINY_MODEL),
            "seq_len": 64,
            "global_batch_size": 8,
            "micro_batch_size": 8,
            "max_steps": 12,
            "learning_rate": 3e-3,
            "warmup_steps": 2,
            "eval_every": 6,
            "eval_max_blocks": 32,
            "checkpoint_every": 6,
            "log_every": 2,
            "precision": "fp32",
        },
    }


@pytest.fixture
def write_recipe(tmp_path, tiny_world):
    """write_recipe(**section_updates) -> path of a tiny recipe YAML in tmp_path."""

    def write(name: str = "tiny", updates: dict | None = None) -> Path:
        data = tiny_recipe_dict(tiny_world, tmp_path / "runs", name)
        for dotted, value in (updates or {}).items():
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = copy.deepcopy(value)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture
def cli_env() -> dict:
    """Environment for running `python -m pipeline` in a subprocess from the repo."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env
