"""What the two TRL stages (sft, dpo) derive from a recipe the same way: trainer arguments,
metrics logging and the checkpoint to resume from."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from pipeline.artifacts import append_jsonl, last_complete_trainer_checkpoint, truncate_log
from pipeline.models import resolve_dtype
from pipeline.recipe import BatchSplit


def common_trainer_kwargs(cfg, ctx, split: BatchSplit, base_dtype: str = "auto") -> dict:
    """Arguments shared by SFTConfig and DPOConfig. Precision is explicit: TRL's defaults
    (bf16 and gradient checkpointing) raise on a machine without a GPU."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.precision == "auto":
        bf16 = resolve_dtype(base_dtype, device_type) == torch.bfloat16
    else:
        bf16 = cfg.precision == "bf16"
    return dict(
        output_dir=str(ctx.out_dir / "checkpoints"),
        per_device_train_batch_size=split.micro_batch,
        gradient_accumulation_steps=split.accumulation,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio in transformers 5
        bf16=bf16,
        fp16=cfg.precision == "fp16",
        use_cpu=device_type == "cpu",
        gradient_checkpointing=False,
        # shuffled groups of similar lengths: with 20-400 token conversations a random batch is
        # about half padding (measured by python -m pipeline.bench)
        train_sampling_strategy=cfg.batching,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to=["tensorboard"],
        seed=ctx.recipe.seed,
        data_seed=ctx.recipe.seed,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        ddp_find_unused_parameters=False,
        disable_tqdm=not ctx.is_main,
    )


def resume_checkpoint(ctx) -> str | None:
    """The newest complete Trainer checkpoint of this stage; the metrics log is cut back to it."""
    last = last_complete_trainer_checkpoint(ctx.out_dir / "checkpoints")
    if last:
        ctx.log(f"resuming from {Path(last).name}")
    if ctx.is_main:  # a rerun logs each step once
        truncate_log(ctx.out_dir / "metrics.jsonl", int(Path(last).name.split("-")[-1]) if last else 0)
    return last


class SameBatchesOnAnyTopology:
    """Mixin for a Trainer: length grouping decided over the global batch.

    transformers groups by length in blocks of (micro batch x accumulation) of ONE process, so
    1 and 2 processes would see different batches. Grouping by the global batch gives one order
    that accelerate then deals out to the processes, micro-batch by micro-batch: the optimizer
    steps see the same conversations on any number of processes.
    """

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or "length" not in dataset.column_names:
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        global_batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * \
            self.args.world_size
        return LengthGroupedSampler(global_batch, lengths=dataset["length"])


class MetricsLog(TrainerCallback):
    """Append every logged dict to metrics.jsonl, for reports and plots."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.enabled and logs:
            append_jsonl(self.path, {"step": state.global_step, **logs})
