"""dpo stage: Direct Preference Optimization of the SFT model through TRL's DPOTrainer.

    loss = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

The reference is the SFT model exactly, with no second copy of the weights: the SFT adapter
is merged into the base in memory, TRL adds a fresh DPO adapter (peft_config), and the
reference is that same model with the adapter disabled. Pairs are rendered by our chat
renderer (user text never becomes control tokens), so TRL's own tokenization is skipped.
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
from pipeline.data.readers import read_records
from pipeline.distributed import require_ranks_agree
from pipeline.errors import PipelineError, StageFailed
from pipeline.lineage import write_lineage
from pipeline.generation import SCORED_FIELDS, generate_replies, prompts_of, score_answers, stop_token_ids
from pipeline.logprobs import completion_logps, sequence_kl
from pipeline.models import count_parameters, lineage_of, load_stage_model, lora_config
from pipeline.recipe import DpoConfig, ceiling_note, split_batch
from pipeline.trainer_args import (
    ChecksumOnSave,
    SameBatchesOnAnyTopology,
    StopOnNonFinite,
    common_trainer_kwargs,
    resume_checkpoint,
)

# ---------------------------------------------------------------- data


def load_pairs(files: list[str], fmt: str, on_bad: str) -> tuple[list[dict], dict]:
    pairs, report = [], {"dropped": {}, "duplicates": 0, "problems": []}
    for file in files:
        result = read_records(file, "preference", fmt, on_bad=on_bad)
        pairs += result.records
        report["duplicates"] += result.duplicates
        report["problems"] += result.problems[:5]
        for reason, count in result.dropped.items():
            report["dropped"][reason] = report["dropped"].get(reason, 0) + count
    return pairs, report


def tokenize_pair(renderer: ChatRenderer, pair: dict) -> dict:
    """prompt_ids, chosen_ids, rejected_ids: each response as the training render continues the prompt."""
    prompt = renderer.prompt_ids(pair["prompt"])
    out = {"prompt_ids": prompt}
    for side in ("chosen", "rejected"):
        full = renderer.render(pair["prompt"] + pair[side]).input_ids
        if full[: len(prompt)] != prompt:
            raise PipelineError("the chat template renders the prompt differently with and without a reply")
        out[f"{side}_ids"] = full[len(prompt):]
    return out


def tokenize_pairs(pairs: list[dict], renderer: ChatRenderer, max_length: int) -> tuple[list[dict], int]:
    rows, too_long = [], 0
    for pair in pairs:
        row = tokenize_pair(renderer, pair)
        row["length"] = pair_length(row)  # what length-grouped batching sorts by
        if row["length"] > max_length:
            too_long += 1
            continue
        rows.append(row)
    return rows, too_long


def prepare_rows(cfg: DpoConfig, renderer: ChatRenderer) -> tuple[list[dict], dict]:
    """Read, check and tokenize the training pairs (run once per run: see data/cache.py)."""
    started = time.perf_counter()
    pairs, report = load_pairs(cfg.train_data, cfg.format, cfg.bad_pairs)
    rows, too_long = tokenize_pairs(pairs, renderer, cfg.max_length)
    if not rows:
        raise PipelineError(f"dpo: no usable pairs ({report}, too long: {too_long})")
    return rows, {"report": report, "too_long": too_long, "tokenize_s": time.perf_counter() - started}


def pair_length(row: dict) -> int:
    """Tokens of the longer side, prompt included."""
    return len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))


class DPOTrainerOnOurRows(StopOnNonFinite, SameBatchesOnAnyTopology, DPOTrainer):
    """DPOTrainer fed with our rendered ids; TRL's own tokenization would parse control tokens in user text."""

    stage_name = "dpo"

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


# ---------------------------------------------------------------- model


def load_sft_policy(ctx):
    """The SFT model with every adapter merged in (in memory), the tokenizer the SFT stage saved,
    and the SFT stage's folder; TRL adds the fresh DPO adapter on top."""
    sft_dir = ctx.output_of("sft")
    model, tokenizer = load_stage_model(sft_dir, merge_all=True)
    return model, tokenizer, sft_dir


# ---------------------------------------------------------------- evaluation


def preference_scores(model, rows: list[dict], beta: float, pad_id: int, with_reference: bool = True) -> dict:
    """Log-likelihood preference on held-out pairs and, against the adapter-disabled reference,
    the implicit rewards beta * (log pi - log ref); ties count as half a win."""
    if not rows:
        return {}
    chosen = [(r["prompt_ids"], r["chosen_ids"]) for r in rows]
    rejected = [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
    model.eval()
    policy_w, policy_l = completion_logps(model, chosen, pad_id), completion_logps(model, rejected, pad_id)
    out = {
        "policy_prefers_chosen": (policy_w > policy_l).float().mean().item(),  # by raw log-likelihood
        "chosen_logp": policy_w.mean().item(),
        "rejected_logp": policy_l.mean().item(),
        "pairs": len(rows),
    }
    if with_reference:
        with model.disable_adapter():
            ref_w, ref_l = completion_logps(model, chosen, pad_id), completion_logps(model, rejected, pad_id)
        margin = beta * ((policy_w - ref_w) - (policy_l - ref_l))
        out["preference_accuracy"] = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item()
        out["reward_margin"] = margin.mean().item()
    return out


def kl_from_reference(model, tokenizer, renderer, prompts: list[list[dict]], max_new_tokens: int, seed: int,
                      accelerator=None, batch_size: int = 32) -> float:
    """Mean sequence KL(policy || SFT) over replies sampled from the policy."""
    if not prompts:
        return float("nan")
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=True, seed=seed,
                               batch_size=batch_size, accelerator=accelerator)
    pairs = []
    for prompt, reply in zip(prompts, replies):
        ids = renderer.prompt_ids(prompt)
        reply_ids = renderer.render(prompt + [{"role": "assistant", "content": reply}]).input_ids[len(ids):]
        pairs.append((ids, reply_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return sequence_kl(model, _Reference(model), pairs, pad).mean().item()


class _Reference(torch.nn.Module):
    """The policy with its adapter switched off, as a separate callable for sequence_kl."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        with self.model.disable_adapter():
            return self.model(**kwargs)


def answer_scores(model, tokenizer, records, cfg: DpoConfig, seed: int, accelerator=None) -> dict:
    """Greedy and sampled answers to held-out questions, split across the processes."""
    if not records:
        return {}
    common = dict(max_new_tokens=cfg.max_new_tokens, seed=seed, batch_size=cfg.generation_batch_size,
                  accelerator=accelerator)
    replies = generate_replies(model, tokenizer, prompts_of(records), **common)
    sampled = generate_replies(model, tokenizer, prompts_of(records), do_sample=True, **common)
    scores = score_answers(records, replies)
    scores["habit_rate_sampled"] = score_answers(records, sampled)["habit_rate"]
    scores["examples"] = [{"prompt": p[-1]["content"], "reply": r} for p, r in
                          list(zip(prompts_of(records), replies))[:5]]
    return scores


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
    split = split_batch("dpo", cfg.global_batch_size, cfg.micro_batch_size, world)

    # model and data
    model, tokenizer, sft_dir = load_sft_policy(ctx)
    renderer = ChatRenderer(tokenizer)
    train_set, data = cached_rows(accelerator, ctx.out_dir / "cache" / "train", tokenizer_key(tokenizer),
                                  lambda: prepare_rows(cfg, renderer))
    report, too_long = data["report"], data["too_long"]
    eval_pairs = load_pairs(cfg.eval_data, "auto", "drop")[0][: cfg.eval_limit] if cfg.eval_data else []
    eval_rows, _ = tokenize_pairs(eval_pairs, renderer, cfg.max_length)
    answers = []
    for file in cfg.answer_data:
        answers += read_records(file, "conversation", keep=SCORED_FIELDS).records
    answers = answers[: cfg.eval_limit]
    ctx.log(f"{len(train_set):,} pairs; dropped {report['dropped'] or 'none'}; too long {too_long}; "
            f"duplicates {report['duplicates']}; reference = the SFT model ({sft_dir})")

    started = time.perf_counter()  # trainer set-up counts: precomputed reference log-probs happen there
    args = TrlDPOConfig(
        **common_trainer_kwargs(cfg, ctx, split, ctx.recipe.base.dtype if ctx.recipe.base else "auto"),
        beta=cfg.beta,
        loss_type=list(cfg.loss_type),
        loss_weights=list(cfg.loss_weights) or None,
        label_smoothing=cfg.label_smoothing,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        max_length=None,  # our length policy above already applied
    )
    trainer = DPOTrainerOnOurRows(
        model=model,
        args=args,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora),
        callbacks=[StuckMarginCheck(cfg.stuck_after_steps, ctx.out_dir / "metrics.jsonl", ctx.is_main),
                   ChecksumOnSave()],
    )
    policy = trainer.model
    setup_s = time.perf_counter() - started
    trainable, total = count_parameters(policy)
    ctx.log(f"fresh LoRA r={cfg.lora.r}: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%); "
            f"beta {cfg.beta}, loss {cfg.loss_type}; {split.describe('pairs')}{ceiling_note(split, cfg.micro_batch_size)}")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    before = {"preference": preference_scores(policy, eval_rows, cfg.beta, pad_id),
              "answers": answer_scores(policy, tokenizer, answers, cfg, seed, accelerator)}
    last = resume_checkpoint(ctx)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    train_s = setup_s + time.perf_counter() - started
    policy = trainer.model
    in_sync = require_ranks_agree("dpo", policy, accelerator, trainable_only=True)

    after = {"preference": preference_scores(policy, eval_rows, cfg.beta, pad_id),
             "answers": answer_scores(policy, tokenizer, answers, cfg, seed, accelerator)}
    # a fingerprint of the final in-memory policy, so a rebuild from the saved folders can be checked
    probe = completion_logps(policy, [(r["prompt_ids"], r["chosen_ids"]) for r in train_set.select(range(4))],
                             pad_id).tolist()
    kl_prompts = [p["prompt"] for p in eval_pairs] or prompts_of(answers)
    kl = kl_from_reference(policy, tokenizer, renderer, kl_prompts[: cfg.eval_limit], cfg.max_new_tokens, seed,
                           accelerator, cfg.generation_batch_size)
    _report(ctx, before, after, kl)

    if ctx.is_main:
        unwrapped = accelerator.unwrap_model(policy)
        unwrapped.save_pretrained(ctx.out_dir, safe_serialization=True)
        tokenizer.save_pretrained(ctx.out_dir)
        generation = unwrapped.generation_config
        generation.eos_token_id = stop_token_ids(tokenizer, renderer)
        generation.pad_token_id = tokenizer.pad_token_id
        generation.save_pretrained(ctx.out_dir)
        base, adapters, options = lineage_of(sft_dir)
        write_lineage(ctx.out_dir, base, [*adapters, ctx.out_dir], options,
                      note="merge the earlier adapters into the base, then load the dpo adapter on top")
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
        "trainable_parameters": trainable,
        "gradient_accumulation": split.accumulation,
        "micro_batch": split.micro_batch,
        "world_size": world,
        "ranks_in_sync": in_sync,
        "before": before,
        "after": after,
        "kl_from_sft": kl,
        "probe_chosen_logps": probe,
    }


def _report(ctx, before, after, kl) -> None:
    for name, scores in (("before", before), ("after", after)):
        pref, ans = scores["preference"], scores["answers"]
        parts = []
        if pref:
            parts.append(f"preference accuracy {pref['preference_accuracy']:.3f}, margin {pref['reward_margin']:.3f}")
        if ans:
            parts.append(f"answer accuracy {ans['answer_accuracy']:.3f}, habit {ans['habit_rate']:.3f} "
                         f"(sampled {ans['habit_rate_sampled']:.3f}), empty {ans['empty_rate']:.3f}")
        if parts:
            ctx.log(f"held-out {name} dpo: " + "; ".join(parts))
    ctx.log(f"KL(policy || sft) on held-out prompts: {kl:.4f} nats per reply")
