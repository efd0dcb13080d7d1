"""dpo stage: Direct Preference Optimization of the SFT model through TRL's DPOTrainer.

    loss = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

The reference is the SFT model exactly, with no second copy of the weights: the SFT adapter
is merged into the base in memory, TRL adds a fresh DPO adapter (peft_config), and the
reference is that same model with the adapter disabled. Pairs are rendered by our chat
renderer (user text never becomes control tokens), so TRL's own tokenization is skipped.

`trainable: lm_head` trains only the output projection instead (untied from the input
embeddings: pipeline/models.py train_only_lm_head). With no adapter to switch off, the
reference is a frozen copy of the SFT model (TRL's ref_model), and the stage saves a full
model folder.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import DPOTrainer

from pipeline.artifacts import append_jsonl
from pipeline.chat_template import ChatRenderer
from pipeline.data.cache import cached_rows, tokenizer_key
from pipeline.data.pairs import split_pairs, training_pair_rows
from pipeline.distributed import require_ranks_agree, whole_state_dict
from pipeline.errors import StageFailed
from pipeline.evaluation import HeldOut, Settings, evaluate_model, read_scored_questions, summary
from pipeline.generation import within_context
from pipeline.logprobs import completion_logps
from pipeline.models import (
    count_parameters,
    frozen_copy,
    load_stage_model,
    lora_config,
    require_lora_targets,
    restore_adapter_dropout,
    save_aligned_policy,
    train_only_lm_head,
)
from pipeline.recipe import DpoConfig, ceiling_note, split_batch
from pipeline.shared_prompt import SharedPromptForward, can_share
from pipeline.trainer_args import (
    ChecksumOnSave,
    SameBatchesOnAnyTopology,
    StopOnNonFinite,
    common_trainer_kwargs,
    fp32_ceiling_note,
    micro_batch_ceiling,
    resume_checkpoint,
)

# ---------------------------------------------------------------- data


def prepare_rows(cfg: DpoConfig, renderer: ChatRenderer, seed: int) -> tuple[list[dict], dict]:
    """Read, check and tokenize the training pairs (run once per run: see data/cache.py)."""
    return training_pair_rows(cfg, renderer, seed, "dpo")


class DPOTrainerOnOurRows(StopOnNonFinite, SameBatchesOnAnyTopology, DPOTrainer):
    """DPOTrainer fed with our rendered ids; TRL's own tokenization would parse control tokens in user text.

    With `share_prompt` each pair's chosen and rejected replies are scored in one row with their prompt
    computed once (pipeline/shared_prompt.py); TRL's losses and metrics run unchanged on the results.
    """

    stage_name = "dpo"

    def __init__(self, *args, share_prompt: bool = False, **kwargs):
        self.share_prompt, self._shared = share_prompt, None  # set first: TRL's __init__ runs the reference pass
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _scorer(self, model):
        if not self.share_prompt:
            return model
        if self._shared is None:
            config = self.accelerator.unwrap_model(self.model).config
            if not can_share(config):
                return model
            pad_id = self.processing_class.pad_token_id
            self._shared = SharedPromptForward(model, config, 0 if pad_id is None else pad_id,
                                               self.args.pad_to_multiple_of)
        self._shared.model = model  # the reference pass and training may see the model wrapped differently
        return self._shared

    def _compute_loss(self, model, inputs, return_outputs):
        return super()._compute_loss(self._scorer(model), inputs, return_outputs)

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(self._scorer(model), inputs)


# ---------------------------------------------------------------- evaluation


def heldout(policy, tokenizer, pairs: list[dict], answers: list[dict], cfg: DpoConfig, seed: int, accelerator,
            kl: bool, reference=None) -> dict:
    """Every metric that applies (pipeline/evaluation.py): preference and reward metrics on the pairs,
    replies to the answer questions, KL from the SFT model (`reference`, else the adapter disabled) when asked."""
    settings = Settings(max_new_tokens=cfg.max_new_tokens, seed=seed, batch_size=cfg.generation_batch_size,
                        beta=cfg.beta, reference=True, kl_prompts=cfg.eval_limit if kl else 0, sampled=True)
    result = evaluate_model(policy, tokenizer, HeldOut(conversations=answers, pairs=pairs), settings, accelerator,
                            reference)
    return {**result.metrics, "examples": result.examples(answers)}


class StuckMarginCheck(TrainerCallback):
    """DPO that cannot move (beta 0, learning rate 0, a reference that is the policy) sits at ln 2 forever."""

    def __init__(self, after_steps: int, metrics_path: Path, enabled: bool):
        self.after_steps, self.metrics_path, self.enabled = after_steps, metrics_path, enabled
        self.margins: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        if self.enabled:
            append_jsonl(self.metrics_path, {"step": state.global_step, **logs})
        if "rewards/margins" in logs:
            margin = float(logs["rewards/margins"])
            if not math.isfinite(margin):
                raise StageFailed(f"dpo: the reward margin is {margin} at step {state.global_step}; stopped. "
                                  f"Lower dpo.learning_rate or check the data.")
            self.margins.append(abs(margin))
        if state.global_step >= self.after_steps and self.margins and max(self.margins) == 0.0:
            raise StageFailed(
                f"dpo: the reward margin is still exactly 0 after {state.global_step} steps (loss stuck at "
                f"ln 2 = {math.log(2):.4f}): check dpo.beta (> 0), dpo.learning_rate (> 0), and that the "
                f"reference is not the policy itself"
            )


# ---------------------------------------------------------------- the stage


def run(cfg: DpoConfig, ctx) -> dict:
    from trl import DPOConfig as TrlDPOConfig

    accelerator, seed = ctx.accelerator, ctx.recipe.seed
    world = accelerator.num_processes
    base_dtype = ctx.recipe.base.dtype if ctx.recipe.base else "auto"
    ceiling = micro_batch_ceiling(cfg, base_dtype, "cuda" if torch.cuda.is_available() else "cpu")
    split = split_batch("dpo", cfg.global_batch_size, ceiling, world)

    # model and data
    sft_dir = ctx.output_of("sft")  # every SFT adapter merged in memory; TRL adds the fresh DPO adapter on top
    model, tokenizer = load_stage_model(sft_dir, merge_all=True)
    cfg = within_context(cfg, "max_length", model, ctx.log)
    reference = None  # lora: the policy with its adapter disabled
    if cfg.trainable == "lora":
        require_lora_targets(model, cfg.lora, "dpo")
    if cfg.trainable == "lm_head":
        reference = frozen_copy(model)
        train_only_lm_head(model)
    renderer = ChatRenderer(tokenizer)
    train_set, data = cached_rows(accelerator, ctx.out_dir / "cache" / "train", tokenizer_key(tokenizer),
                                  lambda: prepare_rows(cfg, renderer, seed))
    report, too_long = data["report"], data["too_long"]
    eval_pairs = split_pairs(cfg, seed)[2][: cfg.eval_limit]
    answers = read_scored_questions(cfg.answer_data, cfg.eval_limit)
    ctx.log(f"{len(train_set):,} pairs; dropped {report['dropped'] or 'none'}; too long {too_long}; "
            f"duplicates {report['duplicates']}; reference = the SFT model ({sft_dir})")

    started = time.perf_counter()  # trainer set-up counts: precomputed reference log-probs happen there
    args = TrlDPOConfig(
        **common_trainer_kwargs(cfg, ctx, split, base_dtype),
        beta=cfg.beta,
        loss_type=list(cfg.loss_type),
        loss_weights=list(cfg.loss_weights) or None,
        label_smoothing=cfg.label_smoothing,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        # forward-only passes keep no activations for a backward, so four micro-batches at once fit where one
        # training micro-batch does, and fewer, larger matmuls run faster (bench: 69.7 vs 64.3 pairs/s, EPYC)
        precompute_ref_batch_size=4 * split.micro_batch,
        max_length=None,  # our length policy above already applied
    )
    trainer = DPOTrainerOnOurRows(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora) if cfg.trainable == "lora" else None,
        share_prompt=cfg.share_prompt,
        callbacks=[StuckMarginCheck(cfg.stuck_after_steps, ctx.out_dir / "metrics.jsonl", ctx.is_main),
                   ChecksumOnSave()],
    )
    policy = trainer.model
    restore_adapter_dropout(policy, cfg.lora.dropout)  # no adapter layers (trainable: lm_head): nothing to set
    setup_s = time.perf_counter() - started
    trainable, total = count_parameters(policy)
    what = f"fresh LoRA r={cfg.lora.r}" if cfg.trainable == "lora" else "lm_head only (untied)"
    ctx.log(f"{what}: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%); "
            f"beta {cfg.beta}, loss {cfg.loss_type}; {split.describe('pairs')}{ceiling_note(split, ceiling)}"
            f"{fp32_ceiling_note('dpo', cfg, ceiling)}")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    before = heldout(policy, tokenizer, eval_pairs, answers, cfg, seed, accelerator, kl=False, reference=reference)
    ctx.log(f"held-out before dpo ({len(eval_pairs)} pairs, {len(answers)} questions): {summary(before)}")
    last = resume_checkpoint(ctx)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    train_s = setup_s + time.perf_counter() - started
    policy = trainer.model
    in_sync = require_ranks_agree("dpo", policy, accelerator, trainable_only=True)
    shared = trainer._shared
    if shared is not None:
        ctx.log(f"prompt computed once for chosen and rejected in {shared.shared_batches} of "
                f"{shared.shared_batches + shared.plain_batches} forward passes")

    after = heldout(policy, tokenizer, eval_pairs, answers, cfg, seed, accelerator, kl=True, reference=reference)
    ctx.log(f"held-out after dpo: {summary(after)}")
    # a fingerprint of the final in-memory policy, so a rebuild from the saved folders can be checked
    probe = completion_logps(policy, [(r["prompt_ids"], r["chosen_ids"]) for r in train_set.select(range(4))],
                             pad_id).tolist()

    state = whole_state_dict(trainer)
    if ctx.is_main:
        save_aligned_policy(accelerator.unwrap_model(policy), tokenizer, renderer, ctx.out_dir, sft_dir,
                            cfg.trainable, "dpo", state)
    accelerator.wait_for_everyone()
    return {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "pairs": len(train_set),
        "tokenize_s": data["tokenize_s"],
        "train_s": train_s,  # trainer set-up (reference log-probs when precomputed) and training
        "data": {**report, "too_long_dropped": too_long},
        "beta": cfg.beta,
        "loss_type": list(cfg.loss_type),
        "trainable": cfg.trainable,
        "trainable_parameters": trainable,
        "gradient_accumulation": split.accumulation,
        "micro_batch": split.micro_batch,
        "world_size": world,
        "ranks_in_sync": in_sync,
        "shared_prompt_passes": None if shared is None else {"shared": shared.shared_batches,
                                                              "plain": shared.plain_batches},
        "heldout_before": before,
        "heldout_after": after,
        "probe_chosen_logps": probe,
    }
