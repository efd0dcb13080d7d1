"""eval stage (and `pipeline eval RUN`): every stage's model side by side on the same held-out data.

Per stage (pretrain or base, sft, dpo): perplexity on held-out text, answers to held-out
questions generated through the chat template and scored, preference accuracy on held-out
pairs, the habit rate, and for dpo the KL from the SFT model. Writes report.json, report.md,
transcripts.jsonl and plots/*.png.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pipeline.artifacts import atomic_write_json, atomic_write_text, read_json
from pipeline.chat_template import ChatRenderer
from pipeline.data.packing import pack, tokenize_documents
from pipeline.data.readers import read_records
from pipeline.lineage import stale_upstream
from pipeline.generation import SCORED_FIELDS, generate_replies, prompts_of, score_answers
from pipeline.models import load_stage_model
from pipeline.recipe import EvalConfig, Recipe

MODEL_STAGES = ("pretrain", "base", "sft", "dpo")


# ---------------------------------------------------------------- data


def read_stage_status(stage_dir: Path) -> str | None:
    try:
        record = read_json(stage_dir / "stage.json")
    except (ValueError, UnicodeDecodeError):
        return None  # corrupt: not a stage anyone can vouch for
    return record.get("status") if isinstance(record, dict) else None


def resolve_data(cfg: EvalConfig, recipe: Recipe) -> dict[str, list[str]]:
    """The eval section's files, else the held-out files the other stages already name."""
    return {
        "text": cfg.text_data or (list(recipe.pretrain.eval_data) if recipe.pretrain else []),
        "answers": cfg.answer_data or (list(recipe.sft.eval_data) if recipe.sft else []),
        "preferences": cfg.preference_data or (list(recipe.dpo.eval_data) if recipe.dpo else []),
    }


def load_eval_sets(files: dict[str, list[str]], limit: int) -> dict[str, list[dict]]:
    texts = [r["text"] for f in files["text"] for r in read_records(f, "text").records]
    answers = [r for f in files["answers"] for r in read_records(f, "conversation", keep=SCORED_FIELDS).records]
    prefs = [r for f in files["preferences"] for r in read_records(f, "preference", on_bad="drop").records]
    return {"text": texts[:limit], "answers": answers[:limit], "preferences": prefs[:limit]}


# ---------------------------------------------------------------- metrics


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], seq_len: int = 128, batch_size: int = 16) -> float | None:
    """Packed held-out blocks exactly as pretraining evaluates them (documents kept apart)."""
    from pipeline.stages.pretrain import summed_loss

    if not texts:
        return None
    try:
        blocks = pack(tokenize_documents(texts, tokenizer), seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)
    except ValueError:
        return None
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        loss, n = summed_loss(model, blocks, list(range(start, min(start + batch_size, len(blocks)))), None)
        total, count = total + loss.item(), count + n
    return math.exp(total / count)


def preference_metrics(model, tokenizer, pairs: list[dict], beta: float | None) -> dict:
    """How often the model prefers chosen over rejected; for an adapter stage also the implicit reward."""
    from pipeline.stages.dpo import preference_scores, tokenize_pairs

    if not pairs:
        return {}
    rows, _ = tokenize_pairs(pairs, ChatRenderer(tokenizer), max_length=1 << 30)  # score every pair
    with_reference = beta is not None and hasattr(model, "disable_adapter")
    scores = preference_scores(model, rows, beta or 0.0, tokenizer.pad_token_id or 0, with_reference)
    out = {"prefers_chosen": scores["policy_prefers_chosen"],
           "chosen_logp": scores["chosen_logp"], "rejected_logp": scores["rejected_logp"]}
    if with_reference:
        out["reward_accuracy"] = scores["preference_accuracy"]
        out["reward_margin"] = scores["reward_margin"]
    return out


def evaluate_stage(stage: str, stage_dir: Path, sets: dict, cfg: EvalConfig, recipe: Recipe) -> tuple[dict, list[str]]:
    model, tokenizer = load_stage_model(stage_dir)
    model.eval()
    metrics: dict = {"perplexity": perplexity(model, tokenizer, sets["text"])}
    replies = []
    if sets["answers"]:
        replies = generate_replies(model, tokenizer, prompts_of(sets["answers"]), max_new_tokens=cfg.max_new_tokens,
                                   seed=recipe.seed, batch_size=cfg.generation_batch_size)
        metrics.update({k: v for k, v in score_answers(sets["answers"], replies).items() if k != "scored"})
    beta = recipe.dpo.beta if (stage == "dpo" and recipe.dpo) else None
    metrics.update(preference_metrics(model, tokenizer, sets["preferences"], beta))
    if stage == "dpo" and sets["answers"]:
        from pipeline.stages.dpo import kl_from_reference

        prompts = prompts_of(sets["answers"])[: cfg.kl_prompts]
        metrics["kl_from_sft"] = kl_from_reference(model, tokenizer, ChatRenderer(tokenizer), prompts,
                                                   cfg.max_new_tokens, recipe.seed, batch_size=cfg.generation_batch_size)
    return metrics, replies


# ---------------------------------------------------------------- report


METRIC_LABELS = {
    "perplexity": "held-out perplexity (lower is better)",
    "answer_accuracy": "held-out answer accuracy",
    "habit_rate": "undesired habit rate (greedy)",
    "empty_rate": "empty answers",
    "prefers_chosen": "prefers chosen over rejected (log-likelihood)",
    "reward_accuracy": "preference accuracy (implicit reward vs SFT)",
    "reward_margin": "mean reward margin",
    "kl_from_sft": "KL of the policy from the SFT model (nats per reply)",
}


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_report(out_dir: Path, run_dir: Path, results: dict, sets: dict, replies: dict, n_transcripts: int) -> None:
    stages = list(results)
    rows = [f"| metric | {' | '.join(stages)} |", f"|---|{'---|' * len(stages)}"]
    for key, label in METRIC_LABELS.items():
        if any(results[s].get(key) is not None for s in stages):
            rows.append(f"| {label} | {' | '.join(_fmt(results[s].get(key)) for s in stages)} |")
    attributes = sorted({a for s in stages for a in results[s].get("accuracy_by_attribute", {})})
    for attribute in attributes:  # which kinds of fact each stage gets right
        values = [results[s].get("accuracy_by_attribute", {}).get(attribute) for s in stages]
        rows.append(f"| answer accuracy: {attribute} | {' | '.join(_fmt(v) for v in values)} |")
    transcripts = []
    for i, record in enumerate(sets["answers"]):
        entry = {"question": prompts_of([record])[0][-1]["content"], "answer": record.get("answer"),
                 **{stage: replies[stage][i] for stage in stages if replies.get(stage)}}
        transcripts.append(entry)
    lines = [f"# Evaluation of {run_dir}", "", "One column per stage, the same held-out data for each.", "",
             *rows, ""]
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

    sets = load_eval_sets(resolve_data(cfg, recipe), cfg.limit)
    stages = {}
    for stage in MODEL_STAGES:
        if (read_stage_status(run_dir / stage)) != "done":
            continue
        stale = stale_upstream(run_dir / stage)
        if stale:  # its weights stand on an earlier stage that was rerun: comparing it would mislead
            log(f"WARNING: {stage} left out of the comparison: {stale} (pipeline run RECIPE --from {stage})")
            continue
        stages[stage] = run_dir / stage
    results, replies = {}, {}
    for stage, stage_dir in stages.items():
        log(f"evaluating {stage} ({stage_dir})")
        results[stage], replies[stage] = evaluate_stage(stage, stage_dir, sets, cfg, recipe)
        log(f"{stage}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in results[stage].items() if k in METRIC_LABELS))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_run(run_dir, out_dir / "plots", results)
    write_report(out_dir, run_dir, results, sets, replies, cfg.transcripts)
    return results


def run(cfg: EvalConfig, ctx) -> dict:
    results = {}
    if ctx.is_main:  # generation-heavy and small: one process does it, the others wait
        results = evaluate_run(ctx.run_dir, cfg, ctx.recipe, ctx.out_dir, log=ctx.log)
        ctx.log(f"report: {ctx.out_dir / 'report.md'}")
    ctx.accelerator.wait_for_everyone()
    return {"stages": results}
