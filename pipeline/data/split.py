"""A held-out share of a training file, for data that comes without a separate evaluation split.

A record is held out by a seeded hash of its prompt, not by its position: the decision is the
same in every stage and every file, so an instruction that sft held out is held out by dpo too
(the rasbt instruction and preference files share their 1,100 prompts), and adding records to
a file never moves old ones between the halves.
"""

from __future__ import annotations

import hashlib
import json


def prompt_key(record: dict) -> str:
    """The conversation up to its last assistant turn (conversations), or the prompt (pairs)."""
    if "prompt" in record:
        messages = record["prompt"]
    else:
        messages = record["messages"]
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def is_held_out(record: dict, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}\n{prompt_key(record)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_held_out(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(kept for training, held out); nothing is held out at fraction 0."""
    if fraction <= 0:
        return records, []
    train, held = [], []
    for record in records:
        (held if is_held_out(record, fraction, seed) else train).append(record)
    return train, held
