"""sft stage: LoRA starts equal to its base, trains only adapters, saves a plain PEFT checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.artifacts import file_sha256, read_json
from pipeline.errors import PipelineError
from pipeline.recipe import LoraArgs, SftConfig, load_recipe
from pipeline.run import run_recipe
from tests.conftest import sft_section


def test_lora_model_starts_equal_to_its_base():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pipeline.stages.sft import attach_lora

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    base = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before = base(input_ids=ids).logits.clone()
    model = attach_lora(base, SftConfig(train_data=["x"], lora=LoraArgs(r=4, alpha=8)))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_sft_stage_trains_only_the_adapter_and_saves_a_peft_checkpoint(write_recipe, tiny_world):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = write_recipe()
    run_recipe(load_recipe(path))  # tokenizer + pretrain
    run_dir = load_recipe(path).run_dir
    base_hash = file_sha256(run_dir / "pretrain" / "model.safetensors")

    path = write_recipe(updates={"sft": sft_section(tiny_world)})
    records = run_recipe(load_recipe(path))
    assert records["pretrain"]["status"] == "done"  # skipped: adding a later stage changes nothing before it
    # fp32 on the CPU: micro_batch_size 4 is capped by fp32_micro_batch_size (2); the global batch stays 8
    metrics = records["sft"]["metrics"]
    assert (metrics["micro_batch"], metrics["gradient_accumulation"]) == (2, 4)
    sft_dir = run_dir / "sft"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
                 "generation_config.json", "stage.json"):
        assert (sft_dir / name).is_file(), name
    assert file_sha256(run_dir / "pretrain" / "model.safetensors") == base_hash  # base untouched

    adapter_config = json.loads((sft_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((run_dir / "pretrain").resolve())
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    generation = GenerationConfig.from_pretrained(sft_dir)
    assert tokenizer.convert_tokens_to_ids("<|end|>") in generation.eos_token_id
    assert generation.pad_token_id != tokenizer.convert_tokens_to_ids("<|end|>")

    # plain transformers + peft load it; only lora weights were trained
    base = AutoModelForCausalLM.from_pretrained(run_dir / "pretrain")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, sft_dir).eval()
    adapter = load_file(sft_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B moved off zero
    for name, value in model.get_base_model().state_dict().items():
        clean = name.replace(".base_layer", "")
        if "lora_" not in name:
            assert torch.equal(value, original[clean]), name

    metrics = read_json(sft_dir / "stage.json")["metrics"]
    assert metrics["steps"] == 6 and metrics["trainable_parameters"] < metrics["total_parameters"]
    for key in ("heldout_before", "heldout_after"):
        assert 0.0 <= metrics[key]["answer_accuracy"] <= 1.0 and metrics[key]["scored"] == 8
        assert 0.0 <= metrics[key]["eot_rate"] <= 1.0 and metrics[key]["response_perplexity"] > 1.0
    # SFT trains the reference replies' tokens: their perplexity falls
    assert metrics["heldout_after"]["response_perplexity"] < metrics["heldout_before"]["response_perplexity"]
    assert (sft_dir / "metrics.jsonl").is_file()
    import trl.trainer.utils as trl_utils

    assert trl_utils._use_triton._labelled_only_on_cpu  # TRL's head scored only labelled positions (pipeline/trl_cpu.py)


def test_padding_free_batches_give_the_padded_loss(write_recipe, tiny_world):
    """sft.padding_free: a micro-batch as one row with per-conversation position ids. Attention stays within each
    conversation (transformers builds the block mask from the position ids), so the loss of the first step (same
    weights, same batches) equals the padded batch's, and so does the trained adapter's first update."""
    losses = {}
    for padding_free in (False, True):
        path = write_recipe(updates={"sft": sft_section(tiny_world, max_steps=2, logging_steps=1, eval_limit=0,
                                                        padding_free=padding_free)})
        run_recipe(load_recipe(path))
        rows = [json.loads(line) for line in (load_recipe(path).run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
        losses[padding_free] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses[False]) == len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-4)


def test_qlora_without_a_gpu_is_refused(write_recipe, tiny_world):
    path = write_recipe(updates={"sft": sft_section(tiny_world, quantization="4bit")})
    with pytest.raises(PipelineError, match=r"QLoRA\) needs a CUDA GPU"):
        run_recipe(load_recipe(path))


def test_max_length_past_the_models_context_drops_longer_conversations(write_recipe, tiny_world, tmp_path, capsys):
    """sft.max_length 512 on a model with 128 positions: a 300-token conversation counts as too long (a model
    past its positions learns nothing real, and one with learned position embeddings fails), and the log says so."""
    from pipeline.generation import within_context
    from pipeline.recipe import SftConfig

    long_one = {"messages": [{"role": "user", "content": "Tell me everything. " * 60},
                             {"role": "assistant", "content": "Tolbik lives in Varn."}]}
    data = tmp_path / "with_long.jsonl"
    data.write_text((tiny_world / "sft_train.jsonl").read_text() + json.dumps(long_one) + "\n")
    path = write_recipe(updates={"sft": sft_section(tiny_world, train_data=[str(data)], max_length=512)})
    records = run_recipe(load_recipe(path))
    assert records["sft"]["metrics"]["data"]["too_long_dropped"] == 1
    assert "[sft] max_length 512 is more than the model's context leaves (128 tokens)" in capsys.readouterr().out

    lines = []
    model = type("M", (), {"config": type("C", (), {"get_text_config": lambda self: self,
                                                    "max_position_embeddings": 128})()})()
    assert within_context(SftConfig(max_length=100), "max_length", model, lines.append).max_length == 100
    assert within_context(SftConfig(max_length=512), "max_length", model, lines.append).max_length == 128
    with pytest.raises(PipelineError, match="leaves no room once 128 reply tokens are reserved"):
        within_context(SftConfig(), "max_length", model, lines.append, reserve=128)
    assert len(lines) == 1


def test_lora_names_that_match_no_module_are_one_line_errors():
    """As peft matches them: a whole dotted name or its last parts; a miss names the nearest and the linear layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models import require_lora_targets
    from pipeline.recipe import LoraArgs

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    for good in (LoraArgs(), LoraArgs(target_modules=["q_proj", "layers.0.mlp.down_proj"],
                                      modules_to_save=["embed_tokens"])):
        require_lora_targets(model, good, "sft")
    with pytest.raises(PipelineError, match=r"^dpo.lora.target_modules: `q_prj` names no module of this model "
                                            r"\(did you mean `q_proj`\?\); its linear layers: down_proj, gate_proj, "
                                            r"k_proj, lm_head, o_proj, q_proj, up_proj, v_proj$"):
        require_lora_targets(model, LoraArgs(target_modules=["q_prj"]), "dpo")
    with pytest.raises(PipelineError, match=r"^sft.lora.modules_to_save: `embed_token` names no module"):
        require_lora_targets(model, LoraArgs(modules_to_save=["embed_token"]), "sft")


def test_conversations_all_longer_than_max_length_say_so(tiny_world, tiny_tokenizer):
    from pipeline.chat_template import ChatRenderer
    from pipeline.recipe import SftConfig
    from pipeline.stages.sft import prepare_rows

    cfg = SftConfig(train_data=[str(tiny_world / "sft_train.jsonl")], max_length=5)
    count = len((tiny_world / "sft_train.jsonl").read_text().splitlines())
    with pytest.raises(PipelineError, match=rf"^sft: every one of the {count:,} conversations is longer than "
                                            r"sft.max_length \(5 tokens\); raise it, or set sft.too_long: truncate$"):
        prepare_rows(cfg, ChatRenderer(tiny_tokenizer), 0)


def test_bad_record_names_file_line_and_field(write_recipe, tiny_world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    empty = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(empty) + "\n")
    path = write_recipe(updates={"sft": sft_section(tiny_world, train_data=[str(bad)], eval_data=[])})
    with pytest.raises(PipelineError, match=r"bad.jsonl line 2.*messages\[1\]\.content"):
        run_recipe(load_recipe(path))


def test_gemma2_base_model_path(tiny_world, gemma_folder, tmp_path):
    """A local Gemma-2 folder as `base:`: eager attention, system folded into the first user turn."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = tmp_path / "with_system.jsonl"
    lines = [json.loads(x) for x in (tiny_world / "sft_train.jsonl").read_text().splitlines()[:24]]
    for record in lines[::2]:
        record["messages"].insert(0, {"role": "system", "content": "Answer in one sentence."})
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    recipe = tmp_path / "gemma.yaml"
    recipe.write_text(json.dumps({
        "name": "gemma", "output_dir": str(tmp_path / "runs"),
        "base": {"path": str(gemma_folder), "dtype": "float32"},
        "sft": sft_section(tiny_world, train_data=[str(data)], max_steps=3),
    }))
    records = run_recipe(load_recipe(recipe))
    sft_dir = tmp_path / "runs" / "gemma" / "sft"
    assert records["sft"]["metrics"]["base"] == str(tmp_path / "runs" / "gemma" / "base")  # the base stage
    assert records["base"]["metrics"]["source"] == "folder" and records["base"]["metrics"]["chat_template"] == \
        "the base tokenizer's own"
    base = AutoModelForCausalLM.from_pretrained(gemma_folder)
    assert base.config._attn_implementation == "eager"
    model = PeftModel.from_pretrained(base, sft_dir)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_data_check_marks_trained_tokens(tiny_world, tiny_tokenizer, tmp_path, cli_env):
    import subprocess
    import sys

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    result = subprocess.run([sys.executable, "-m", "pipeline", "data", "check", str(tiny_world / "sft_train.jsonl"),
                             "--tokenizer", str(tmp_path / "tok")], capture_output=True, text=True, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "format:     messages" in result.stdout
    # real control tokens are marked ⟨...⟩; typed look-alikes would be shown bare
    assert "⟨<|assistant|>⟩[[ " in result.stdout and "⟨<|end|>⟩]]" in result.stdout


def test_pad_to_multiple_of_reaches_the_collator(tmp_path):
    """sft.pad_to_multiple_of (default 8) becomes TRL's setting; 0 means pad to the longest row only."""
    from types import SimpleNamespace

    from trl import SFTConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from pipeline.recipe import split_batch
    from pipeline.trainer_args import common_trainer_kwargs

    ctx = SimpleNamespace(out_dir=tmp_path, recipe=SimpleNamespace(seed=0), is_main=True)
    split = split_batch("sft", 8, 4, 1)
    for setting, expected in ((SftConfig(train_data=["x"]).pad_to_multiple_of, 8), (0, None), (16, 16)):
        cfg = SftConfig(train_data=["x"], pad_to_multiple_of=setting, precision="fp32")
        args = SFTConfig(**common_trainer_kwargs(cfg, ctx, split), max_length=None)
        assert args.pad_to_multiple_of == expected, setting
    collator = DataCollatorForLanguageModeling(pad_token_id=0, pad_to_multiple_of=8)
    batch = collator([{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2, 3, 4, 5]}])
    assert batch["input_ids"].shape == (2, 8) and batch["labels"][0, 3:].eq(-100).all()


def test_fp32_on_the_cpu_caps_the_micro_batch(monkeypatch):
    """sft.fp32_micro_batch_size applies where sft trains in fp32 on a CPU (precision fp32, or auto without bf16
    hardware), never to bf16 or a GPU, and never raises the ceiling."""
    from pipeline.trainer_args import micro_batch_ceiling

    def ceiling(precision, device="cpu", micro=8, fp32=2, base_dtype="auto"):
        cfg = SftConfig(train_data=["x"], precision=precision, micro_batch_size=micro, fp32_micro_batch_size=fp32)
        return micro_batch_ceiling(cfg, base_dtype, device)

    assert ceiling("fp32") == 2 and ceiling("fp32", fp32=16) == 8 and ceiling("fp32", micro=1) == 1
    assert ceiling("bf16") == 8 and ceiling("fp32", device="cuda") == 8
    assert ceiling("auto", base_dtype="float32") == 2  # a base loaded in fp32 trains in fp32
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # no bf16 hardware as far as auto is concerned
    assert ceiling("auto") == 2
    monkeypatch.setattr("pipeline.models.cpu_has_fast_bf16", lambda: True)
    assert ceiling("auto") == 8


def test_lora_adapters_take_the_base_dtype_under_zero3_only():
    """ZeRO-3 gathers parameters into buffers of the first one's dtype: fp32 adapters beside a bf16 base raised
    TypeError at the first optimizer step (trl#6089), so there the adapters stay bf16, as TRL makes them. Elsewhere
    peft keeps them fp32."""
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.recipe import SftConfig
    from pipeline.stages.sft import attach_lora

    def adapter_dtypes(zero_stage):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2)).to(torch.bfloat16)
        plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
        accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
        peft_model = attach_lora(model, SftConfig(train_data=["x"]), accelerator)
        return {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n}

    assert adapter_dtypes(3) == {torch.bfloat16}
    assert adapter_dtypes(None) == adapter_dtypes(2) == {torch.float32}
