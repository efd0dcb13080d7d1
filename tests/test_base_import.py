"""`base:` as a GGUF file: bad files are one-line errors; the real Gemma-3-270M imports, trains and round-trips.

The real-model test runs where its package is installed (`.ci/run` installs it): the base stage
dequantizes the GGUF, checks its own logits against transformers' GGUF load, and a few LoRA steps
on real instructions must lower the loss; the adapter must load with plain peft.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.gguf_header import SUPPORTED_ARCHITECTURES

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _gguf(path: Path, arch: str, template: str | None = None, floats: int = 4096, tensors: tuple = ()) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    if template:
        writer.add_chat_template(template)
    writer.add_tensor("token_embd.weight", np.zeros((floats // 64, 64), dtype=np.float32))
    for name in tensors:
        writer.add_tensor(name, np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _check(tmp_path: Path, base: dict, capsys) -> tuple[int, str]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "g", "base": base}))
    code = main(["check", str(recipe)])
    captured = capsys.readouterr()
    return code, captured.err.strip() + captured.out.strip()


def test_the_supported_architecture_list_is_transformers_own():
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    assert set(SUPPORTED_ARCHITECTURES) == set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}


def test_gguf_of_an_unsupported_architecture_is_one_line(tmp_path, capsys):
    path = _gguf(tmp_path / "rwkv.gguf", "rwkv6")
    code, out = _check(tmp_path, {"path": str(path), "chat_template": "gemma"}, capsys)
    assert code == 2 and len(out.splitlines()) == 1, out
    assert "GGUF architecture `rwkv6` cannot be loaded by the installed transformers" in out


def test_a_gguf_whose_rope_transformers_would_drop_is_one_line(tmp_path, capsys):
    """Per-dimension rope factors (a rope_freqs tensor) that are no llama3 rope's (Llama 3.1's, which the import
    reads back): transformers' GGUF loader would ignore them and load the model with another rope, so `check` says so
    before anything runs."""
    path = _gguf(tmp_path / "llama31.gguf", "llama", tensors=("rope_freqs.weight",))
    code, out = _check(tmp_path, {"path": str(path), "chat_template": "gemma"}, capsys)
    assert code == 2 and len(out.splitlines()) == 1, out
    assert "per-dimension rope factors" in out and "hub id or safetensors folder" in out and str(path) in out


def test_a_gguf_config_is_completed_with_llama_cpps_defaults_where_the_file_is_silent():
    """What a file leaves out is what llama.cpp's loader assumes (src/models/gemma2.cpp, gemma3.cpp, llama-model.cpp):
    Gemma-2 slides every other layer under a window of 4,096 with soft caps 50 and 30; Gemma-3 slides 5 of every 6
    layers where the file names a window (none where it does not) with a sliding rope base of 10,000; a scaling
    factor without a type, or under the older rope.scale_linear key, is linear; type "none" scales nothing."""
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, Qwen2Config

    from pipeline.errors import PipelineError
    from pipeline.gguf_hparams import complete_config

    small = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    gemma2 = complete_config(Gemma2Config(num_hidden_layers=4, sliding_window=7, attn_logit_softcapping=None,
                                          final_logit_softcapping=None, **small),
                             {"general.architecture": "gemma2", "gemma2.rope.freq_base": 500.0}, set())
    assert gemma2.layer_types == ["sliding_attention", "full_attention"] * 2 and gemma2.sliding_window == 4096
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping) == (50.0, 30.0)
    assert gemma2.rope_parameters["rope_theta"] == 500.0 and gemma2.query_pre_attn_scalar == 32

    def gemma3(fields):
        config = Gemma3TextConfig(num_hidden_layers=7, final_logit_softcapping=3.0, **small)
        return complete_config(config, {"general.architecture": "gemma3", **fields}, set())

    windowed = gemma3({"gemma3.attention.sliding_window": 512, "gemma3.rope.freq_base": 1e6})
    assert windowed.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert windowed.rope_parameters == {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    assert windowed.final_logit_softcapping is None and windowed.sliding_window == 512
    assert gemma3({}).layer_types == ["full_attention"] * 7
    untyped = gemma3({"gemma3.attention.sliding_window": 512, "gemma3.rope.scaling.factor": 8.0})
    assert untyped.rope_parameters["full_attention"]["factor"] == 8.0

    def llama(fields, tensors=()):
        return complete_config(LlamaConfig(num_hidden_layers=1, **small), {"general.architecture": "llama", **fields},
                               set(tensors)).rope_parameters

    assert llama({"llama.rope.scale_linear": 2.0}) == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert llama({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 2.0})["rope_type"] == "default"
    yarn = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 32768}  # Qwen2.5's long context, as its files write it
    assert llama(yarn) == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                           "rope_theta": 10000.0}
    # as llama.cpp reads YaRN: no original context is the file's own, a factor of 1 (or none) turns nothing
    assert llama({**yarn, "llama.rope.scaling.original_context_length": None, "llama.context_length": 8192}
                 )["original_max_position_embeddings"] == 8192
    assert llama({**yarn, "llama.rope.scaling.factor": 1.0})["rope_type"] == "default"
    qwen = complete_config(Qwen2Config(num_hidden_layers=1, **small), {"general.architecture": "qwen2",
                                                                        **{k.replace("llama", "qwen2"): v
                                                                           for k, v in yarn.items()}}, set())
    assert qwen.rope_parameters["rope_type"] == "yarn" and qwen.rope_parameters["factor"] == 4.0
    for fields, tensors in [({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, ()),
                            ({}, ("rope_freqs.weight",)), ({}, ("rope_factors_long.weight",))]:
        with pytest.raises(PipelineError, match="transformers' GGUF loader does not read"):
            llama(fields, tensors)
    # Llama 3.1's rope_freqs (float32, as its file stores them) read back as the config's own llama3 rope
    from pipeline.gguf_hparams import llama3_rope_factors, partial_rotary_factor, require_readable_rope

    llama31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    factors = np.float32(llama3_rope_factors(llama31, 128)).tolist()
    real = dict(hidden_size=4096, num_attention_heads=32, num_hidden_layers=1)
    fields = {"general.architecture": "llama", "llama.rope.freq_base": 500000.0, "llama.rope.dimension_count": 128}
    assert complete_config(LlamaConfig(**real), fields, {"rope_freqs.weight"},
                           {"rope_freqs.weight": factors}).rope_parameters == llama31
    # Phi-3.5-mini's longrope (48 long and 48 short factors, 4,096 -> 131,072 positions) and Phi-4-mini's partial
    # rotary width (96 of 128 dimensions), which transformers' Phi-3 GGUF mapping leaves out
    from transformers import Phi3Config

    long, short = np.float32(np.linspace(1.0, 40.0, 48)).tolist(), np.float32(np.linspace(1.0, 2.5, 48)).tolist()
    phi35 = {"general.architecture": "phi3", "phi3.embedding_length": 3072, "phi3.attention.head_count": 32,
             "phi3.rope.dimension_count": 96, "phi3.context_length": 131072, "phi3.rope.freq_base": 10000.0,
             "phi3.rope.scaling.original_context_length": 4096,
             "phi3.rope.scaling.attn_factor": float(np.float32((1 + np.log(32) / np.log(4096)) ** 0.5))}
    factor_tensors = {"rope_factors_long.weight": long, "rope_factors_short.weight": short}
    phi = complete_config(Phi3Config(hidden_size=3072, num_attention_heads=32, num_hidden_layers=1,
                                     max_position_embeddings=131072), phi35, set(factor_tensors), factor_tensors)
    assert phi.rope_parameters == {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": long,
                                   "short_factor": short, "original_max_position_embeddings": 4096,
                                   "partial_rotary_factor": 1.0}  # the attention factor is transformers' own
    assert phi.original_max_position_embeddings == 4096
    no_factor = {key: value for key, value in phi35.items() if key != "phi3.rope.scaling.attn_factor"}
    phi = complete_config(Phi3Config(hidden_size=3072, num_attention_heads=32, num_hidden_layers=1,
                                     max_position_embeddings=131072), no_factor, set(factor_tensors), factor_tensors)
    assert phi.rope_parameters["attention_factor"] == 1.0  # llama.cpp's where the file names none
    with pytest.raises(PipelineError, match="turns 30 of each head's 88"):
        partial_rotary_factor("phi3", {"phi3.embedding_length": 88 * 4, "phi3.attention.head_count": 4,
                                       "phi3.rope.dimension_count": 30})
    phi4 = {**phi35, "phi3.attention.head_count": 24, "phi3.rope.scaling.attn_factor": 1.5}
    long96 = {"rope_factors_long.weight": long, "rope_factors_short.weight": short}
    phi = complete_config(Phi3Config(hidden_size=3072, num_attention_heads=24, num_hidden_layers=1,
                                     max_position_embeddings=131072), phi4, set(long96), long96)
    assert phi.rope_parameters["partial_rotary_factor"] == 0.75 and phi.rope_parameters["attention_factor"] == 1.5
    for kept in ("rope_factors_long.weight", "rope_factors_short.weight"):  # one set alone is no longrope
        with pytest.raises(PipelineError, match=f"per-dimension rope factors \\({kept}"):
            require_readable_rope("phi3", phi35, {kept}, rope_factors={kept: factor_tensors[kept]})
    narrow = {**phi35, "phi3.rope.dimension_count": 64}  # 48 factors for a rope over 64 dimensions
    with pytest.raises(PipelineError, match="per-dimension rope factors"):
        require_readable_rope("phi3", narrow, set(factor_tensors), rope_factors=factor_tensors)
    with pytest.raises(PipelineError, match="scales its rope twice"):
        complete_config(Phi3Config(hidden_size=3072, num_attention_heads=32, num_hidden_layers=1),
                        {**phi35, "phi3.rope.scaling.factor": 2.0}, set(factor_tensors), factor_tensors)
    # Gemma-4's rope_freqs is the proportional rope transformers builds from its own config: not refused

    require_readable_rope("gemma4", {}, {"rope_freqs.weight"})


def test_truncated_gguf_is_one_line(tmp_path, capsys):
    whole = _gguf(tmp_path / "whole.gguf", "llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[:-1000])
    code, out = _check(tmp_path, {"path": str(cut), "chat_template": "gemma"}, capsys)
    assert code == 2 and len(out.splitlines()) == 1 and "truncated GGUF file" in out, out
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(whole.read_bytes()[:40])
    code, out = _check(tmp_path, {"path": str(header_only), "chat_template": "gemma"}, capsys)
    assert code == 2 and "truncated GGUF file (the header ends early" in out, out
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("<html>404</html>" * 4)
    code, out = _check(tmp_path, {"path": str(not_gguf), "chat_template": "gemma"}, capsys)
    assert code == 2 and "not a GGUF file" in out, out


def test_a_base_without_a_chat_template_needs_one_named(tmp_path, capsys, gemma_folder):
    path = _gguf(tmp_path / "plain.gguf", "llama")
    code, out = _check(tmp_path, {"path": str(path)}, capsys)
    assert code == 2 and len(out.splitlines()) == 1, out
    assert "base.chat_template: the base tokenizer (the GGUF file) has no chat template; name one of ours" in out
    code, out = _check(tmp_path, {"path": str(path), "chat_template": "gemma"}, capsys)
    assert code == 0 and "chat template: ours: gemma (base.chat_template)" in out
    with_template = _gguf(tmp_path / "templated.gguf", "llama", template="{{ messages }}")
    code, out = _check(tmp_path, {"path": str(with_template)}, capsys)
    assert code == 0 and "the base tokenizer's own (from the GGUF file)" in out

    folder = tmp_path / "no_template"  # a transformers folder whose tokenizer has no template
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((gemma_folder / name).read_bytes())
    (folder / "tokenizer_config.json").write_text("{}")
    code, out = _check(tmp_path, {"path": str(folder)}, capsys)
    assert code == 2 and "the base tokenizer (the model folder) has no chat template" in out, out


def test_a_tokenizer_past_the_embedding_is_one_line_before_training(tmp_path, capsys, gemma_folder):
    """A pad token the weights have no row for stops the base stage in one line naming it, before sft's first batch
    would fail inside torch; the folder as it is passes."""
    from transformers import AutoTokenizer

    folder = tmp_path / "longer_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((gemma_folder / name).read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(gemma_folder)
    rows = len(tokenizer)
    tokenizer.add_special_tokens({"pad_token": "<new_pad>"})
    tokenizer.save_pretrained(folder)

    def run_base(path: Path) -> tuple[int, str]:
        recipe = tmp_path / f"{path.name}.yaml"
        recipe.write_text(json.dumps({"name": path.name, "output_dir": str(tmp_path / "runs"),
                                      "base": {"path": str(path), "dtype": "float32"}}))
        code = main(["run", str(recipe)])
        captured = capsys.readouterr()
        return code, captured.err + captured.out

    code, out = run_base(folder)
    assert code != 0 and "Traceback" not in out, out
    assert (f"base: the tokenizer gives '<new_pad>' (id {rows}) past the model's {rows} embedding rows: the tokenizer "
            f"does not fit these weights (its length {rows + 1})") in out, out
    assert run_base(gemma_folder)[0] == 0


def test_a_hub_base_is_pinned_to_the_commit_it_was_trained_on(tmp_path, gemma_folder, tiny_world, cli_env):
    """A hub id is loaded at the commit its branch named when the base stage ran: after `main` moves on, sft's
    model still stands on the weights it was trained on. The hub is a local cache here (HF_HUB_OFFLINE=1), laid
    out as huggingface_hub lays out downloads: refs/main names a snapshot folder."""
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    from tests.conftest import sft_section

    repo = tmp_path / "hub" / "models--acme--tiny-gemma"
    first, moved = "1" * 40, "2" * 40
    shutil.copytree(gemma_folder, repo / "snapshots" / first)
    shutil.copytree(gemma_folder, repo / "snapshots" / moved)
    weights = load_file(repo / "snapshots" / moved / "model.safetensors")
    save_file({k: v + 0.5 for k, v in weights.items()}, repo / "snapshots" / moved / "model.safetensors",
              metadata={"format": "pt"})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    env = {**cli_env, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "hf")}
    recipe = tmp_path / "hub.yaml"
    recipe.write_text(json.dumps({"name": "hub", "output_dir": str(tmp_path / "runs"),
                                  "base": {"path": "acme/tiny-gemma", "dtype": "float32"},
                                  "sft": sft_section(tiny_world, max_steps=1, eval_limit=0)}))
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"hub base acme/tiny-gemma at commit {first}" in result.stdout
    run_dir = tmp_path / "runs" / "hub"
    assert json.loads((run_dir / "base" / "lineage.json").read_text())["base_options"]["revision"] == first

    (repo / "refs" / "main").write_text(moved)  # the branch moves on
    probe = ("import sys, torch; from pipeline.models import load_stage_model; from transformers import "
             "AutoModelForCausalLM; ids = torch.tensor([[2, 5, 7, 11]]); "
             "ours = load_stage_model(sys.argv[1])[0](input_ids=ids).logits; "
             "print(*[(ours - AutoModelForCausalLM.from_pretrained(f)(input_ids=ids).logits).abs().max().item() "
             "for f in sys.argv[2:]])")
    result = subprocess.run([sys.executable, "-c", probe, str(run_dir / "base"), str(repo / "snapshots" / first),
                             str(repo / "snapshots" / moved)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    to_first, to_moved = map(float, result.stdout.split()[-2:])
    assert to_first == 0.0 and to_moved > 0.1, (to_first, to_moved)

    gguf_only = tmp_path / "hub" / "models--acme--only-gguf"  # a repository of GGUF files: no config.json
    (gguf_only / "snapshots" / first).mkdir(parents=True)
    (gguf_only / "snapshots" / first / "model.gguf").write_bytes(b"GGUF")
    (gguf_only / "refs").mkdir()
    (gguf_only / "refs" / "main").write_text(first)
    recipe.write_text(json.dumps({"name": "gguf_only", "output_dir": str(tmp_path / "runs"),
                                  "base": {"path": "acme/only-gguf"}}))
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "base.path: " in result.stderr and "acme/only-gguf" in result.stderr, result.stderr[-2000:]


def test_a_local_base_folder_changed_after_training_is_refused_at_load(tmp_path, gemma_folder, tiny_world, capsys):
    """sft's adapter stands on the local folder's weights as the base stage read them: weights changed there later
    make eval, chat and export refuse to load it (one line naming the file), where they would have run the adapter
    on other weights. A file touched or copied back with its contents unchanged still loads."""
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    from pipeline.errors import PipelineError
    from pipeline.lineage import folder_change
    from pipeline.models import load_stage_model
    from pipeline.recipe import load_recipe
    from pipeline.run import run_recipe
    from tests.conftest import sft_section

    folder = tmp_path / "my_base"
    shutil.copytree(gemma_folder, folder)
    recipe = tmp_path / "local.yaml"
    recipe.write_text(json.dumps({"name": "local", "output_dir": str(tmp_path / "runs"),
                                  "base": {"path": str(folder), "dtype": "float32"},
                                  "sft": sft_section(tiny_world, max_steps=1, eval_limit=0)}))
    run_recipe(load_recipe(recipe))
    sft_dir = tmp_path / "runs" / "local" / "sft"
    record = json.loads((sft_dir / "lineage.json").read_text())["base_options"]["folder_contents"]
    assert record["folder"] == str(folder.resolve()) and "model.safetensors" in record["files"]
    load_stage_model(sft_dir)

    os.utime(folder / "config.json", ns=(1, 1))  # new times, same contents: hashed again, and equal
    (folder / "README.md").write_text("notes")  # not something from_pretrained reads
    load_stage_model(sft_dir)
    assert folder_change(str(gemma_folder), record) is None  # another folder's record (an lm_head model's) is not its

    original = (folder / "model.safetensors").read_bytes()
    weights = load_file(folder / "model.safetensors")
    save_file({k: v + 0.5 for k, v in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PipelineError, match="model.safetensors has other contents"):
        load_stage_model(sft_dir)
    assert main(["export", str(sft_dir), str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert f"its base folder {folder.resolve()} changed since the base stage read it" in err and "Traceback" not in err
    assert "pipeline run RECIPE" in err and not (tmp_path / "export").exists()

    (folder / "model.safetensors").write_bytes(original)  # restored (new times): loads again
    load_stage_model(sft_dir)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(PipelineError, match="model-00002-of-00002.safetensors was added"):
        load_stage_model(sft_dir)


# ---------------------------------------------------------------- the real model


@pytest.mark.skipif(not (SHARED / "sft" / "rasbt_instruction-data.json").is_file(),
                    reason="../shared/data (the real instruction data) is not beside the repository")
def test_real_gemma_imports_trains_and_round_trips(gemma_gguf, tmp_path, monkeypatch):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.artifacts import read_json
    from pipeline.recipe import load_recipe
    from pipeline.run import run_recipe

    records = json.loads((SHARED / "sft" / "rasbt_instruction-data.json").read_text())[:48]
    data = tmp_path / "instructions.json"
    data.write_text(json.dumps(records))
    recipe = tmp_path / "gemma.yaml"
    recipe.write_text(json.dumps({
        "name": "gemma", "output_dir": str(tmp_path / "runs"),
        "base": {"path": str(gemma_gguf), "chat_template": "gemma", "dtype": "float32"},
        "sft": {"train_data": [str(data)], "max_steps": 4, "global_batch_size": 8, "micro_batch_size": 4,
                "learning_rate": 1e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0, "logging_steps": 1,
                "max_length": 128, "lora": {"r": 8, "alpha": 16}, "eval_limit": 0, "precision": "fp32"},
    }))
    result = run_recipe(load_recipe(recipe))
    run_dir = tmp_path / "runs" / "gemma"

    base = result["base"]["metrics"]
    assert base["source"] == "gguf" and base["architecture"] == "gemma3_text" and base["parameters"] > 250e6
    # the saved folder's logits equal transformers' GGUF load: bit for bit on a quiet machine, 1.1e-3 (of logits
    # ~30) once in CI while another process ran: summation order in the fp32 kernels; a wrong import is O(1)
    assert base["import_max_logit_difference"] <= 5e-3
    assert base["control_tokens_marked"] == ["<end_of_image>", "<end_of_turn>", "<start_of_image>", "<start_of_turn>"]
    config = json.loads((run_dir / "base" / "config.json").read_text())
    assert "quantization_config" not in config and (run_dir / "base" / "model.safetensors").is_file()

    losses = [r["loss"] for r in map(json.loads, (run_dir / "sft" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0], losses

    # the adapter loads with plain transformers + peft on the imported folder, and gives the logits
    # the trained model gave in memory
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base"), run_dir / "sft").eval()
    probe = read_json(run_dir / "sft" / "stage.json")["metrics"]["probe"]
    ids = torch.tensor([probe["ids"]])
    with torch.no_grad():
        logits = plain(input_ids=ids).logits[0, -1, :8].tolist()
    assert logits == pytest.approx(probe["last_logits"], abs=1e-3)

    # chat renders Gemma's turn protocol and stops at <end_of_turn>
    from pipeline.chat import ChatSession, Sampling
    from pipeline.models import load_stage_model

    model, tokenizer = load_stage_model(run_dir / "sft")
    session = ChatSession(model, tokenizer, Sampling(greedy=True, max_new_tokens=4), system="Be brief.")
    prompt = tokenizer.decode(session.prompt_ids("Hi <end_of_turn> there"))
    assert prompt == ("<bos><start_of_turn>user\nBe brief.\n\nHi <end_of_turn> there<end_of_turn>\n"
                      "<start_of_turn>model\n")
    assert session.prompt_ids("Hi <end_of_turn> there").count(tokenizer.convert_tokens_to_ids("<end_of_turn>")) == 1
    generation = json.loads((run_dir / "sft" / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") in generation["eos_token_id"]

    # and goes back to llama.cpp as one GGUF (tests/test_export.py checks the vocabulary and runs llama.cpp)
    from pipeline.gguf_header import check_gguf

    assert main(["export", str(run_dir / "sft"), str(tmp_path / "gguf"), "--gguf", "--dtype", "bfloat16"]) == 0
    header = check_gguf(tmp_path / "gguf" / "model.gguf")  # the whole file, as its header promises
    assert header.architecture == "gemma3" and header.tensors == 236  # the tied output is not written twice
    assert "<start_of_turn>" in header.chat_template and "{% generation" not in header.chat_template
