"""What the TRL stages (sft, dpo, reward, rl) derive from a recipe the same way: trainer arguments,
metrics logging and the checkpoint to resume from."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from pipeline.artifacts import append_jsonl, last_good_checkpoint, truncate_log, write_checksums
from pipeline.errors import StageFailed
from pipeline.lean_lora import add_lora_updates_in_one_gemm_on_cpu
from pipeline.models import resolve_dtype
from pipeline.recipe import BatchSplit
from pipeline.trl_cpu import fold_tiles_leanly_on_cpu, score_only_labelled_positions_on_cpu, smaller_token_tiles_on_cpu


def trains_in_bf16(precision: str, base_dtype: str, device_type: str) -> bool:
    """What a LoRA stage's `precision` resolves to: auto follows the base's dtype (bf16 where the device runs it)."""
    if precision == "auto":
        return resolve_dtype(base_dtype, device_type) == torch.bfloat16
    return precision == "bf16"


def trains_in_fp16(precision: str, base_dtype: str, device_type: str) -> bool:
    """fp16 mixed precision (the trainer's loss scaling): asked for, or `auto` on a GPU where the base resolves to
    fp16 (a float16 base, or `auto` before Ampere). Without it such a base trained in plain fp16, unscaled."""
    if precision == "auto":
        return device_type == "cuda" and resolve_dtype(base_dtype, device_type) == torch.float16
    return precision == "fp16"


def micro_batch_ceiling(cfg, base_dtype: str, device_type: str) -> int:
    """A LoRA stage's micro_batch_size, or its fp32_micro_batch_size when that is smaller and the stage trains in
    fp32 on a CPU: fp32 activations take twice the memory of bf16 ones, and on such CPUs a smaller micro-batch
    costs little speed (bench, AVX2 kernels)."""
    if device_type == "cpu" and cfg.precision != "fp16" and not trains_in_bf16(cfg.precision, base_dtype, "cpu"):
        return min(cfg.micro_batch_size, cfg.fp32_micro_batch_size)
    return cfg.micro_batch_size


def fp32_ceiling_note(prefix: str, cfg, ceiling: int) -> str:
    """Said when the fp32 ceiling replaced micro_batch_size, so the log explains the smaller micro-batch."""
    return "" if ceiling == cfg.micro_batch_size else f" (fp32 on the CPU: {prefix}.fp32_micro_batch_size {ceiling})"


def common_trainer_kwargs(cfg, ctx, split: BatchSplit, base_dtype: str = "auto") -> dict:
    """Arguments shared by SFTConfig and DPOConfig. Precision is explicit: TRL's defaults
    (bf16 and gradient checkpointing) raise on a machine without a GPU."""
    score_only_labelled_positions_on_cpu()  # every TRL stage comes through here before building its trainer
    fold_tiles_leanly_on_cpu()
    smaller_token_tiles_on_cpu()
    add_lora_updates_in_one_gemm_on_cpu()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = trains_in_bf16(cfg.precision, base_dtype, device_type)
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
        fp16=trains_in_fp16(cfg.precision, base_dtype, device_type),
        use_cpu=device_type == "cpu",
        gradient_checkpointing=False,
        # shuffled groups of similar lengths: with 20-400 token conversations a random batch is
        # about half padding (measured by python -m pipeline.bench). rl has no `batching`: GRPO's
        # own sampler deals out each prompt num_generations times, and lengths are only known after sampling.
        **({"train_sampling_strategy": cfg.batching} if hasattr(cfg, "batching") else {}),
        **({"pad_to_multiple_of": cfg.pad_to_multiple_of or None} if hasattr(cfg, "pad_to_multiple_of") else {}),
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (and stops the stage: StopOnNonFinite)
        report_to=["tensorboard"],
        seed=ctx.recipe.seed,
        data_seed=ctx.recipe.seed,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        ddp_find_unused_parameters=False,
        disable_tqdm=not ctx.is_main,
    )


def resume_checkpoint(ctx) -> str | None:
    """The newest intact Trainer checkpoint of this stage; the metrics log is cut back to it."""
    with ctx.accelerator.main_process_first():  # the main process sets corrupt ones aside first
        last = last_good_checkpoint(ctx.out_dir / "checkpoints", "checkpoint-*", ctx.log)
    if last:
        ctx.log(f"resuming from {last.name}")
    if ctx.is_main:  # a rerun logs each step once
        truncate_log(ctx.out_dir / "metrics.jsonl", int(last.name.split("-")[-1]) if last else 0)
    return str(last) if last else None


class ChecksumOnSave(TrainerCallback):
    """Seal each Trainer checkpoint with checksums of its files once the Trainer has written it."""

    def on_save(self, args, state, control, **kwargs):
        # every process writes its own rng_state_<rank>.pth into the checkpoint and the Trainer does not wait for
        # the others before this callback: sealing at once could leave a rank's file out or hash it half-written
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_checksums(folder)


class StopOnNonFinite:
    """Mixin for a Trainer: stop at the first non-finite loss or gradient norm, before the update.

    The Trainer's own NaN filter (logging_nan_inf_filter) only hides a NaN loss from the log and
    goes on stepping, so NaN weights get saved. The gradient norm is computed after the gradients
    are reduced over processes, so every process sees the same value and stops at the same step.
    """

    _bad_loss: float | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self._bad_loss = float(loss.detach().float().mean())
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(grad_norm) if grad_norm is not None else 0.0
        if self._bad_loss is not None or not math.isfinite(value):
            stage = getattr(self, "stage_name", "training")
            folder = Path(self.args.output_dir)
            last = max(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), default=None) \
                if folder.is_dir() else None
            kept = f"the last checkpoint is {last}" if last else "no checkpoint was written yet"
            loss = f"loss {self._bad_loss}" if self._bad_loss is not None else "loss finite"
            raise StageFailed(
                f"{stage}: non-finite training at step {self.state.global_step + 1} ({loss}, gradient norm {value}); "
                f"stopped before updating the weights; {kept}. Lower {stage}.learning_rate or check the data."
            )
        return grad_norm


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
        global_batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * \
            self.args.world_size
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return epoch_seeded_length_sampler(global_batch, dataset["length"], seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator of its own for one epoch's order: the same order whenever that epoch is drawn, resumed or not."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_seeded_length_sampler(batch_size: int, lengths: list[int], seed: int):
    """transformers' LengthGroupedSampler with each epoch's order drawn from its own generator, seeded by (seed,
    epoch). The plain one draws from the global RNG when the epoch starts; a resumed run draws its epoch again
    from the RNG as the trainer left it, so after a crash the rest of that epoch saw other batches than an
    uninterrupted run (sft on the quickstart: other tokens per step from the first step after the resume)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeeded(LengthGroupedSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:  # called by the trainer (through accelerate) before each epoch
            self.epoch = epoch

        def __iter__(self):
            self.generator = epoch_generator(seed, self.epoch)
            return super().__iter__()

    return EpochSeeded(batch_size, lengths=lengths)


class MetricsLog(TrainerCallback):
    """Append every logged dict to metrics.jsonl, for reports and plots."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.enabled and logs:
            append_jsonl(self.path, {"step": state.global_step, **logs})
