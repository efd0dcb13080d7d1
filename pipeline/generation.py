"""Generate answers to chat prompts, rendered exactly as training renders them, and score them."""

from __future__ import annotations

import torch

from pipeline.chat_template import ChatRenderer


def stop_token_ids(tokenizer, renderer: ChatRenderer) -> list[int]:
    """Generation stops at the end of the assistant's turn (and at eos, for models that use it)."""
    ids = [renderer.end_of_turn]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 48, batch_size: int = 32,
                     do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int = 0) -> list[str]:
    """One reply per conversation (each ends with a user turn); greedy unless do_sample."""
    renderer = ChatRenderer(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else renderer.end_of_turn
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    replies: list[str] = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for start in range(0, len(prompts), batch_size):
            batch = [renderer.prompt_ids(p) for p in prompts[start : start + batch_size]]
            width = max(map(len, batch))
            # left padding, so every prompt ends where its reply begins
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
            sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or None, top_p=top_p) \
                if do_sample else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 eos_token_id=stop_token_ids(tokenizer, renderer), pad_token_id=pad_id, **sampling)
            for row in out[:, width:]:
                reply = tokenizer.decode(row, skip_special_tokens=True)
                # templates that put a space between the role marker and the text leave it on the reply
                replies.append(reply[1:] if reply.startswith(" ") else reply)
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return replies


# held-out record fields the readers keep for scoring: the expected answer, and what it is about
SCORED_FIELDS = ("answer", "attribute")


def score_answers(records: list[dict], replies: list[str]) -> dict:
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
    habits = sum(has_habit(reply) for reply in replies)
    empty = sum(not reply.strip() for reply in replies)
    out = {
        "answer_accuracy": sum(scored) / len(scored) if scored else None,
        "habit_rate": habits / len(replies) if replies else None,
        "empty_rate": empty / len(replies) if replies else None,
        "scored": len(scored),
    }
    if hits:
        out["accuracy_by_attribute"] = {name: sum(h) / len(h) for name, h in sorted(hits.items())}
    return out


def prompts_of(records: list[dict]) -> list[list[dict]]:
    """The conversation up to (not including) its final assistant turn."""
    prompts = []
    for record in records:
        messages = record["messages"]
        prompts.append(messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages)
    return prompts
