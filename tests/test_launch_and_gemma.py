"""Launch configs load with accelerate's own loader; the Gemma-2-2B recipe runs on a tiny stand-in."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.recipe import load_recipe
from pipeline.run import run_recipe

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "launch" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_launch_configs_load_and_agree(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    name = path.stem
    if name == "multi_cpu_2":
        assert config.use_cpu and config.num_processes == 2 and config.distributed_type == "MULTI_GPU"
    elif name == "single_gpu":
        assert config.num_processes == 1 and not config.use_cpu
    else:
        assert config.num_processes > 1 and not config.use_cpu
        expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
        assert config.distributed_type == expected[name]
        if name.startswith("deepspeed"):
            assert config.deepspeed_config["zero_stage"] == int(name[-1])
    assert config.mixed_precision == "no"  # precision comes from the recipe, never from the launcher


def test_gemma2_2b_recipe_runs_with_a_tiny_gemma(gemma_folder, tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    overrides = [
        f"output_dir={tmp_path / 'runs'}",
        f"base.path={gemma_folder}", "base.dtype=float32",
        f"sft.train_data=[{tiny_world / 'sft_train.jsonl'}]", "sft.format=auto", "sft.max_steps=2",
        "sft.global_batch_size=4", "sft.micro_batch_size=2", "sft.precision=fp32",
        f"dpo.train_data=[{tiny_world / 'dpo_train.jsonl'}]", "dpo.format=auto", "dpo.max_steps=2",
        "dpo.global_batch_size=4", "dpo.micro_batch_size=2", "dpo.precision=fp32",
    ]
    recipe = load_recipe(REPO / "recipes" / "gemma2-2b.yaml", overrides)
    assert recipe.base.attn_implementation == "eager" and recipe.stages == ["base", "sft", "dpo"]
    records = run_recipe(recipe)
    assert records["sft"]["status"] == "done" and records["dpo"]["status"] == "done"
    assert (tmp_path / "runs" / "gemma2-2b" / "dpo" / "adapter_model.safetensors").is_file()

    # eval, chat and score load the base exactly as training did (revision, remote code, attention)
    from transformers import AutoModelForCausalLM

    from pipeline.artifacts import read_json
    from pipeline.models import load_stage_model

    lineage = read_json(tmp_path / "runs" / "gemma2-2b" / "dpo" / "lineage.json")
    assert lineage["base"] == str(gemma_folder.resolve())  # outside the run folder: kept absolute
    assert lineage["adapters"] == ["../sft", "."]
    contents = lineage["base_options"].pop("folder_contents")  # the folder as the base stage read it
    assert contents["folder"] == str(gemma_folder.resolve()) and "model.safetensors" in contents["files"]
    assert lineage["base_options"] == {"revision": None, "trust_remote_code": False, "attn_implementation": "eager",
                                       "dtype": "float32"}
    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(source, *args, **kwargs):
        seen.update(kwargs)
        return original(source, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_stage_model(tmp_path / "runs" / "gemma2-2b" / "dpo")
    assert seen["attn_implementation"] == "eager" and seen["trust_remote_code"] is False
    assert seen["use_safetensors"] is True


def test_parameter_counts_of_4bit_and_zero3_weights():
    """A QLoRA base's Params4bit packs two weights in a byte, and ZeRO-3 leaves empty stubs with ds_numel: the
    logged "trainable of total" counts the weights they stand for, as peft does."""
    import torch

    from pipeline.models import count_parameters

    class Params4bit(torch.nn.Parameter):  # bitsandbytes' class, by name (the package is not installed here)
        pass

    model = torch.nn.Module()
    model.packed = Params4bit(torch.zeros(8, 4, dtype=torch.uint8), requires_grad=False)  # an 8 x 8 matrix
    model.stub = torch.nn.Parameter(torch.empty(0))
    model.stub.ds_numel = 12
    model.adapter = torch.nn.Parameter(torch.zeros(3, 2))
    assert count_parameters(model) == (6 + 12, 64 + 12 + 6)


def test_gpu_decisions_on_a_simulated_gpu(monkeypatch):
    """What a GPU machine gets, decided without one: models load onto this process's GPU (chat, serve, eval and the
    held-out passes ran on the CPU of a GPU machine), except under FSDP or DeepSpeed, whose trainers shard them from
    the CPU; `auto` is bf16 only where the GPU has it in hardware (torch's check says yes to emulated bf16 on V100
    and T4), else fp16 with the trainer's loss scaling (it trained unscaled: both flags were off)."""
    import torch
    from accelerate import PartialState

    from pipeline.models import autocast_dtype, gpu_placement, resolve_dtype
    from pipeline.trainer_args import trains_in_bf16, trains_in_fp16

    assert gpu_placement() == {} or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for kind in ("FSDP", "DEEPSPEED"):
        monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
        monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
        assert gpu_placement() == {"device_map": {"": PartialState().device}}
        monkeypatch.setenv(f"ACCELERATE_USE_{kind}", "true")
        assert gpu_placement() == {}, kind

    cuda = torch.device("cuda")
    for ampere in (True, False):  # V100 / T4: bf16 only emulated
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: ampere or including_emulation)
        half = torch.bfloat16 if ampere else torch.float16
        assert autocast_dtype("auto", cuda) == half and resolve_dtype("auto", "cuda") == half
        assert trains_in_bf16("auto", "auto", "cuda") is ampere and trains_in_fp16("auto", "auto", "cuda") is not ampere
    assert trains_in_fp16("auto", "float16", "cuda") and not trains_in_bf16("auto", "float16", "cuda")
    assert trains_in_fp16("fp16", "auto", "cuda") and not trains_in_fp16("auto", "float16", "cpu")
    assert not trains_in_fp16("bf16", "float16", "cuda") and not trains_in_fp16("fp32", "auto", "cuda")
