"""sft stage: LoRA instruction fine-tuning through TRL's SFTTrainer, loss on assistant tokens only.

We render and mask conversations ourselves (pipeline/chat_template.py) and hand TRL ready
`input_ids` + `labels`: TRL would otherwise render with the tokenizer, which turns a typed
"<|end|>" in user text into a control token. The trainer does the rest (loop, accumulation,
checkpoints, resume).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pipeline.chat_template import ChatRenderer
from pipeline.config_schema import reads
from pipeline.data.cache import cached_rows, tokenizer_key
from pipeline.data.readers import read_records
from pipeline.data.split import split_held_out
from pipeline.distributed import require_ranks_agree, whole_state_dict
from pipeline.errors import PipelineError
from pipeline.evaluation import SCORED_FIELDS, HeldOut, Settings, evaluate_model, summary
from pipeline.generation import stop_token_ids, within_context
from pipeline.lineage import write_lineage
from pipeline.models import count_parameters, lineage_of, load_stage_model, lora_config, require_lora_targets
from pipeline.recipe import SftConfig, ceiling_note, split_batch
from pipeline.trainer_args import (
    ChecksumOnSave,
    MetricsLog,
    SameBatchesOnAnyTopology,
    StopOnNonFinite,
    common_trainer_kwargs,
    fp32_ceiling_note,
    micro_batch_ceiling,
    resume_checkpoint,
)

# ---------------------------------------------------------------- data


def load_conversations(files: list[str], fmt: str, on_bad: str, keep=()) -> tuple[list[dict], dict]:
    records, report = [], {"dropped": {}, "duplicates": 0, "files": {}}
    for file in files:
        result = read_records(file, "conversation", fmt, on_bad=on_bad, keep=keep)
        records += result.records
        report["files"][file] = {"format": result.format, "records": len(result.records)}
        report["duplicates"] += result.duplicates
        for reason, count in result.dropped.items():
            report["dropped"][reason] = report["dropped"].get(reason, 0) + count
    return records, report


def tokenize_conversations(records: list[dict], renderer: ChatRenderer, cfg: SftConfig) -> tuple[list[dict], dict]:
    """input_ids + labels (-100 off the assistant tokens), applying the duplicate and length policies."""
    rows, seen = [], set()
    counts = {"duplicates_dropped": 0, "too_long_dropped": 0, "too_long_truncated": 0, "no_trained_tokens": 0}
    for record in records:
        key = json.dumps(record["messages"], sort_keys=True)
        if cfg.duplicates == "drop" and key in seen:
            counts["duplicates_dropped"] += 1
            continue
        seen.add(key)
        rendered = renderer.render(record["messages"])
        ids, mask = rendered.input_ids, rendered.assistant_mask
        if len(ids) > cfg.max_length:
            if cfg.too_long == "drop":
                counts["too_long_dropped"] += 1
                continue
            ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
            counts["too_long_truncated"] += 1
        if not any(mask):
            counts["no_trained_tokens"] += 1  # truncation cut every assistant token
            continue
        rows.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)], "length": len(ids)})
    return rows, counts


def split_conversations(cfg: SftConfig, seed: int) -> tuple[list[dict], dict, list[dict]]:
    """(training records, read report, held-out records): eval_data, or eval_split of train_data."""
    # format and bad-record policy as the fields declare them (recipe.py), so `check` reads them the same way
    records, report = load_conversations(cfg.train_data, *reads(cfg, "train_data")[1:], keep=SCORED_FIELDS)
    if cfg.eval_data:
        return records, report, load_conversations(cfg.eval_data, *reads(cfg, "eval_data")[1:], keep=SCORED_FIELDS)[0]
    train, held = split_held_out(records, cfg.eval_split, seed)
    report["held_out"] = {"fraction": cfg.eval_split, "seed": seed, "records": len(held)}
    return train, report, held


def prepare_rows(cfg: SftConfig, renderer: ChatRenderer, seed: int) -> tuple[list[dict], dict]:
    """Read, check and tokenize the training conversations (run once per run: see data/cache.py)."""
    started = time.perf_counter()
    records, report, _ = split_conversations(cfg, seed)
    rows, counts = tokenize_conversations(records, renderer, cfg)
    if records and counts["too_long_dropped"] == len(records):
        raise PipelineError(f"sft: every one of the {len(records):,} conversations is longer than sft.max_length "
                            f"({cfg.max_length} tokens); raise it, or set sft.too_long: truncate")
    if not rows:
        raise PipelineError(f"sft: no trainable conversations left ({counts})")
    return rows, {
        "report": report,
        "counts": counts,
        "trained_tokens": sum(sum(1 for t in r["labels"] if t != -100) for r in rows),
        "input_tokens": sum(r["length"] for r in rows),
        "tokenize_s": time.perf_counter() - started,
    }


# ---------------------------------------------------------------- model


def load_model_and_tokenizer(ctx, cfg: SftConfig, device_type: str):
    """The model to adapt: the output of the pretrain or base stage (one loader for both), and the
    lineage that the adapter will extend."""
    parent = ctx.output_of("base" if ctx.recipe.base is not None else "pretrain")
    quantization = _quantization_config(cfg, device_type)
    model, tokenizer = load_stage_model(parent, quantization=quantization)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, tokenizer, parent


def _quantization_config(cfg: SftConfig, device_type: str):
    if cfg.quantization == "none":
        return None
    if device_type != "cuda":
        # On the CPU, bitsandbytes repacks 4-bit weights in place after any eval forward or generate()
        # and later LoRA gradients come out wrong with only a warning (see ../shared/env-notes.md).
        raise PipelineError("sft.quantization=4bit (QLoRA) needs a CUDA GPU; on this machine use "
                            "sft.quantization=none (plain LoRA)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def attach_lora(model, cfg: SftConfig, accelerator=None):
    from peft import get_peft_model

    # Under ZeRO-3 the adapters take the base's dtype, as TRL's SFTTrainer does when it makes them (trl#6089):
    # ZeRO-3 gathers parameters into buffers of the first one's dtype, so peft's fp32 adapters beside a bf16 base
    # raise TypeError at the first optimizer step. A 4-bit base keeps them fp32 (QLoRA needs it).
    plugin = accelerator.state.deepspeed_plugin if accelerator is not None else None
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    base_dtype = plugin is not None and plugin.zero_stage == 3 and not quantized
    return get_peft_model(model, lora_config(cfg.lora), **({"autocast_adapter_dtype": False} if base_dtype else {}))


# ---------------------------------------------------------------- evaluation


def heldout(model, tokenizer, records: list[dict], cfg: SftConfig, seed: int, accelerator) -> dict:
    """Every metric that applies to the held-out conversations (pipeline/evaluation.py), with examples."""
    if not records:
        return {}
    settings = Settings(max_new_tokens=cfg.max_new_tokens, seed=seed, batch_size=cfg.generation_batch_size)
    result = evaluate_model(model, tokenizer, HeldOut(conversations=records), settings, accelerator)
    return {**result.metrics, "examples": result.examples(records)}


# ---------------------------------------------------------------- the stage


def run(cfg: SftConfig, ctx) -> dict:
    from trl import SFTConfig, SFTTrainer

    class Trainer(StopOnNonFinite, SameBatchesOnAnyTopology, SFTTrainer):
        stage_name = "sft"

    accelerator, seed = ctx.accelerator, ctx.recipe.seed
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    world = accelerator.num_processes
    base_dtype = ctx.recipe.base.dtype if ctx.recipe.base else "auto"
    ceiling = micro_batch_ceiling(cfg, base_dtype, device_type)
    split = split_batch("sft", cfg.global_batch_size, ceiling, world)

    # model and data
    model, tokenizer, parent = load_model_and_tokenizer(ctx, cfg, device_type)
    require_lora_targets(model, cfg.lora, "sft")
    cfg = within_context(cfg, "max_length", model, ctx.log)
    renderer = ChatRenderer(tokenizer)
    train_set, data = cached_rows(accelerator, ctx.out_dir / "cache" / "train", tokenizer_key(tokenizer),
                                  lambda: prepare_rows(cfg, renderer, seed))
    eval_records = split_conversations(cfg, seed)[2][: cfg.eval_limit]
    report, counts = data["report"], data["counts"]
    ctx.log(f"{len(train_set):,} conversations ({data['trained_tokens']:,} trained tokens); dropped "
            f"{report['dropped'] or 'none'}; duplicates {report['duplicates']} ({cfg.duplicates}); length policy {counts}")

    before = heldout(model, tokenizer, eval_records, cfg, seed, accelerator)
    if before:
        ctx.log(f"held-out before sft ({len(eval_records)} conversations): {summary(before)}")

    model = attach_lora(model, cfg, accelerator)
    trainable, total = count_parameters(model)
    ctx.log(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {cfg.lora.target_modules}: {trainable:,} trainable of "
            f"{total:,} parameters ({100 * trainable / total:.2f}%); {split.describe('conversations')}"
            f"{ceiling_note(split, ceiling)}{fp32_ceiling_note('sft', cfg, ceiling)}")

    # train
    started = time.perf_counter()
    args = SFTConfig(
        **common_trainer_kwargs(cfg, ctx, split, base_dtype),
        weight_decay=cfg.weight_decay,
        padding_free=cfg.padding_free,
        max_length=None,  # lengths are already handled by our policy above
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        processing_class=tokenizer,
        callbacks=[MetricsLog(ctx.out_dir / "metrics.jsonl", ctx.is_main), ChecksumOnSave()],
    )
    last = resume_checkpoint(ctx)
    result = trainer.train(resume_from_checkpoint=last)
    train_s = time.perf_counter() - started
    model = trainer.model
    in_sync = require_ranks_agree("sft", model, accelerator, trainable_only=True)

    # evaluate and save
    probe = logits_probe(model, train_set[0]["input_ids"][:32])
    after = heldout(model, tokenizer, eval_records, cfg, seed, accelerator)
    if after:
        ctx.log(f"held-out after sft: {summary(after)}")
    state = whole_state_dict(trainer)
    if ctx.is_main:
        save_adapter(accelerator.unwrap_model(model), tokenizer, renderer, ctx.out_dir, parent, state)
    accelerator.wait_for_everyone()

    return {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "conversations": len(train_set),
        "trained_tokens": data["trained_tokens"],
        "input_tokens": data["input_tokens"],
        "tokenize_s": data["tokenize_s"],
        "train_s": train_s,  # trainer set-up and training, not the held-out answers
        "data": {**report, **counts},
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_share": trainable / total,
        "gradient_accumulation": split.accumulation,
        "micro_batch": split.micro_batch,
        "world_size": world,
        "ranks_in_sync": in_sync,
        "heldout_before": before,
        "heldout_after": after,
        "base": str(parent),
        "probe": probe,
    }


@torch.no_grad()
def logits_probe(model, ids: list[int]) -> dict:
    """A few logits of the trained model in memory, so a reload from the saved folders can be checked."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1, :8].float()
    model.train(was_training)
    return {"ids": list(ids), "last_logits": logits.tolist()}


def save_adapter(model, tokenizer, renderer, out_dir: Path, parent: Path, state_dict: dict | None = None) -> None:
    """adapter_model.safetensors + adapter_config.json, tokenizer, generation config, and the lineage:
    the parent stage's base and adapters with this adapter on top."""
    base, adapters, options = lineage_of(parent)
    # plain peft (AutoPeftModelForCausalLM) reads the base from here; ours reads lineage.json
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(out_dir)
    generation = model.generation_config
    generation.eos_token_id = stop_token_ids(tokenizer, renderer)  # stop at the end of the assistant's turn
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out_dir)
    write_lineage(out_dir, base, [*adapters, out_dir], options)
