"""Generate replies to chat prompts, rendered exactly as training renders them."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from pipeline.chat_template import ChatRenderer
from pipeline.errors import PipelineError, is_out_of_memory


def stop_token_ids(tokenizer, renderer: ChatRenderer) -> list[int]:
    """Generation stops at the end of the assistant's turn (and at eos, for models that use it)."""
    ids = [renderer.end_of_turn]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def context_length(model) -> int:
    """Positions the model can attend to (prompt and reply together); 2048 where its config names none."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None) or 2048


def within_context(cfg, key: str, model, log, reserve: int = 0):
    """`cfg` with its length limit `key` lowered to what the model's context leaves after `reserve` tokens (the
    sampled reply, for rl's prompts), and a log line saying so; `cfg` itself where it fits. Past its positions a
    model's outputs mean nothing (one with learned position embeddings fails outright), so rows longer than the
    context meet the stage's too-long policy like any other over-long row."""
    room = context_length(model) - reserve
    if room < 1:
        raise PipelineError(f"{key}: the model's context ({context_length(model)} positions) leaves no room once "
                            f"{reserve} reply tokens are reserved; lower max_new_tokens")
    if getattr(cfg, key) <= room:
        return cfg
    log(f"{key} {getattr(cfg, key)} is more than the model's context leaves ({room} tokens"
        f"{f' after {reserve} for the reply' if reserve else ''}): longer rows count as too long")
    return dataclasses.replace(cfg, **{key: room})


class Reply(NamedTuple):
    text: str
    tokens: int  # generated before the stop token (or all of them when none came)
    ended: bool  # the reply closed with an end-of-turn (or eos) token within the limit


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 48, batch_size: int = 32,
                     do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     seed: int = 0, accelerator=None, details: bool = False) -> list:
    """One reply per conversation (each ends with a user turn); greedy unless do_sample.

    With `details`, each reply is a Reply (text, generated tokens up to the stop, whether it ended
    with an end-of-turn or eos token within max_new_tokens) instead of the text alone.

    With an `accelerator` of several processes the batches are dealt out round-robin and every
    process gets all replies back, in order. Each batch is seeded by its index, so the replies are
    the same on any number of processes. A batch that runs out of memory is split in halves (and
    later batches too); greedy replies stay the same, sampled ones are drawn afresh.
    """
    renderer = ChatRenderer(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else renderer.end_of_turn
    device = next(model.parameters()).device
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or None, top_p=top_p) \
        if do_sample else dict(do_sample=False, temperature=None, top_k=None, top_p=None)

    def answer(batch_prompts: list[list[dict]], batch_seed: int) -> list[str]:
        torch.manual_seed(batch_seed)
        batch = [renderer.prompt_ids(p) for p in batch_prompts]
        width = max(map(len, batch))
        # left padding, so every prompt ends where its reply begins
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        stops = stop_token_ids(tokenizer, renderer)
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                             eos_token_id=stops, pad_token_id=pad_id, **sampling)
        replies = []
        for row in out[:, width:].tolist():
            ended = next((i for i, token in enumerate(row) if token in stops), None)
            text = tokenizer.decode(row[:ended], skip_special_tokens=True)
            # templates that put a space between the role marker and the text leave it on the reply
            text = text[1:] if text.startswith(" ") else text
            replies.append(Reply(text, len(row) if ended is None else ended, ended is not None) if details else text)
        return replies

    limit = [batch_size]  # shrinks for the rest of the call once a batch ran out of memory

    def answer_within_memory(batch_prompts: list[list[dict]], batch_seed: int) -> list[str]:
        """answer() in chunks of at most limit[0] prompts; out of memory halves the limit and retries."""
        replies: list[str] = []
        while len(replies) < len(batch_prompts):
            chunk = batch_prompts[len(replies) : len(replies) + limit[0]]
            try:
                replies += answer(chunk, batch_seed + len(replies))
            except Exception as exc:
                if not is_out_of_memory(exc) or limit[0] == 1:
                    raise
                limit[0] = (min(limit[0], len(chunk)) + 1) // 2
                print(f"generation ran out of memory ({type(exc).__name__}); retrying with batches of {limit[0]}",
                      flush=True)
        return replies

    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    was_training = model.training
    model.eval()
    mine: dict[int, list[str]] = {}
    device = next(model.parameters()).device
    # the seeding above must not leak into training: the CPU generator and, on a GPU, the device's are put back
    # (a CUDA generator reseeded alike on every rank would undo the per-process seeds trainers such as TRL's set)
    accelerators = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=accelerators):
            # every process makes the same number of generate calls: a sharded model (FSDP, ZeRO-3)
            # needs all of them in each forward pass, so a process out of batches repeats the last one
            for first in range(0, len(batches), world):
                index = first + rank
                if index < len(batches):
                    mine[index] = answer_within_memory(batches[index], seed + index)
                else:
                    answer_within_memory(batches[-1], seed)
    finally:
        model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        for part in gather_object([mine]):
            mine.update(part)
    return [reply for i in range(len(batches)) for reply in mine[i]]


def prompts_of(records: list[dict]) -> list[list[dict]]:
    """The conversation up to (not including) its final assistant turn."""
    prompts = []
    for record in records:
        messages = record["messages"]
        prompts.append(messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages)
    return prompts
