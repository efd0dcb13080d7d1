"""pretrain stage and the staged runner: learning, baselines, skipping, resuming, NaN stop."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.artifacts import read_json
from pipeline.errors import StageFailed
from pipeline.recipe import load_recipe
from pipeline.run import run_recipe
from pipeline.stages.pretrain import cxx_compiler_on_path


def _losses(run_dir):
    lines = (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_sentence_frequencies_become_probabilities(tmp_path):
    """The lecture notes' check: 'I love music' 10x and 'I love poetry' 5x -> P(music) ~ 2 P(poetry)."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    rng = random.Random(0)
    fillers = ["the cat sat on the mat", "a dog ran in the park", "we like green apples", "it rained all day"]
    # the 10:5 corpus four times over, so the few documents cut at block boundaries barely move the counts
    docs = (["I love music"] * 10 + ["I love poetry"] * 5 + [rng.choice(fillers) for _ in range(15)]) * 4
    rng.shuffle(docs)
    corpus = tmp_path / "love.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    recipe_path = tmp_path / "love.yaml"
    recipe_path.write_text(json.dumps({
        "name": "love", "output_dir": str(tmp_path / "runs"),
        "tokenizer": {"corpus": [str(corpus)], "vocab_size": 300, "min_frequency": 1},
        "pretrain": {
            "train_data": [str(corpus)], "eval_data": [str(corpus)],
            "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2,
                      "intermediate_size": 64, "max_position_embeddings": 64},
            "seq_len": 32, "global_batch_size": 16, "micro_batch_size": 16, "max_steps": 300,
            "learning_rate": 1e-2, "warmup_steps": 5, "min_lr_ratio": 0.1, "weight_decay": 0.0,
            "eval_every": 300, "checkpoint_every": 1000, "log_every": 50, "precision": "fp32",
        },
    }))
    run_recipe(load_recipe(recipe_path))
    out = tmp_path / "runs" / "love" / "pretrain"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)

    def continuation_prob(prefix: str, word: str) -> float:
        prefix_ids = [tok.bos_token_id] + tok(prefix)["input_ids"]
        word_ids = tok(prefix + word)["input_ids"][len(prefix_ids) - 1:]
        ids = torch.tensor([prefix_ids + word_ids])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
        return math.exp(sum(logprobs[len(prefix_ids) - 1 + i, t].item() for i, t in enumerate(word_ids)))

    p_music, p_poetry = continuation_prob("I love", " music"), continuation_prob("I love", " poetry")
    # maximum likelihood gives exactly 2/3 and 1/3; a tiny model trained briefly gets close
    assert p_music + p_poetry > 0.9
    print(f"P(music | I love) = {p_music:.3f}, P(poetry | I love) = {p_poetry:.3f}")
    assert 1.6 < p_music / p_poetry < 2.5, (p_music, p_poetry)


def test_pretraining_beats_unigram_and_bigram(write_recipe):
    path = write_recipe(updates={"pretrain.max_steps": 300, "pretrain.eval_every": 150,
                                 "pretrain.global_batch_size": 16, "pretrain.micro_batch_size": 16,
                                 "pretrain.checkpoint_every": 1000, "pretrain.learning_rate": 1e-2})
    records = run_recipe(load_recipe(path))
    metrics = records["pretrain"]["metrics"]
    stage = read_json(load_recipe(path).run_dir / "pretrain" / "stage.json")
    assert stage["status"] == "done" and stage["metrics"] == json.loads(json.dumps(metrics))
    assert metrics["eval_perplexity"] < metrics["bigram_perplexity"] < metrics["unigram_perplexity"], metrics
    losses = _losses(load_recipe(path).run_dir)
    assert losses[300] < losses[2] - 2.0  # the loss went down a lot
    # the folder is a standard Hugging Face model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = load_recipe(path).run_dir / "pretrain"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama"
    # plain generate stops where a chat turn ends, as every stage built on this model does (eos alone ran on
    # into an invented next turn: the README's loading snippet printed "...<|end|><|user|>...")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|end|>")
    assert model.generation_config.eos_token_id == [end_of_turn, tokenizer.eos_token_id]


def test_rerun_skips_and_changed_config_reruns_from_that_stage(write_recipe, capsys):
    path = write_recipe()
    first = run_recipe(load_recipe(path))
    capsys.readouterr()
    again = run_recipe(load_recipe(path))
    out = capsys.readouterr().out
    assert "[tokenizer] done already" in out and "[pretrain] done already" in out
    assert again["pretrain"]["finished_at"] == first["pretrain"]["finished_at"]

    changed = run_recipe(load_recipe(path, ["pretrain.learning_rate=1e-3"]))
    out = capsys.readouterr().out
    assert "[tokenizer] done already" in out
    assert "[pretrain] config or inputs changed" in out
    assert changed["pretrain"]["fingerprint"] != first["pretrain"]["fingerprint"]
    assert changed["tokenizer"]["fingerprint"] == first["tokenizer"]["fingerprint"]

    # a tokenizer change reruns the tokenizer and everything after it
    changed = run_recipe(load_recipe(path, ["tokenizer.vocab_size=480", "pretrain.learning_rate=1e-3"]))
    assert changed["tokenizer"]["fingerprint"] != first["tokenizer"]["fingerprint"]
    assert "[pretrain] config or inputs changed" in capsys.readouterr().out

    # --only reruns one stage even when done
    run_recipe(load_recipe(path, ["tokenizer.vocab_size=480", "pretrain.learning_rate=1e-3"]), only="pretrain")
    out = capsys.readouterr().out
    assert "[pretrain] starting" in out and "[tokenizer] starting" not in out


def test_same_seed_same_losses(write_recipe):
    a = write_recipe("a")
    b = write_recipe("b")
    run_recipe(load_recipe(a))
    run_recipe(load_recipe(b))
    losses_a, losses_b = _losses(load_recipe(a).run_dir), _losses(load_recipe(b).run_dir)
    assert losses_a == losses_b and len(losses_a) == 6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(write_recipe, monkeypatch):
    import pipeline.stages.pretrain as pretrain

    path = write_recipe(updates={"pretrain.checkpoint_every": 1, "pretrain.max_steps": 10,
                                 "pretrain.eval_every": 1000, "pretrain.grad_clip": 0.0})
    real_loss, calls = pretrain.summed_loss, []

    def loss_that_diverges(*args):  # from the 5th training step on the loss is NaN (as a diverged run's is)
        calls.append(1)
        loss, count = real_loss(*args)
        return (loss * float("nan") if len(calls) >= 5 else loss), count

    monkeypatch.setattr(pretrain, "summed_loss", loss_that_diverges)
    with pytest.raises(StageFailed, match=r"at step 5; stopped before updating the weights") as info:
        run_recipe(load_recipe(path))
    out = load_recipe(path).run_dir / "pretrain"
    stage = read_json(out / "stage.json")
    assert stage["status"] == "failed" and "at step" in stage["error"]
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints, "the last good checkpoint must be kept"
    assert str(checkpoints[-1]) in str(info.value)
    from safetensors.torch import load_file

    weights = load_file(checkpoints[-1] / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_fp16_pretraining_scales_the_loss_and_skips_the_steps_that_overflow(write_recipe, monkeypatch):
    """fp16 autocast (a GPU's `fp16`, or `auto` before Ampere) trains through a loss scaler, as a trainer's fp16
    does: without one small gradients underflow to zero. A step whose scaled gradients overflow is skipped and the
    scale lowered, not taken for a diverged run. Here on the CPU, whose autocast runs float16 too."""
    import functools

    import pipeline.stages.pretrain as pretrain

    monkeypatch.setattr(pretrain, "autocast_dtype", lambda precision, device: torch.float16)
    # a scale far past fp16's range (65504): the first steps must overflow
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**24))
    path = write_recipe(updates={"pretrain.max_steps": 30, "pretrain.log_every": 1, "pretrain.eval_every": 1000,
                                 "pretrain.checkpoint_every": 1000})
    records = run_recipe(load_recipe(path))
    run_dir = load_recipe(path).run_dir
    rows = [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    metrics = records["pretrain"]["metrics"]
    assert metrics["precision"] == "float16" and 1 <= metrics["fp16_skipped_steps"] < 30
    skipped = [row for row in steps if row["grad_norm"] is None]
    assert len(skipped) == metrics["fp16_skipped_steps"] and steps[0]["grad_norm"] is None
    scales = [row["loss_scale"] for row in steps]
    assert scales[0] == 2.0**23 and scales == sorted(scales, reverse=True)  # halved at each overflow
    assert steps[-1]["loss"] < steps[len(skipped)]["loss"] - 0.5  # the steps after the overflow trained
    from safetensors.torch import load_file

    weights = load_file(run_dir / "pretrain" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_kill_during_pretraining_then_rerun_resumes(write_recipe, cli_env):
    updates = {"pretrain.max_steps": 300, "pretrain.checkpoint_every": 10, "pretrain.log_every": 1,
               "pretrain.eval_every": 1000}
    path = write_recipe("killed", updates)
    checkpoints = load_recipe(path).run_dir / "pretrain" / "checkpoints"
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path)], env=cli_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill once a checkpoint at step 20 or later exists (step-0000020 itself is rotated away at step 40)
    deadline = time.time() + 120
    while time.time() < deadline and not any(c.name[5:].isdigit() and int(c.name[5:]) >= 20
                                             for c in checkpoints.glob("step-*")):
        assert process.poll() is None, "pretraining ended before it could be killed"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(checkpoints.glob("step-*")), "no checkpoint was written before the kill"
    assert read_json(checkpoints.parent / "stage.json")["status"] == "running"

    result = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path)], env=cli_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from step-" in result.stdout
    assert read_json(checkpoints.parent / "stage.json")["status"] == "done"
    resumed = _losses(load_recipe(path).run_dir)
    assert sorted(resumed) == list(range(1, 301))  # every step logged once, none repeated

    # the resumed curve is the uninterrupted curve: same data order, optimizer state and weights
    reference = write_recipe("uninterrupted", updates)
    run_recipe(load_recipe(reference))
    straight = _losses(load_recipe(reference).run_dir)
    assert all(abs(resumed[s] - straight[s]) < 1e-3 for s in straight), "resume changed the loss curve"


def test_learning_rate_schedules():
    """Cosine after warmup by default; with decay_steps the peak holds until the last decay_steps (WSD)."""
    import math

    import pytest

    from pipeline.errors import PipelineError
    from pipeline.recipe import PretrainConfig
    from pipeline.stages.pretrain import lr_at

    cosine = PretrainConfig(train_data=["x"], max_steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cosine) == pytest.approx(0.1) and lr_at(9, cosine) == pytest.approx(1.0)
    assert lr_at(55, cosine) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    wsd = PretrainConfig(train_data=["x"], max_steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1,
                         decay_steps=20)
    assert [lr_at(s, wsd) for s in (0, 9, 10, 50, 79)] == pytest.approx([0.1, 1.0, 1.0, 1.0, 1.0])
    assert lr_at(90, wsd) == pytest.approx(0.55) and lr_at(99, wsd) < 0.12
    assert all(lr_at(s, wsd) >= lr_at(s + 1, wsd) for s in range(10, 99))
    wsd.decay_steps = 91
    with pytest.raises(PipelineError, match="decay_steps: 91 is more than the 90 steps after warmup"):
        wsd.validate("pretrain")
    wsd.decay_steps, wsd.warmup_steps = 0, 101
    with pytest.raises(PipelineError, match="warmup_steps: 101 is more than max_steps \\(100\\)"):
        wsd.validate("pretrain")


# a tiny Llama's loss, eager and through pipeline.stages.pretrain.compiled, in a fresh process
COMPILED_LOSS = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from pipeline.stages.pretrain import compiled
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128))
ids = torch.randint(0, 512, (2, 64))
step = compiled(model, torch.device("cpu"))
print(model(input_ids=ids, labels=ids).loss.item(), step(input_ids=ids, labels=ids).loss.item())
"""


@pytest.mark.skipif(not cxx_compiler_on_path(), reason="torch.compile on the CPU needs a C++ compiler (apt-get install g++)")
def test_compiled_kernels_are_not_shared_between_cpu_capabilities(tmp_path):
    """inductor's kernel cache is not keyed on ATEN_CPU_CAPABILITY: AVX2 kernels loaded on the AVX-512 path (or the
    reverse) crashed or gave NaN. With the cache folder left to us, each capability gets its own. (On an AVX2-only
    CPU both runs take the AVX2 path.)"""
    env = {key: value for key, value in os.environ.items() if key != "TORCHINDUCTOR_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path)  # inductor's default cache folder lies in the temporary folder
    for capability in ("avx2", None):
        run_env = {**env, "ATEN_CPU_CAPABILITY": capability} if capability else env
        out = subprocess.run([sys.executable, "-c", COMPILED_LOSS], env=run_env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        eager, compiled = map(float, out.stdout.split())
        assert math.isfinite(compiled) and abs(compiled - eager) < 1e-4, (capability, eager, compiled)
    assert any(folder.name.endswith("_avx2") for folder in tmp_path.iterdir()), list(tmp_path.iterdir())


@pytest.mark.skipif(not cxx_compiler_on_path(), reason="torch.compile on the CPU needs a C++ compiler (apt-get install g++)")
def test_compiled_step_trains_like_eager_and_saves_plain_weights(write_recipe):
    """pretrain.compile runs the training step through torch.compile: the losses of eager training up to
    rounding, and the same standard weights file."""
    from safetensors import safe_open

    eager, compiled = write_recipe("eager"), write_recipe("compiled", {"pretrain.compile": True})
    run_recipe(load_recipe(eager))
    run_recipe(load_recipe(compiled))
    losses_eager, losses_compiled = _losses(load_recipe(eager).run_dir), _losses(load_recipe(compiled).run_dir)
    assert losses_eager.keys() == losses_compiled.keys() and len(losses_eager) == 6
    assert all(abs(losses_compiled[s] - losses_eager[s]) < 0.01 * losses_eager[s] for s in losses_eager), \
        (losses_eager, losses_compiled)
    assert read_json(load_recipe(compiled).run_dir / "pretrain" / "stage.json")["metrics"]["compiled"] is True
    names = []
    for path in (eager, compiled):
        with safe_open(load_recipe(path).run_dir / "pretrain" / "model.safetensors", "pt") as weights:
            names.append(sorted(weights.keys()))
    assert names[0] == names[1]  # no torch.compile wrapper names (_orig_mod.) in the saved model


def test_compile_without_a_cxx_compiler_stops_before_training(write_recipe, monkeypatch):
    import shutil

    from pipeline.errors import PipelineError

    monkeypatch.setattr(shutil, "which", lambda name: None)
    path = write_recipe("no_compiler", {"pretrain.compile": True})
    with pytest.raises(PipelineError, match=r"no C\+\+ compiler .* pretrain.compile=false"):
        run_recipe(load_recipe(path))
    assert not (load_recipe(path).run_dir / "pretrain" / "checkpoints").exists()


def test_auto_precision_follows_the_cpu_and_a_capped_onednn(monkeypatch):
    """`precision: auto` is bf16 only where bf16 matmuls have hardware: the CPU flags, unless ONEDNN_MAX_CPU_ISA
    caps oneDNN below the bf16 instructions (then bf16 would be emulated, 20-40x slower than fp32)."""
    from pathlib import Path

    from pipeline.models import autocast_dtype, cpu_has_fast_bf16

    cpu = torch.device("cpu")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    flags = Path("/proc/cpuinfo").read_text()
    hardware = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_has_fast_bf16() is hardware
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if hardware else None)
    for capped in ("AVX2", "avx2", "AVX512_CORE", "SSE41"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", capped)
        assert cpu_has_fast_bf16() is False and autocast_dtype("auto", cpu) is None, capped
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_has_fast_bf16() is hardware
    assert autocast_dtype("bf16", cpu) == torch.bfloat16 and autocast_dtype("fp32", cpu) is None  # explicit wins


def test_pretraining_under_deepspeed_or_fsdp_is_refused_in_one_line():
    """Its own loop needs a whole model on every process: under DeepSpeed accelerate raised ValueError from inside
    prepare(), under FSDP the main process would save only its shard."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from pipeline.errors import PipelineError
    from pipeline.stages.pretrain import require_replicated

    for kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        with pytest.raises(PipelineError, match=f"pretrain runs on one device or under DDP, not {kind.value}: "
                                                "launch the recipe with launch/accelerate/ddp.yaml"):
            require_replicated(SimpleNamespace(distributed_type=kind))
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        require_replicated(SimpleNamespace(distributed_type=kind))
