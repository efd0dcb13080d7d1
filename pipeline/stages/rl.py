"""rl stage: online RL from the SFT model through TRL's GRPOTrainer.

For each prompt the policy samples a group of G replies (num_generations) and a reward scores each.
A reply's advantage is its reward against its own group, and the loss keeps a KL penalty to the SFT
model (beta):

    A_i  = (r_i - mean(r_group)) / (std(r_group) + 1e-4)
    loss = -mean_tokens[ min(ratio * A, clip(ratio, 1 - 0.2, 1 + 0.2) * A) ] + beta * mean_tokens[ kl ]
    kl   = exp(ref - logp) - (ref - logp) - 1        (per sampled token; 0, with zero gradient, when policy = SFT)

A group whose rewards all tie has A = 0 for every reply: no policy gradient. TRL logs that share
(frac_reward_zero_std); metrics.jsonl carries it as `tied_groups`, next to `reward`, `kl` and
`reply_tokens`. beta = 0 drops the KL term and the reference's forward passes (logged as unregularised).

GRPO rather than RLOO (TRL 1.16 has both): TRL's RLOO subtracts beta x KL from the reward before its
leave-one-out baseline, so once the policy moves, a group whose task rewards tie still gets advantages
from KL noise, and reward and regulariser cannot be read apart in the log. GRPO keeps the KL a loss
term of its own, exactly the "keep close to the initial model" regulariser dpo has. The baselines differ
little (group mean vs leave-one-out mean: the same up to a factor G/(G-1) on each advantage).

Policy and reference as in dpo: the SFT adapter is merged into the base in memory, TRL adds a fresh
adapter (peft_config), and the reference is that model with the adapter disabled: no second copy.
`trainable: lm_head` trains only the output projection; the reference is then a frozen copy of the
SFT model, which we hand to TRL ourselves (left alone, TRL would load a reference from the model's
name_or_path: the pretrained base, not the SFT model).

Prompts: the distinct prompts of the preference pairs dpo reads, with the records' `answer` and
`scorer` fields (the tiny world's pairs carry them), which the rule reward needs; the replies of the
pairs are not used. Each prompt is rendered by our chat renderer and so ends at the assistant marker
exactly as training renders it, with control tokens typed in a user's text kept as text: TRL's own
chat templating is bypassed (_tokenize_prompts). Rewards: pipeline/rewards.py (`rule`, `ModelReward`),
weighted by rl.reward.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler, add_fused_lm_head

from pipeline.artifacts import append_jsonl, read_jsonl_tolerant
from pipeline.chat_template import ChatRenderer
from pipeline.data.pairs import split_pairs, tokenize_pairs
from pipeline.data.split import prompt_key
from pipeline.distributed import require_ranks_agree, whole_state_dict
from pipeline.errors import PipelineError
from pipeline.evaluation import SCORED_FIELDS, HeldOut, Settings, evaluate_model, read_scored_questions, summary
from pipeline.generation import context_length, prompts_of, stop_token_ids, within_context
from pipeline.logprobs import completion_logps
from pipeline.models import (
    count_parameters,
    frozen_copy,
    load_stage_model,
    lora_config,
    require_lora_targets,
    save_aligned_policy,
    train_only_lm_head,
)
from pipeline.recipe import RlConfig, ceiling_note, split_batch
from pipeline.rewards import RULES, ModelReward, load_reward_model, rule_reward_function
from pipeline.trainer_args import (
    ChecksumOnSave,
    StopOnNonFinite,
    common_trainer_kwargs,
    epoch_generator,
    resume_checkpoint,
)

# our names for what the issue asks to log per step -> TRL's names
LOGGED = {"reward": "reward", "kl": "kl", "reply_tokens": "completions/mean_length",
          "tied_groups": "frac_reward_zero_std"}

# ---------------------------------------------------------------- data


def prompt_rows(pairs: list[dict], cfg: RlConfig, renderer: ChatRenderer) -> tuple[list[dict], dict]:
    """One row per distinct prompt: the prompt messages and the `answer` / `scorer` columns the rule reads."""
    rows, seen, too_long = [], set(), 0
    for pair in pairs:
        key = prompt_key(pair)
        if key in seen:
            continue
        seen.add(key)
        if len(renderer.prompt_ids(pair["prompt"])) > cfg.max_prompt_length:
            too_long += 1
            continue
        rows.append({"prompt": pair["prompt"], "answer": str(pair.get("answer") or ""),
                     "scorer": str(pair.get("scorer") or "")})
    if not rows:
        raise PipelineError(f"rl: no usable prompts ({len(pairs)} pairs, {too_long} prompts longer than "
                            f"rl.max_prompt_length {cfg.max_prompt_length})")
    unknown = sorted({r["scorer"] for r in rows if r["scorer"] and r["scorer"] not in RULES})
    if unknown and cfg.reward.rule:
        raise PipelineError(f"rl: the training records declare scorer `{unknown[0]}`, which has no rule (known: "
                            f"{', '.join(RULES)}); set rl.reward.rule: 0 to score the replies with the model alone")
    ruled = [r for r in rows if r["scorer"] and r["answer"]]
    without_rule = 0
    if cfg.reward.rule and not cfg.reward.model:
        if not ruled:
            raise PipelineError("rl: rl.reward.rule is the only reward, but no training record declares a rule "
                                "(the `scorer` and `answer` fields the tiny world's dpo_train.jsonl has); give "
                                "rl.reward.model a weight, or train on such records")
        # with the rule alone nothing scores such a prompt: every reply of its group would tie, a step's worth of
        # sampling for no gradient, and TRL would count the group's NaN rewards as neither tied nor untied
        without_rule, rows = len(rows) - len(ruled), ruled
    per_step = cfg.global_batch_size // cfg.num_generations
    if len(rows) < per_step:  # TRL's RepeatSampler drops an incomplete step's prompts: it would train 0 steps
        raise PipelineError(f"rl: {len(rows)} usable prompts, fewer than the {per_step} one step takes "
                            f"(rl.global_batch_size {cfg.global_batch_size} / rl.num_generations "
                            f"{cfg.num_generations}); give more prompts or a smaller rl.global_batch_size")
    return rows, {"prompts": len(rows), "repeated_prompts": len(pairs) - len(seen), "too_long": too_long,
                  "with_rule": len(ruled), "left_out_without_rule": without_rule}


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler with each epoch's order drawn from a generator seeded by (seed, epoch). TRL's draws every
    epoch from one generator seeded when the sampler is made, so a run resumed in its second epoch or later drew
    the first epoch's order again, not the one an uninterrupted run goes on with. Epoch 0 is TRL's order."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:  # called by the trainer (through accelerate) before each epoch
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            seed = self.seed if self.seed is not None else 0
            # epoch 0 as TRL seeds it, so runs that never reach a second epoch are unchanged
            self.generator = epoch_generator(seed, self.epoch) if self.epoch else torch.Generator().manual_seed(seed)
        return super().__iter__()


class GRPOTrainerOnOurPrompts(StopOnNonFinite, GRPOTrainer):
    """GRPOTrainer that renders prompts with our chat renderer, and takes a reference model (lm_head training)."""

    stage_name = "rl"

    def __init__(self, *, renderer: ChatRenderer, reference=None, args, **kwargs):
        self.renderer = renderer
        beta = args.beta
        if reference is not None:
            args.beta = 0.0  # so TRL builds no reference of its own from the model's name_or_path (the base)
        super().__init__(args=args, **kwargs)
        args.beta = self.beta = beta
        if reference is not None and beta:
            add_fused_lm_head(reference, temperature=self.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
            self.ref_model = self.accelerator.prepare_model(reference, evaluation_mode=True)

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        if type(sampler) is not RepeatSampler:
            return sampler
        return EpochSeededRepeatSampler(sampler.data_source, sampler.mini_repeat_count, sampler.batch_size,
                                        sampler.repeat_count, sampler.shuffle, sampler.seed)

    def _tokenize_prompts(self, prompts: list):
        return [self.renderer.prompt_ids(prompt) for prompt in prompts], None, {}


# ---------------------------------------------------------------- rewards


def build_rewards(cfg: RlConfig, ctx) -> tuple[list, list[float], str]:
    """TRL reward functions, their weights, and a line that says what scores the replies."""
    funcs, weights, parts = [], [], []
    if cfg.reward.rule:
        funcs.append(rule_reward_function(cfg.reward.habit_penalty))
        weights.append(cfg.reward.rule)
        parts.append(f"{cfg.reward.rule:g} x rule (the records' scorer; habit penalty {cfg.reward.habit_penalty:g})")
    if cfg.reward.model:
        reward_dir = ctx.output_of("reward")
        model, tokenizer = load_reward_model(reward_dir)
        funcs.append(ModelReward(model.to(ctx.accelerator.device), tokenizer))
        weights.append(cfg.reward.model)
        parts.append(f"{cfg.reward.model:g} x model ({reward_dir})")
    return funcs, weights, " + ".join(parts)


# ---------------------------------------------------------------- logging and evaluation


class RlLog(TrainerCallback):
    """metrics.jsonl: every TRL log, with reward, kl (absent at beta 0), reply_tokens and tied_groups by our names."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled, self.rows = path, enabled, []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        ours = {name: logs[key] for name, key in LOGGED.items() if key in logs}
        if "reward" in ours:
            self.rows.append({"step": state.global_step, **ours})
        if self.enabled:
            append_jsonl(self.path, {"step": state.global_step, **ours, **logs})

    def read_back(self) -> None:
        """A resumed run's steps before its checkpoint, from metrics.jsonl (cut back to the checkpoint), so the
        stage's summary covers the whole run, not only the steps after the resume."""
        if self.path.is_file():
            self.rows = [{"step": r["step"], **{name: r[name] for name in LOGGED if name in r}}
                         for r in read_jsonl_tolerant(self.path) if "reward" in r and "step" in r]


def curve(rows: list[dict]) -> dict:
    """First, last and mean of each logged quantity over training (None where never logged: kl at beta 0)."""
    out = {}
    for name in LOGGED:
        values = [r[name] for r in rows if r.get(name) is not None]
        out[name] = {"first": values[0], "last": values[-1], "mean": sum(values) / len(values)} if values else None
    return out


def reply_rewards(funcs: list, answers: list[dict], replies: list[str]) -> dict:
    """Mean reward of the held-out greedy replies under each reward function (over the records it applies to)."""
    if not answers or not replies:
        return {}
    columns = {"answer": [str(a.get("answer") or "") for a in answers],
               "scorer": [str(a.get("scorer") or "") for a in answers]}
    completions = [[{"role": "assistant", "content": reply}] for reply in replies]
    out = {}
    for func in funcs:
        scores = [s for s in func(prompts=prompts_of(answers), completions=completions, **columns) if s is not None]
        out[f"reply_reward_{func.__name__}"] = sum(scores) / len(scores) if scores else None
    return out


def heldout(policy, tokenizer, pairs: list[dict], answers: list[dict], cfg: RlConfig, seed: int, accelerator,
            funcs: list, kl: bool, reference=None) -> dict:
    """Every metric that applies (pipeline/evaluation.py), the rewards of the greedy replies, and KL from the SFT
    model (`reference`, else the adapter disabled) when asked. No implicit-reward metrics: they are dpo's."""
    settings = Settings(max_new_tokens=cfg.max_new_tokens, seed=seed, batch_size=cfg.generation_batch_size,
                        reference=True, kl_prompts=cfg.eval_limit if kl else 0, sampled=True)
    result = evaluate_model(policy, tokenizer, HeldOut(conversations=answers, pairs=pairs), settings, accelerator,
                            reference)
    return {**result.metrics, **reply_rewards(funcs, answers, result.replies), "examples": result.examples(answers)}


def described(metrics: dict) -> str:
    """The held-out summary line, with the mean reward of the greedy replies under each reward."""
    rewards = [f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("reply_reward_") and v is not None]
    return ", ".join([summary(metrics), *rewards])


# ---------------------------------------------------------------- the stage


def run(cfg: RlConfig, ctx) -> dict:
    from trl import GRPOConfig

    accelerator, seed = ctx.accelerator, ctx.recipe.seed
    world = accelerator.num_processes
    split = split_batch("rl", cfg.global_batch_size, cfg.micro_batch_size, world)

    # model, reference and rewards
    sft_dir = ctx.output_of("sft")  # every SFT adapter merged in memory; TRL adds the fresh rl adapter on top
    model, tokenizer = load_stage_model(sft_dir, merge_all=True)
    cfg = within_context(cfg, "max_prompt_length", model, ctx.log, reserve=cfg.max_new_tokens)
    renderer = ChatRenderer(tokenizer)
    # TRL stops a sampled reply at the model's eos ids: make that the end of the assistant's turn, as in chat
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, renderer)
    reference = None  # lora: the policy with its adapter disabled
    if cfg.trainable == "lora":
        require_lora_targets(model, cfg.lora, "rl")
    if cfg.trainable == "lm_head":
        # on the policy's device: TRL prepares (and so moves) a reference only when beta > 0, and the KL after
        # training reads it either way
        reference = frozen_copy(model).to(accelerator.device)
        train_only_lm_head(model)
    funcs, weights, scored_by = build_rewards(cfg, ctx)

    # data
    pairs, report, eval_pairs = split_pairs(cfg, seed, keep=SCORED_FIELDS)
    rows, prompts = prompt_rows(pairs, cfg, renderer)
    train_set = Dataset.from_list(rows)
    eval_pairs = eval_pairs[: cfg.eval_limit]
    answers = read_scored_questions(cfg.answer_data, cfg.eval_limit)
    left_out = prompts["left_out_without_rule"]
    ctx.log(f"{prompts['prompts']:,} prompts ({prompts['with_rule']:,} with a rule) from {len(pairs):,} pairs; "
            f"repeated {prompts['repeated_prompts']}; too long {prompts['too_long']}; "
            f"{f'without a rule (the only reward) {left_out}; ' if left_out else ''}dropped "
            f"{report['dropped'] or 'none'}; reference = the SFT model ({sft_dir})")

    started = time.perf_counter()
    args = GRPOConfig(
        **common_trainer_kwargs(cfg, ctx, split, ctx.recipe.base.dtype if ctx.recipe.base else "auto"),
        beta=cfg.beta,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        reward_weights=weights,
        loss_type="dapo",  # TRL's default, pinned: token losses averaged over all reply tokens of the step
        scale_rewards="group",  # GRPO's advantage: (r - group mean) / group std
        disable_dropout=True,  # policy and reference log-probs are compared token by token
        log_completions=False,
    )
    log = RlLog(ctx.out_dir / "metrics.jsonl", ctx.is_main)
    trainer = GRPOTrainerOnOurPrompts(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.lora) if cfg.trainable == "lora" else None,
        callbacks=[log, ChecksumOnSave()],
        renderer=renderer,
        reference=reference,
    )
    policy = trainer.model
    setup_s = time.perf_counter() - started
    trainable, total = count_parameters(policy)
    what = f"fresh LoRA r={cfg.lora.r}" if cfg.trainable == "lora" else "lm_head only (untied)"
    regulariser = f"beta {cfg.beta:g} (KL to the SFT model)" if cfg.beta else \
        "beta 0: unregularised (no KL penalty to the SFT model, none logged)"
    ctx.log(f"{what}: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%); "
            f"{cfg.global_batch_size // cfg.num_generations} prompts x {cfg.num_generations} replies: "
            f"{split.describe('replies')}{ceiling_note(split, cfg.micro_batch_size)}; {regulariser}; "
            f"reward = {scored_by}")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    before = heldout(policy, tokenizer, eval_pairs, answers, cfg, seed, accelerator, funcs, kl=False,
                     reference=reference)
    ctx.log(f"held-out before rl ({len(eval_pairs)} pairs, {len(answers)} questions): {described(before)}")
    last = resume_checkpoint(ctx)
    if last and ctx.is_main:  # only the main process writes the log
        log.read_back()
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    train_s = setup_s + time.perf_counter() - started
    policy = trainer.model
    in_sync = require_ranks_agree("rl", policy, accelerator, trainable_only=True)
    tied = [r["tied_groups"] for r in log.rows if r.get("tied_groups") is not None]
    no_signal = bool(tied) and min(tied) == 1.0
    if no_signal:
        ctx.log("WARNING: every group's rewards tied at every logged step: no learning signal, the policy did not "
                "move; use a reward that tells the replies apart (rl.reward), more replies per prompt "
                "(rl.num_generations) or a higher rl.temperature")

    after = heldout(policy, tokenizer, eval_pairs, answers, cfg, seed, accelerator, funcs, kl=True,
                    reference=reference)
    ctx.log(f"held-out after rl: {described(after)}")
    # a fingerprint of the final in-memory policy, so a rebuild from the saved folders can be checked
    probe_rows, _ = tokenize_pairs(pairs[:4], renderer, max_length=context_length(policy))
    probe = completion_logps(policy, [(r["prompt_ids"], r["chosen_ids"]) for r in probe_rows], pad_id).tolist()

    state = whole_state_dict(trainer)
    if ctx.is_main:
        save_aligned_policy(accelerator.unwrap_model(policy), tokenizer, renderer, ctx.out_dir, sft_dir,
                            cfg.trainable, "rl", state)
    accelerator.wait_for_everyone()
    return {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "prompts": len(train_set),
        "train_s": train_s,
        "data": {**report, **prompts},
        "beta": cfg.beta,
        "regularised": cfg.beta > 0,
        "reward": scored_by,
        "num_generations": cfg.num_generations,
        "prompts_per_step": cfg.global_batch_size // cfg.num_generations,
        "trainable": cfg.trainable,
        "trainable_parameters": trainable,
        "gradient_accumulation": split.accumulation,
        "micro_batch": split.micro_batch,
        "world_size": world,
        "ranks_in_sync": in_sync,
        "training": curve(log.rows),  # reward, kl, reply_tokens, tied_groups per step: metrics.jsonl
        "no_signal": no_signal,
        "heldout_before": before,
        "heldout_after": after,
        "probe_chosen_logps": probe,
    }
