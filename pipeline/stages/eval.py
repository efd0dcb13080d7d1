"""eval stage (and `pipeline eval RUN`): every stage's model side by side on the same held-out data.

Each finished model stage (pretrain or base, sft, dpo, rl) is measured by pipeline/evaluation.py on
the same held-out text, conversations and preference pairs; the later stages also against the
model they started from (implicit rewards for dpo, KL for sft, dpo and rl). Where the run has a
finished reward stage, its model scores every stage's replies to the held-out questions (one more
row: how the learned reward judges each stage). Writes report.json, report.md
(with the metrics that apply to this data named), transcripts.jsonl and plots/*.png.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.artifacts import atomic_write_json, atomic_write_text, read_json
from pipeline.chat_template import ChatRenderer
from pipeline.data.readers import read_records
from pipeline.data.split import split_held_out
from pipeline.evaluation import METRICS, SCORED_FIELDS, HeldOut, Settings, evaluate_model, metrics_that_apply, summary
from pipeline.generation import prompts_of
from pipeline.lineage import stale_upstream
from pipeline.models import load_stage_model
from pipeline.recipe import EvalConfig, Recipe
from pipeline.rewards import load_reward_model, reply_scores

MODEL_STAGES = ("pretrain", "base", "sft", "dpo", "rl")
REFERENCE_OF = {"sft": "the pretrained or base model", "dpo": "the SFT model", "rl": "the SFT model"}


# ---------------------------------------------------------------- data


def read_stage_status(stage_dir: Path) -> str | None:
    try:
        record = read_json(stage_dir / "stage.json")
    except (ValueError, UnicodeDecodeError):
        return None  # corrupt: not a stage anyone can vouch for
    return record.get("status") if isinstance(record, dict) else None


def held_out_sets(cfg: EvalConfig, recipe: Recipe) -> HeldOut:
    """The eval section's files, else exactly what the other stages held out (their eval files, or
    the same seeded share of their training files)."""
    texts = [r["text"] for f in (cfg.text_data or (recipe.pretrain.eval_data if recipe.pretrain else []))
             for r in read_records(f, "text").records]
    if cfg.answer_data or not recipe.sft:
        conversations = [r for f in cfg.answer_data for r in read_records(f, "conversation", keep=SCORED_FIELDS).records]
    elif recipe.sft.eval_data:
        conversations = [r for f in recipe.sft.eval_data
                         for r in read_records(f, "conversation", keep=SCORED_FIELDS).records]
    else:
        records = [r for f in recipe.sft.train_data
                   for r in read_records(f, "conversation", recipe.sft.format, on_bad="drop", keep=SCORED_FIELDS).records]
        conversations = split_held_out(records, recipe.sft.eval_split, recipe.seed)[1]
    if cfg.preference_data or not recipe.dpo:
        pairs = [r for f in cfg.preference_data for r in read_records(f, "preference", on_bad="drop").records]
    elif recipe.dpo.eval_data:
        pairs = [r for f in recipe.dpo.eval_data for r in read_records(f, "preference", on_bad="drop").records]
    else:
        records = [r for f in recipe.dpo.train_data
                   for r in read_records(f, "preference", recipe.dpo.format, on_bad="drop").records]
        pairs = split_held_out(records, recipe.dpo.eval_split, recipe.seed)[1]
    return HeldOut(texts[: cfg.limit], conversations[: cfg.limit], pairs[: cfg.limit])


# ---------------------------------------------------------------- one stage


def evaluate_stage(stage: str, stage_dir: Path, data: HeldOut, cfg: EvalConfig, recipe: Recipe) -> tuple[dict, list[str]]:
    model, tokenizer = load_stage_model(stage_dir)
    adapter = stage in REFERENCE_OF and hasattr(model, "disable_adapter")
    # dpo or rl with `trainable: lm_head` saved a full model: its reference (the SFT model) is loaded beside it
    reference = load_stage_model(stage_dir.parent / "sft", merge_all=True)[0] \
        if stage in ("dpo", "rl") and not adapter and (stage_dir.parent / "sft").is_dir() else None
    measured = adapter or reference is not None
    settings = Settings(max_new_tokens=cfg.max_new_tokens, seed=recipe.seed, batch_size=cfg.generation_batch_size,
                        beta=recipe.dpo.beta if (stage == "dpo" and recipe.dpo) else None, reference=measured,
                        kl_prompts=cfg.kl_prompts if measured else 0)
    result = evaluate_model(model, tokenizer, data, settings, reference=reference)
    return {k: v for k, v in result.metrics.items() if k != "scored"}, result.replies


def score_with_reward_model(run_dir: Path, data: HeldOut, replies: dict, results: dict, log) -> None:
    """Every stage's replies to the held-out questions scored by the run's reward model, when it has a
    current one: `reward_score` (mean) in each stage's results."""
    reward_dir = run_dir / "reward"
    if read_stage_status(reward_dir) != "done" or not data.conversations or not any(replies.values()):
        return
    stale = stale_upstream(reward_dir)
    if stale:
        log(f"WARNING: no reward-model scores: {stale} (pipeline run RECIPE --from reward)")
        return
    model, tokenizer = load_reward_model(reward_dir)
    renderer, prompts = ChatRenderer(tokenizer), prompts_of(data.conversations)
    for stage, stage_replies in replies.items():
        if stage_replies:
            results[stage]["reward_score"] = reply_scores(model, renderer, prompts, stage_replies).mean().item()
    log("reward model's mean score of each stage's replies: "
        + ", ".join(f"{s} {r['reward_score']:.3f}" for s, r in results.items() if "reward_score" in r))


# ---------------------------------------------------------------- report


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_report(out_dir: Path, run_dir: Path, results: dict, data: HeldOut, replies: dict, n_transcripts: int) -> None:
    stages = list(results)
    applied = metrics_that_apply(results)
    rows = [f"| metric | {' | '.join(stages)} |", f"|---|{'---|' * len(stages)}"]
    for key in applied:
        rows.append(f"| {METRICS[key]} | {' | '.join(_fmt(results[s].get(key)) for s in stages)} |")
    attributes = sorted({a for s in stages for a in results[s].get("accuracy_by_attribute", {})})
    for attribute in attributes:  # which kinds of fact each stage gets right
        values = [results[s].get("accuracy_by_attribute", {}).get(attribute) for s in stages]
        rows.append(f"| answer accuracy: {attribute} | {' | '.join(_fmt(v) for v in values)} |")
    transcripts = []
    for i, record in enumerate(data.conversations):
        reference = record["messages"][-1]["content"] if record["messages"][-1]["role"] == "assistant" else None
        entry = {"question": prompts_of([record])[0][-1]["content"], "answer": record.get("answer") or reference,
                 **{stage: replies[stage][i] for stage in stages if replies.get(stage)}}
        transcripts.append(entry)
    held = [f"{len(data.texts)} texts" if data.texts else "", f"{len(data.conversations)} conversations"
            if data.conversations else "", f"{len(data.pairs)} preference pairs" if data.pairs else ""]
    references = [f"{s}: {REFERENCE_OF[s]}" for s in stages if s in REFERENCE_OF]
    lines = [f"# Evaluation of {run_dir}", "",
             f"One column per stage, the same held-out data for each: {', '.join(h for h in held if h)}.",
             f"Metrics that apply to this data: {', '.join(applied)}"
             + (" (the tiny-world scorer is declared by the held-out records)" if "answer_accuracy" in applied else "")
             + ". Not every metric applies to every stage (–).",
             *([f"The reference of each adapter stage (KL, rewards): {'; '.join(references)}."] if references else []),
             "", *rows, ""]
    if transcripts:
        lines += ["## Transcripts", ""]
        for entry in transcripts[:n_transcripts]:
            lines.append(f"**Q:** {entry['question']}  (expected: {entry['answer']})")
            lines += [f"- *{stage}:* {entry.get(stage, '').strip() or '(empty)'}" for stage in stages]
            lines.append("")
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in sorted((out_dir / "plots").glob("*.png"))]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    atomic_write_json(out_dir / "report.json", {"run": str(run_dir), "stages": results})
    atomic_write_text(out_dir / "transcripts.jsonl", "".join(json.dumps(t) + "\n" for t in transcripts))


def evaluate_run(run_dir: Path, cfg: EvalConfig, recipe: Recipe, out_dir: Path, log=print) -> dict:
    from pipeline.plots import plot_run

    data = held_out_sets(cfg, recipe)
    stages = {}
    for stage in MODEL_STAGES:
        if read_stage_status(run_dir / stage) != "done":
            continue
        stale = stale_upstream(run_dir / stage)
        if stale:  # its weights stand on an earlier stage that was rerun: comparing it would mislead
            log(f"WARNING: {stage} left out of the comparison: {stale} (pipeline run RECIPE --from {stage})")
            continue
        stages[stage] = run_dir / stage
    results, replies = {}, {}
    for stage, stage_dir in stages.items():
        log(f"evaluating {stage} ({stage_dir})")
        results[stage], replies[stage] = evaluate_stage(stage, stage_dir, data, cfg, recipe)
        log(f"{stage}: {summary(results[stage])}")
    score_with_reward_model(run_dir, data, replies, results, log)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_run(run_dir, out_dir / "plots", results)
    write_report(out_dir, run_dir, results, data, replies, cfg.transcripts)
    return results


def run(cfg: EvalConfig, ctx) -> dict:
    results = {}
    if ctx.is_main:  # generation-heavy and small: one process does it, the others wait
        results = evaluate_run(ctx.run_dir, cfg, ctx.recipe, ctx.out_dir, log=ctx.log)
        ctx.log(f"report: {ctx.out_dir / 'report.md'}")
    ctx.accelerator.wait_for_everyone()
    return {"stages": results}
