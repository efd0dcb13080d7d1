"""reward stage: a reward model on the SFT model, trained on the pairs the dpo stage reads (TRL's RewardTrainer).

    loss = -log sigmoid( r(x, y_w) - r(x, y_l) )      (Bradley-Terry: P(y_w preferred) = sigmoid(r_w - r_l))

r is a scalar `score` head (hidden -> 1) on the last token of the rendered prompt + reply. The
model is the SFT model's own backbone (every adapter merged, in memory) in transformers'
sequence-classification class (pipeline/rewards.py), with a fresh LoRA and the head trained
fully (peft modules_to_save). The head starts at zero: at step 0 every pair ties, loss ln 2.
Pairs are rendered by our chat renderer, so TRL's own tokenization is skipped.

Saved as a peft SEQ_CLS adapter (LoRA + score) on the SFT model; lineage.json names the chain
and says how to load it (pipeline.rewards.load_reward_model, or plain transformers + peft).
"""

from __future__ import annotations

import time

from trl import RewardTrainer

from pipeline.chat_template import ChatRenderer
from pipeline.data.cache import cached_rows, tokenizer_key
from pipeline.data.pairs import split_pairs, training_pair_rows
from pipeline.distributed import require_ranks_agree, whole_state_dict
from pipeline.evaluation import read_scored_questions
from pipeline.generation import within_context
from pipeline.lineage import write_lineage
from pipeline.models import (
    count_parameters,
    lineage_of,
    load_stage_model,
    lora_config,
    require_lora_targets,
    restore_adapter_dropout,
)
from pipeline.recipe import RewardConfig, ceiling_note, split_batch
from pipeline.rewards import (
    HEAD,
    LOAD_NOTE,
    fact_ranking,
    likelihood_fact_ranking,
    pairwise_metrics,
    reward_model_from,
    reward_scores,
)
from pipeline.trainer_args import (
    ChecksumOnSave,
    MetricsLog,
    SameBatchesOnAnyTopology,
    StopOnNonFinite,
    common_trainer_kwargs,
    resume_checkpoint,
)

# ---------------------------------------------------------------- data


def prepare_rows(cfg: RewardConfig, renderer: ChatRenderer, seed: int) -> tuple[list[dict], dict]:
    """The training pairs as TRL's reward rows: chosen_ids / rejected_ids are whole sequences (prompt + reply)."""
    rows, info = training_pair_rows(cfg, renderer, seed, "reward")
    return [{"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"],
             "length": r["length"]} for r in rows], info


class RewardTrainerOnOurRows(StopOnNonFinite, SameBatchesOnAnyTopology, RewardTrainer):
    """RewardTrainer fed with our rendered ids (it skips its own tokenization when chosen_ids exist)."""

    stage_name = "reward"


# ---------------------------------------------------------------- model


def load_sft_reward_model(ctx):
    """The SFT model (every adapter merged, in memory) as a one-label score model, the causal LM it
    shares its backbone with, its tokenizer (padding with eos where it has no pad token: the score is
    read at the last non-pad token), and the SFT stage's folder. TRL adds the fresh LoRA and trains the head."""
    sft_dir = ctx.output_of("sft")
    causal, tokenizer = load_stage_model(sft_dir, merge_all=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return reward_model_from(causal, tokenizer.pad_token_id), causal, tokenizer, sft_dir


# ---------------------------------------------------------------- evaluation


def heldout(model, renderer: ChatRenderer, pairs: list[dict], answers: list[dict], seed: int) -> dict:
    """Pairwise accuracy and margin on the held-out pairs; on tiny-world questions, right fact over wrong."""
    return {**pairwise_metrics(model, renderer, pairs), **fact_ranking(model, renderer, answers, seed)}


def summary(metrics: dict) -> str:
    def show(value) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        if isinstance(value, dict):  # per attribute: {"pet": {"ranking": 0.56, "questions": 40}}
            return "(" + ", ".join(f"{k} {v['ranking']:.2f}" for k, v in value.items()) + ")"
        return str(value)

    return ", ".join(f"{k} {show(v)}" for k, v in metrics.items()) or "(none)"


# ---------------------------------------------------------------- the stage


def run(cfg: RewardConfig, ctx) -> dict:
    from trl import RewardConfig as TrlRewardConfig

    accelerator, seed = ctx.accelerator, ctx.recipe.seed
    world = accelerator.num_processes
    split = split_batch("reward", cfg.global_batch_size, cfg.micro_batch_size, world)

    # model and data
    model, causal, tokenizer, sft_dir = load_sft_reward_model(ctx)
    require_lora_targets(model, cfg.lora, "reward")
    cfg = within_context(cfg, "max_length", causal, ctx.log)
    renderer = ChatRenderer(tokenizer)
    train_set, data = cached_rows(accelerator, ctx.out_dir / "cache" / "train", tokenizer_key(tokenizer),
                                  lambda: prepare_rows(cfg, renderer, seed))
    report, too_long = data["report"], data["too_long"]
    eval_pairs = split_pairs(cfg, seed)[2][: cfg.eval_limit]
    answers = read_scored_questions(cfg.answer_data, cfg.eval_limit)
    ctx.log(f"{len(train_set):,} pairs; dropped {report['dropped'] or 'none'}; too long {too_long}; "
            f"duplicates {report['duplicates']}; backbone = the SFT model ({sft_dir})")

    # before TRL puts the LoRA into the shared backbone: how the SFT model itself ranks the same facts
    likelihood = likelihood_fact_ranking(causal, renderer, answers, seed, tokenizer.pad_token_id)
    del causal  # its lm_head is not needed again
    if likelihood:
        share = likelihood["likelihood_fact_ranking"]
        ctx.log(f"the SFT model's own log-likelihood puts the right fact first on {share:.3f} of the held-out "
                f"questions (what the score can learn to read)")

    started = time.perf_counter()
    args = TrlRewardConfig(
        **common_trainer_kwargs(cfg, ctx, split, ctx.recipe.base.dtype if ctx.recipe.base else "auto"),
        max_length=None,  # our length policy above already applied
    )
    trainer = RewardTrainerOnOurRows(
        model=model,
        args=args,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora, task_type="SEQ_CLS", also_save=("score",)),
        callbacks=[MetricsLog(ctx.out_dir / "metrics.jsonl", ctx.is_main), ChecksumOnSave()],
    )
    scorer = trainer.model
    restore_adapter_dropout(scorer, cfg.lora.dropout)
    setup_s = time.perf_counter() - started
    trainable, total = count_parameters(scorer)
    ctx.log(f"fresh LoRA r={cfg.lora.r} + score head: {trainable:,} trainable of {total:,} "
            f"({100 * trainable / total:.2f}%); {split.describe('pairs')}{ceiling_note(split, cfg.micro_batch_size)}")

    before = heldout(scorer, renderer, eval_pairs, answers, seed)
    ctx.log(f"held-out before training ({len(eval_pairs)} pairs, {len(answers)} questions): {summary(before)}")
    last = resume_checkpoint(ctx)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    train_s = setup_s + time.perf_counter() - started
    scorer = trainer.model
    in_sync = require_ranks_agree("reward", scorer, accelerator, trainable_only=True)

    after = heldout(scorer, renderer, eval_pairs, answers, seed)
    ctx.log(f"held-out after training: {summary(after)}")
    # a fingerprint of the final in-memory model, so a load from the saved folders can be checked
    probe = reward_scores(scorer, [r["chosen_ids"] for r in train_set.select(range(min(4, len(train_set))))]).tolist()

    state = whole_state_dict(trainer)
    if ctx.is_main:
        accelerator.unwrap_model(scorer).save_pretrained(ctx.out_dir, safe_serialization=True, state_dict=state)
        tokenizer.save_pretrained(ctx.out_dir)
        base, adapters, options = lineage_of(sft_dir)
        write_lineage(ctx.out_dir, base, [*adapters, ctx.out_dir], options, head=HEAD, note=LOAD_NOTE)
    accelerator.wait_for_everyone()
    return {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "pairs": len(train_set),
        "tokenize_s": data["tokenize_s"],
        "train_s": train_s,
        "data": {**report, "too_long_dropped": too_long},
        "trainable_parameters": trainable,
        "gradient_accumulation": split.accumulation,
        "micro_batch": split.micro_batch,
        "world_size": world,
        "ranks_in_sync": in_sync,
        "heldout_before": before,
        "heldout_after": after,
        "sft_likelihood": likelihood,  # the same held-out facts ranked by the SFT model itself
        "probe_chosen_rewards": probe,
    }
