"""Preference pairs read from files and rendered to ids exactly as training renders them."""

from __future__ import annotations

import time

from pipeline.chat_template import ChatRenderer
from pipeline.config_schema import reads
from pipeline.data.readers import read_records
from pipeline.data.split import split_held_out
from pipeline.errors import PipelineError


def load_pairs(files: list[str], fmt: str, on_bad: str, keep: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
    """`keep`: top-level fields copied into each pair when present (rl keeps the tiny world's `answer` and `scorer`)."""
    pairs, report = [], {"dropped": {}, "duplicates": 0, "problems": []}
    for file in files:
        result = read_records(file, "preference", fmt, on_bad=on_bad, keep=keep)
        pairs += result.records
        report["duplicates"] += result.duplicates
        report["problems"] += result.problems[:5]
        for reason, count in result.dropped.items():
            report["dropped"][reason] = report["dropped"].get(reason, 0) + count
    return pairs, report


def split_pairs(cfg, seed: int, keep: tuple[str, ...] = ()) -> tuple[list[dict], dict, list[dict]]:
    """(training pairs, read report, held-out pairs): eval_data, or eval_split of train_data.

    `cfg` is a stage section that reads pairs (dpo, reward, rl): train_data, format, bad_pairs, eval_data, eval_split.
    """
    # format and bad-record policy as the fields declare them (recipe.py), so `check` reads them the same way
    pairs, report = load_pairs(cfg.train_data, *reads(cfg, "train_data")[1:], keep)
    if cfg.eval_data:
        return pairs, report, load_pairs(cfg.eval_data, *reads(cfg, "eval_data")[1:], keep)[0]
    train, held = split_held_out(pairs, cfg.eval_split, seed)
    report["held_out"] = {"fraction": cfg.eval_split, "seed": seed, "pairs": len(held)}
    return train, report, held


def training_pair_rows(cfg, renderer: ChatRenderer, seed: int, stage: str) -> tuple[list[dict], dict]:
    """A pair stage's training rows (read, checked, held-out pairs split off, tokenized, too-long dropped) and
    what that found: {report, too_long, tokenize_s}. `cfg` has split_pairs' fields and max_length."""
    started = time.perf_counter()
    pairs, report, _ = split_pairs(cfg, seed)
    rows, too_long = tokenize_pairs(pairs, renderer, cfg.max_length)
    if pairs and too_long == len(pairs):
        raise PipelineError(f"{stage}: every one of the {len(pairs):,} pairs is longer than {stage}.max_length "
                            f"({cfg.max_length} tokens); raise it")
    if not rows:
        raise PipelineError(f"{stage}: no usable pairs ({report}, too long: {too_long})")
    return rows, {"report": report, "too_long": too_long, "tokenize_s": time.perf_counter() - started}


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


def pair_length(row: dict) -> int:
    """Tokens of the longer side, prompt included."""
    return len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
