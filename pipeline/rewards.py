"""Reward models: one scalar per reply, from a language model's own backbone.

A reward model is transformers' sequence-classification class with one label: a backbone and a
`score` head (hidden -> 1) read at the last token that is not padding. The reward stage builds
it on the SFT model's backbone, trains a LoRA plus the head, and saves both as a peft adapter
(task type SEQ_CLS) on top of the SFT model. Loading it with plain transformers + peft (the same
recipe is written into the stage's lineage.json):

    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(RUN/pretrain), RUN/sft).merge_and_unload()
    rm = AutoModelForSequenceClassification.from_pretrained(RUN/pretrain, num_labels=1)
    rm.model = sft.model                  # the SFT backbone: both classes keep it in `.model`
    rm.config.pad_token_id = tokenizer.pad_token_id   # where the score is read: the last non-pad token
    rm = PeftModel.from_pretrained(rm, RUN/reward)    # the reward LoRA and the trained score head

The metrics here are the reward stage's (and later the rl and eval stages'): held-out pairwise
accuracy and margin, and, where the records declare the tiny-world scorer, how often the reply
with the right fact outscores the same reply with a wrong one.

The rl stage's rewards are here too, as TRL reward functions (called with the prompts, the sampled
replies and the dataset's other columns; one float per reply, or None where a reward does not
apply): `rule` (the rule a record's `scorer` field names, built from that data's own scorers) and
`ModelReward` (a reward stage's model).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from pipeline.chat_template import ChatRenderer
from pipeline.data.pairs import pair_length, tokenize_pair, tokenize_pairs
from pipeline.errors import PipelineError
from pipeline.generation import context_length
from pipeline.lineage import lineage_head, read_lineage, require_current

HEAD = "sequence-classification"  # lineage.json `head` of a reward stage
LOAD_NOTE = ("a reward model: AutoModelForSequenceClassification (num_labels=1) whose backbone is the base with every "
             "earlier adapter merged (`rm.model = merged_causal_lm.model`), config.pad_token_id = the tokenizer's "
             "pad id, then the last adapter (LoRA + score head) with PeftModel.from_pretrained; or "
             "pipeline.rewards.load_reward_model(stage folder)")


# ---------------------------------------------------------------- the model


def reward_model_from(causal, pad_token_id: int | None):
    """A one-label sequence-classification model on the causal LM's own backbone (the same module,
    no copy), with a zero `score` head: every reply scores 0 until trained, so at step 0 every
    pair ties (Bradley-Terry loss ln 2, accuracy 0.5), as dpo starts at ln 2.

    The class is built on the meta device and only its head is made real: the backbone it would
    allocate and initialise (billions of weights for a real base) is replaced straight away.
    """
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal.config)
    config.num_labels = 1
    config.get_text_config().pad_token_id = pad_token_id
    config.architectures = None  # set again on save, from the class
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    except ValueError as exc:  # an architecture without a sequence-classification class
        raise PipelineError(f"reward: {type(causal).__name__} has no sequence-classification class in "
                            f"transformers ({str(exc).splitlines()[0]})") from None
    backbone = getattr(causal, causal.base_model_prefix, None)
    if backbone is None or not isinstance(getattr(model, "score", None), torch.nn.Linear):
        raise PipelineError(f"reward: cannot put a score head on {type(causal).__name__} (no `{causal.base_model_prefix}` "
                            f"backbone, or {type(model).__name__} has no `score` layer)")
    setattr(model, model.base_model_prefix, backbone)
    weight = next(backbone.parameters())
    model.score = torch.nn.Linear(model.score.in_features, 1, bias=False, dtype=weight.dtype, device=weight.device)
    torch.nn.init.zeros_(model.score.weight)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise PipelineError(f"reward: {type(model).__name__} keeps weights outside its backbone: {left[:3]}")
    return model


def load_reward_model(stage_dir: str | Path):
    """A reward stage's model (eval mode) and tokenizer: the SFT chain merged, the score class on
    its backbone, the reward adapter (LoRA + trained head) loaded on top."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from pipeline.models import load_chain

    stage_dir = Path(stage_dir)
    require_current(stage_dir)
    if not (stage_dir / "lineage.json").is_file() or lineage_head(stage_dir) != HEAD:
        raise PipelineError(f"{stage_dir}: not a reward stage (its lineage.json does not end in a score head)")
    base, adapters, options = read_lineage(stage_dir)
    tokenizer = AutoTokenizer.from_pretrained(stage_dir)
    causal = load_chain(stage_dir, base, adapters[:-1], options, merge_all=True)
    model = PeftModel.from_pretrained(reward_model_from(causal, tokenizer.pad_token_id), adapters[-1])
    return model.eval(), tokenizer


# ---------------------------------------------------------------- scores and metrics


@torch.no_grad()
def reward_scores(model, sequences: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """(N,) float32 rewards of whole token sequences (prompt and reply rendered together), right-padded
    with the model's pad id so the head reads each sequence's own last token."""
    pad_id = model.config.get_text_config().pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start: start + batch_size]
            ids = torch.full((len(batch), max(map(len, batch))), pad_id if pad_id is not None else 0)
            attention = torch.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                attention[row, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
            out.append(logits[:, 0].float().cpu())  # (B, 1) -> (B,)
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def reply_scores(model, renderer: ChatRenderer, prompts: list[list[dict]], replies: list[str]) -> torch.Tensor:
    """(N,) rewards of each reply to its prompt (a list of messages), rendered as the reward stage rendered pairs."""
    return reward_scores(model, [renderer.render([*prompt, {"role": "assistant", "content": reply}]).input_ids
                                 for prompt, reply in zip(prompts, replies)])


def _share(margin: torch.Tensor) -> float:
    """Share of positive margins, a tie counting as half: the zero head at step 0 gives 0.5."""
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item()


def _pair_rewards(model, renderer: ChatRenderer, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """(N,) rewards of each pair's chosen and rejected side, and the N pairs they score, in order: every pair that
    fits the model's context (past its positions a score means nothing; learned positions fail outright)."""
    room = context_length(model)
    kept = [(pair, row) for pair in pairs if pair_length(row := tokenize_pair(renderer, pair)) <= room]
    chosen = reward_scores(model, [r["prompt_ids"] + r["chosen_ids"] for _, r in kept])
    rejected = reward_scores(model, [r["prompt_ids"] + r["rejected_ids"] for _, r in kept])
    return chosen, rejected, [pair for pair, _ in kept]


def pairwise_metrics(model, renderer: ChatRenderer, pairs: list[dict]) -> dict:
    """Held-out pairwise accuracy (r_chosen > r_rejected) and mean margin r_chosen - r_rejected."""
    chosen, rejected, scored = _pair_rewards(model, renderer, pairs)
    if not scored:
        return {}
    margin = chosen - rejected
    return {"pairwise_accuracy": _share(margin), "mean_margin": margin.mean().item(),
            "chosen_reward": chosen.mean().item(), "rejected_reward": rejected.mean().item(), "pairs": len(scored),
            **({"pairs_too_long": len(pairs) - len(scored)} if len(scored) < len(pairs) else {})}


def _wrong_fact_pairs(records: list[dict], seed: int) -> list[dict]:
    """Right-vs-wrong fact pairs from the records that declare the tiny-world scorer (pipeline/data/world.py)."""
    from pipeline.data.world import wrong_fact_pairs

    return wrong_fact_pairs([r for r in records if r.get("scorer") == "tiny_world"], seed)


def fact_ranking(model, renderer: ChatRenderer, records: list[dict], seed: int) -> dict:
    """On held-out questions of the tiny world (records that declare its scorer): the share where the
    reply with the right fact outscores the same reply with another person's value (pipeline/data/world.py),
    overall and per attribute (one attribute near chance shows where the score does not read the facts)."""
    chosen, rejected, pairs = _pair_rewards(model, renderer, _wrong_fact_pairs(records, seed))
    if not pairs:
        return {}
    margin = chosen - rejected
    by_attribute = {}
    for attribute in sorted({p["attribute"] for p in pairs}):
        rows = torch.tensor([p["attribute"] == attribute for p in pairs])
        by_attribute[attribute] = {"ranking": _share(margin[rows]), "questions": int(rows.sum())}
    return {"fact_ranking": _share(margin), "fact_margin": margin.mean().item(), "fact_questions": len(pairs),
            "fact_ranking_by_attribute": by_attribute}


def likelihood_fact_ranking(causal, renderer: ChatRenderer, records: list[dict], seed: int, pad_id: int) -> dict:
    """fact_ranking's pairs ranked by a causal LM's own log-likelihood of each reply instead of a score: for the
    SFT model it says how much of what the model knows the reward model's head has learnt to read."""
    from pipeline.logprobs import completion_logps

    rows, _ = tokenize_pairs(_wrong_fact_pairs(records, seed), renderer, max_length=context_length(causal))
    if not rows:
        return {}
    chosen = completion_logps(causal, [(r["prompt_ids"], r["chosen_ids"]) for r in rows], pad_id)
    rejected = completion_logps(causal, [(r["prompt_ids"], r["rejected_ids"]) for r in rows], pad_id)
    return {"likelihood_fact_ranking": _share(chosen - rejected)}


# ---------------------------------------------------------------- rewards for rl


def tiny_world_rule(reply: str, answer: str, habit_penalty: float) -> float:
    """1 if the reply states the right fact, else 0 (the world's own answer_correct: the first sentence after any
    preamble); minus `habit_penalty` when the habit's preamble is there (has_habit). The right fact after a
    preamble scores 1 - habit_penalty, so a plain right answer is what scores best."""
    from pipeline.data.world import answer_correct, has_habit

    return float(answer_correct(reply, answer)) - habit_penalty * float(has_habit(reply))


# a record's `scorer` -> its rule, as pipeline/evaluation.py SCORERS maps it to the held-out metrics
RULES = {"tiny_world": tiny_world_rule}


def rule_reward(reply: str, record: dict, habit_penalty: float) -> float | None:
    """The rule the record declares in its `scorer` field, or None where it declares none or has no `answer`."""
    rule = RULES.get(record.get("scorer") or "")
    if rule is None or not record.get("answer"):
        return None
    return rule(reply, record["answer"], habit_penalty)


def reply_text(completion) -> str:
    """A sampled reply as text: TRL passes [{"role": "assistant", "content": ...}] for chat prompts. The space a
    template puts after the role marker is decoded with the reply; generate_replies drops it the same way."""
    text = completion[-1]["content"] if isinstance(completion, list) else completion
    return text[1:] if text.startswith(" ") else text


def rule_reward_function(habit_penalty: float):
    """TRL reward function `rule`: the dataset's `answer` and `scorer` columns arrive as keyword arguments."""

    def rule(prompts, completions, answer, scorer, **_) -> list[float | None]:
        return [rule_reward(reply_text(c), {"answer": a, "scorer": s}, habit_penalty)
                for c, a, s in zip(completions, answer, scorer)]

    return rule


class ModelReward:
    """TRL reward function `model`: a reward stage's model scores prompt + reply, rendered by our chat renderer
    exactly as the reward stage rendered its pairs (TRL's own path would re-template the text, and parse any
    control tokens typed in a user's message)."""

    def __init__(self, model, tokenizer):
        self.model, self.renderer = model, ChatRenderer(tokenizer)
        self.__name__ = "model"  # TRL logs it as rewards/model/mean

    def __call__(self, prompts, completions, **_) -> list[float]:
        return reply_scores(self.model, self.renderer, prompts, [reply_text(c) for c in completions]).tolist()
