"""Held-out evaluation: one module that measures any model the same way, with one name per metric.

sft and dpo call `evaluate_model` before and after training, and the eval stage calls it for
every stage, on the same held-out data. Generic metrics apply to any chat data; data-specific
scorers (the tiny world's answer accuracy and habit rate) run only on records that declare them
in a `scorer` field, so an Alpaca or HH-RLHF run never reports a meaningless "habit rate".
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from pipeline.chat_template import ChatRenderer
from pipeline.data.pairs import tokenize_pairs
from pipeline.errors import PipelineError
from pipeline.generation import context_length, generate_replies, prompts_of
from pipeline.logprobs import completion_logps, perplexity_of, sequence_kl, summed_loss

# name -> what it means; the report prints the labels of the metrics that apply
METRICS = {
    "text_perplexity": "held-out text perplexity (lower is better)",
    "response_perplexity": "perplexity of the reference replies, assistant tokens only (lower is better)",
    "eot_rate": "replies that end with the end-of-turn token within the limit",
    "reply_tokens": "mean reply length (tokens)",
    "answer_accuracy": "held-out answer accuracy (tiny world)",
    "habit_rate": "undesired habit rate, greedy (tiny world)",
    "habit_rate_sampled": "undesired habit rate, sampled (tiny world)",
    "empty_rate": "empty replies",
    "prefers_chosen": "prefers chosen over rejected (log-likelihood)",
    "reward_accuracy": "preference accuracy (implicit reward vs the reference)",
    "reward_margin": "mean reward margin (beta x log-ratio vs the reference)",
    "chosen_perplexity": "perplexity of the chosen replies (lower is better)",
    "pairs_too_long": "held-out pairs left out: longer than the model's context",
    "kl_from_reference": "KL from the reference model (nats per reply)",
    "reward_score": "reward model's mean score of the replies (the run's reward stage; higher is better)",
}

# held-out record fields the readers keep: the expected answer, what it is about, which scorer applies
SCORED_FIELDS = ("answer", "attribute", "scorer")


def read_scored_questions(files: list[str], limit: int) -> list[dict]:
    """Held-out questions (conversations) with the fields their scorer needs, at most `limit` of them."""
    from pipeline.data.readers import read_records

    records = [r for file in files for r in read_records(file, "conversation", keep=SCORED_FIELDS).records]
    return records[:limit]


@dataclass
class HeldOut:
    """What a model is measured on; each part is optional."""

    texts: list[str] = field(default_factory=list)
    conversations: list[dict] = field(default_factory=list)  # each ends with its reference assistant reply
    pairs: list[dict] = field(default_factory=list)  # prompt / chosen / rejected


@dataclass
class Settings:
    max_new_tokens: int = 48
    seed: int = 0
    batch_size: int = 32  # prompts per generate call
    beta: float | None = None  # the implicit reward's scale; None: no reward metrics
    reference: bool = False  # measure against a reference: the `reference` model given, else the disabled adapter
    kl_prompts: int = 0  # sampled replies for KL(model || reference); 0: no KL
    sampled: bool = False  # also sample replies (habit rate under sampling, where a scorer declares it)
    text_seq_len: int = 128


@dataclass
class Evaluation:
    metrics: dict
    replies: list[str]  # greedy replies to the conversations' prompts, in order

    def examples(self, conversations: list[dict], n: int = 5) -> list[dict]:
        return [{"prompt": prompts_of([c])[0][-1]["content"], "reply": reply,
                 **({"answer": c["answer"]} if c.get("answer") else {})}
                for c, reply in list(zip(conversations, self.replies))[:n]]


def evaluate_model(model, tokenizer, data: HeldOut, settings: Settings, accelerator=None, reference=None) -> Evaluation:
    """Every metric that applies to `data`; generation is split across the processes of `accelerator`.
    `reference`: a separate frozen reference model (dpo with trainable lm_head); without one the
    reference is `model` with its adapter disabled."""
    renderer = ChatRenderer(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else renderer.end_of_turn
    was_training = model.training
    model.eval()
    metrics: dict = {}
    replies: list[str] = []
    try:
        if data.texts:
            metrics["text_perplexity"] = text_perplexity(model, tokenizer, data.texts, settings.text_seq_len)
        if data.conversations:
            rows = [tuple(_as_row(renderer.render(c["messages"]))) for c in data.conversations]
            metrics["response_perplexity"] = perplexity_of(model, rows, pad)
            common = dict(max_new_tokens=settings.max_new_tokens, seed=settings.seed,
                          batch_size=settings.batch_size, accelerator=accelerator)
            prompts = prompts_of(data.conversations)
            detailed = generate_replies(model, tokenizer, prompts, details=True, **common)
            replies = [r.text for r in detailed]
            metrics["eot_rate"] = sum(r.ended for r in detailed) / len(detailed)
            metrics["reply_tokens"] = sum(r.tokens for r in detailed) / len(detailed)
            metrics.update(run_scorers(data.conversations, replies))
            if settings.sampled and _scorers_of(data.conversations):
                sampled = generate_replies(model, tokenizer, prompts, do_sample=True, **common)
                scored = run_scorers(data.conversations, sampled)
                if "habit_rate" in scored:
                    metrics["habit_rate_sampled"] = scored["habit_rate"]
        if data.pairs:
            metrics.update(preference_metrics(model, renderer, data.pairs, pad, settings, reference))
        if settings.reference and settings.kl_prompts:
            prompts = [p["prompt"] for p in data.pairs] or prompts_of(data.conversations)
            metrics["kl_from_reference"] = kl_from_reference(model, tokenizer, renderer, prompts[: settings.kl_prompts],
                                                             settings, accelerator, reference)
    finally:
        model.train(was_training)
    return Evaluation(metrics, replies)


def _as_row(rendered) -> tuple[list[int], list[int]]:
    return rendered.input_ids, rendered.assistant_mask


# ---------------------------------------------------------------- generic metrics


@torch.no_grad()
def text_perplexity(model, tokenizer, texts: list[str], seq_len: int = 128, batch_size: int = 16) -> float | None:
    """Packed held-out blocks exactly as pretraining evaluates them (documents kept apart)."""
    from pipeline.data.packing import pack, tokenize_documents

    try:
        blocks = pack(tokenize_documents(texts, tokenizer), seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)
    except ValueError:
        return None
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        loss, n = summed_loss(model, blocks, list(range(start, min(start + batch_size, len(blocks)))), None)
        total, count = total + loss.item(), count + n
    return math.exp(total / count) if count else None


@torch.no_grad()
def preference_metrics(model, renderer, pairs: list[dict], pad_id: int, settings: Settings, reference=None) -> dict:
    """Log-likelihood preference and chosen-reply perplexity; against the reference (`reference`, else
    the adapter disabled) also the implicit rewards beta * (log pi - log ref). Ties count as half a win."""
    # every pair that fits the context: past its positions a model's log-probs mean nothing
    rows, too_long = tokenize_pairs(pairs, renderer, max_length=context_length(model))
    if not rows:
        return {}
    chosen = [(r["prompt_ids"], r["chosen_ids"]) for r in rows]
    rejected = [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
    policy_w, policy_l = completion_logps(model, chosen, pad_id), completion_logps(model, rejected, pad_id)
    chosen_tokens = sum(len(c) for _, c in chosen)
    out = {
        "prefers_chosen": _share(policy_w - policy_l),
        "chosen_perplexity": math.exp(-float(policy_w.sum()) / chosen_tokens) if chosen_tokens else None,
        "chosen_logp": policy_w.mean().item(),
        "rejected_logp": policy_l.mean().item(),
        "pairs": len(rows),
        **({"pairs_too_long": too_long} if too_long else {}),
    }
    if settings.reference and settings.beta is not None:
        with _reference_of(model, reference) as ref:
            ref_w, ref_l = completion_logps(ref, chosen, pad_id), completion_logps(ref, rejected, pad_id)
        margin = settings.beta * ((policy_w - ref_w) - (policy_l - ref_l))
        out["reward_accuracy"] = _share(margin)
        out["reward_margin"] = margin.mean().item()
    return out


def _share(difference: torch.Tensor) -> float:
    """Share of positive entries, a tie counting as half: at step 0 every pair is a tie (0.5)."""
    return ((difference > 0).float() + 0.5 * (difference == 0).float()).mean().item()


def kl_from_reference(model, tokenizer, renderer, prompts: list[list[dict]], settings: Settings,
                      accelerator=None, reference=None) -> float:
    """Mean sequence KL(model || reference) over replies sampled from the model (the reference is
    `reference` when given, else the model with its adapter disabled)."""
    if not prompts:
        return float("nan")
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens, do_sample=True,
                               seed=settings.seed, batch_size=settings.batch_size, accelerator=accelerator)
    pairs = []
    for prompt, reply in zip(prompts, replies):
        ids = renderer.prompt_ids(prompt)
        reply_ids = renderer.render(prompt + [{"role": "assistant", "content": reply}]).input_ids[len(ids):]
        pairs.append((ids, reply_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return sequence_kl(model, reference if reference is not None else _Reference(model), pairs, pad).mean().item()


@contextmanager
def _reference_of(model, reference):
    """The model to score the reference with: `reference` when given, else `model` with its adapter off."""
    if reference is not None:
        reference.eval()
        yield reference
    else:
        with model.disable_adapter():
            yield model


class _Reference(torch.nn.Module):
    """The model with its adapter switched off, as a separate callable for sequence_kl."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        with self.model.disable_adapter():
            return self.model(**kwargs)


# ---------------------------------------------------------------- data-specific scorers


def tiny_world_scores(records: list[dict], replies: list[str]) -> dict:
    """Answer accuracy (first sentence, after any preamble), per attribute where records name one
    (which kinds of fact fail), and the rate of the undesired habit."""
    from pipeline.data.world import answer_correct, has_habit

    hits: dict[str, list[bool]] = {}
    for record, reply in zip(records, replies):
        if record.get("answer"):
            hit = answer_correct(reply, record["answer"])
            hits.setdefault("all", []).append(hit)
            if record.get("attribute"):
                hits.setdefault(record["attribute"], []).append(hit)
    scored = hits.pop("all", [])
    out = {
        "answer_accuracy": sum(scored) / len(scored) if scored else None,
        "habit_rate": sum(has_habit(r) for r in replies) / len(replies) if replies else None,
        "empty_rate": sum(not r.strip() for r in replies) / len(replies) if replies else None,
        "scored": len(scored),
    }
    if hits:
        out["accuracy_by_attribute"] = {name: sum(h) / len(h) for name, h in sorted(hits.items())}
    return out


SCORERS = {"tiny_world": tiny_world_scores}


def _scorers_of(records: list[dict]) -> list[str]:
    return sorted({r["scorer"] for r in records if r.get("scorer")})


def run_scorers(records: list[dict], replies: list[str]) -> dict:
    """Each scorer that some records declare, on those records and their replies."""
    out: dict = {}
    for name in _scorers_of(records):
        if name not in SCORERS:
            raise PipelineError(f"held-out data declares scorer `{name}`, which does not exist "
                                f"(known: {', '.join(SCORERS)})")
        mine = [(r, reply) for r, reply in zip(records, replies) if r.get("scorer") == name]
        out.update(SCORERS[name]([r for r, _ in mine], [reply for _, reply in mine]))
    return out


def metrics_that_apply(results: dict[str, dict]) -> list[str]:
    """Metric names present in any stage's results, in METRICS order."""
    return [name for name in METRICS if any(r.get(name) is not None for r in results.values())]


def summary(metrics: dict) -> str:
    """One log line of the metrics that apply."""
    parts = []
    for name in METRICS:
        value = metrics.get(name)
        if value is not None:
            parts.append(f"{name} {value:.3f}" if isinstance(value, float) else f"{name} {value}")
    return ", ".join(parts) or "(no held-out data)"
