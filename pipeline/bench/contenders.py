"""The contenders: our stages as users run them, TRL's trainers with their defaults, plain loops.

Each contender trains once on the shared workload (pipeline/bench/workload.py) and returns
{"units": tokens or pairs processed, "seconds": time spent on them}. For sft and dpo every
clock covers the same span, from data records and a loaded model in memory to the end of
training, so tokenization and trainer set-up (TRL tokenizes inside its constructor; precomputed
reference log-probs happen there too) count for everyone; our stages also read their data files
inside it. For pretrain both clocks cover the training loop. Model loading and imports never count.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from pipeline.bench.workload import BATCH, SLOW_SUBSET, read_jsonl, start_stage, trial_run_dir


def _recipe(workdir: Path, name: str, overrides: list[str] = ()):
    from pipeline.recipe import load_recipe

    return load_recipe(workdir / "bench.yaml", [f"name={name}", *overrides])


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _synchronize() -> None:
    """CUDA runs asynchronously: a clock read before the queue drains would stop early."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _slow_bf16(fp32: bool) -> bool:
    """TRL's default bf16 on a CPU without bf16 hardware runs ~20-40x slower than fp32 (measured):
    such a trial measures its rate on the first SLOW_SUBSET examples, or it would take many minutes."""
    from pipeline.models import cpu_has_fast_bf16

    return not fp32 and _device_type() == "cpu" and not cpu_has_fast_bf16()


# ---------------------------------------------------------------- ours: the real stages


def ours(task: str, workdir: Path, trial: int) -> dict:
    """Our stage through the same entry point as `pipeline run RECIPE --only TASK [key=value ...]`;
    the bench's --set overrides arrive in PIPELINE_BENCH_SET (one per line)."""
    import os

    from pipeline.run import run_recipe

    overrides = [line for line in os.environ.get("PIPELINE_BENCH_SET", "").splitlines() if line]
    run_dir = trial_run_dir(workdir, task, trial)
    record = run_recipe(_recipe(workdir, run_dir.name, overrides), only=task)[task]
    metrics = record["metrics"]
    if task == "pretrain":
        logged = read_jsonl(run_dir / "pretrain" / "metrics.jsonl")
        rate = [r for r in logged if "tokens_per_s" in r][-1]["tokens_per_s"]  # over the whole loop
        tokens = metrics["steps"] * metrics["tokens_per_step"]
        return {"units": tokens, "seconds": tokens / rate}
    units = (metrics["input_tokens"] if task == "sft" else metrics["pairs"]) * record["config"]["epochs"]
    return {"units": units, "seconds": metrics["tokenize_s"] + metrics["train_s"]}


# ---------------------------------------------------------------- pretrain: a plain PyTorch loop


def plain_pretrain(workdir: Path, trial: int) -> dict:
    """Forward, backward, AdamW over the same packed blocks in the same order, same precision."""
    from transformers import AutoTokenizer

    from pipeline.models import autocast_dtype, build_model
    from pipeline.stages.pretrain import global_batch, prepare_blocks

    recipe = _recipe(workdir, f"plain-{trial}")
    cfg = recipe.pretrain
    tokenizer_dir = workdir / "runs" / "setup" / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    no_processes = SimpleNamespace(main_process_first=contextlib.nullcontext)
    blocks, _ = prepare_blocks(cfg, tokenizer, tokenizer_dir, workdir / "runs" / "plain-cache", recipe.seed,
                               no_processes)
    device = torch.device(_device_type())
    model = build_model(cfg.model, tokenizer, recipe.seed).to(device)
    dtype = autocast_dtype(cfg.precision, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    model.train()
    started = time.perf_counter()
    for step in range(cfg.max_steps):
        rows = global_batch(step, cfg.global_batch_size, len(blocks), recipe.seed)
        ids, pos = blocks.input_ids[rows].to(device), blocks.position_ids[rows].to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _synchronize()
    seconds = time.perf_counter() - started
    return {"units": cfg.max_steps * cfg.global_batch_size * cfg.seq_len, "seconds": seconds}


# ---------------------------------------------------------------- sft


def _pretrained(workdir: Path):
    """The starting model as a user of TRL or a plain loop loads it: our pretrained model, or the imported
    real base (saved in float32, transformers' default load; TRL's bf16 default autocasts it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = workdir / "runs" / "setup" / start_stage(workdir)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(source)


def _lora(workdir: Path, stage: str):
    from pipeline.models import lora_config

    return lora_config(getattr(_recipe(workdir, "lora"), stage).lora)


def _chats(workdir: Path) -> list[dict]:
    return read_jsonl(workdir / "sft_chats.jsonl")


def trl_sft(workdir: Path, trial: int, fp32: bool) -> dict:
    """TRL's SFTTrainer with its default settings (use_cpu without a GPU; bf16=False when `fp32`)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _pretrained(workdir)
    chats = _chats(workdir)[: SLOW_SUBSET if _slow_bf16(fp32) else None]
    dataset = Dataset.from_list([{"messages": c["messages"]} for c in chats])
    started = time.perf_counter()
    args = SFTConfig(output_dir=str(workdir / "runs" / f"trl-sft-{trial}"), use_cpu=_device_type() == "cpu",
                     num_train_epochs=1, **({"bf16": False} if fp32 else {}))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=_lora(workdir, "sft"))
    trainer.train()
    _synchronize()
    seconds = time.perf_counter() - started
    return {"units": sum(len(ids) for ids in trainer.train_dataset["input_ids"]), "seconds": seconds,
            "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing, "subset": _slow_bf16(fp32)}


def plain_sft(workdir: Path, trial: int) -> dict:
    """A plain LoRA loop: our rendered conversations, shuffled, padded per batch, AdamW."""
    from peft import get_peft_model

    from pipeline.chat_template import ChatRenderer
    from pipeline.stages.sft import tokenize_conversations

    cfg = _recipe(workdir, "plain").sft
    model, tokenizer = _pretrained(workdir)
    device = torch.device(_device_type())
    model = get_peft_model(model, _lora(workdir, "sft")).to(device)
    started = time.perf_counter()
    rows, _ = tokenize_conversations(_chats(workdir), ChatRenderer(tokenizer), cfg)
    random.Random(trial).shuffle(rows)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    model.train()
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        width = max(r["length"] for r in batch)
        ids = torch.tensor([r["input_ids"] + [tokenizer.pad_token_id] * (width - r["length"]) for r in batch])
        labels = torch.tensor([r["labels"] + [-100] * (width - r["length"]) for r in batch])
        mask = torch.tensor([[1] * r["length"] + [0] * (width - r["length"]) for r in batch])
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _synchronize()
    seconds = time.perf_counter() - started
    return {"units": sum(r["length"] for r in rows), "seconds": seconds}


# ---------------------------------------------------------------- dpo


def trl_dpo(workdir: Path, trial: int, fp32: bool) -> dict:
    """TRL's DPOTrainer with its default settings on the SFT model, with a LoRA adapter (reference =
    adapter off), as TRL's docs show it."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = _pretrained(workdir)
    model = PeftModel.from_pretrained(model, workdir / "runs" / "setup" / "sft").merge_and_unload()
    pairs = read_jsonl(workdir / "dpo_pairs.jsonl")
    pairs = pairs[: SLOW_SUBSET if _slow_bf16(fp32) else None]
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    started = time.perf_counter()
    epochs = _recipe(workdir, "epochs").dpo.epochs
    args = DPOConfig(output_dir=str(workdir / "runs" / f"trl-dpo-{trial}"), use_cpu=_device_type() == "cpu",
                     num_train_epochs=epochs, **({"bf16": False} if fp32 else {}))
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=_lora(workdir, "dpo"))
    trainer.train()
    _synchronize()
    seconds = time.perf_counter() - started
    return {"units": len(dataset) * epochs, "seconds": seconds, "bf16": args.bf16,
            "gradient_checkpointing": args.gradient_checkpointing, "subset": _slow_bf16(fp32)}


CONTENDERS = {
    "pretrain": {
        "ours": lambda w, t: ours("pretrain", w, t),
        "plain loop": plain_pretrain,
    },
    "sft": {
        "ours": lambda w, t: ours("sft", w, t),
        "TRL defaults": lambda w, t: trl_sft(w, t, fp32=False),
        "TRL defaults, fp32": lambda w, t: trl_sft(w, t, fp32=True),
        "plain loop": plain_sft,
    },
    "dpo": {
        "ours": lambda w, t: ours("dpo", w, t),
        "TRL defaults": lambda w, t: trl_dpo(w, t, fp32=False),
        "TRL defaults, fp32": lambda w, t: trl_dpo(w, t, fp32=True),
    },
}
