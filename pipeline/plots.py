"""PNG plots for the evaluation report: training curves per stage, DPO rewards, RL reward, metrics per stage."""

from __future__ import annotations

import json
from pathlib import Path


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(log: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in log if key in r and isinstance(r[key], (int, float, str))]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: Path, out_dir: Path, results: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    for stage in ("pretrain", "sft", "dpo"):
        log = _read_log(run_dir / stage / "metrics.jsonl")
        steps, loss = _series(log, "loss")
        if not steps:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        ax.plot(steps, loss, label="training loss")
        eval_steps, eval_loss = _series(log, "eval_loss")
        if eval_steps:
            ax.plot(eval_steps, eval_loss, "o-", label="held-out loss")
        ax.set(title=f"{stage}: loss over training", xlabel="optimizer step", ylabel="cross-entropy (nats per token)"
               if stage != "dpo" else "DPO loss (nats per pair)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"loss_{stage}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    log = _read_log(run_dir / "dpo" / "metrics.jsonl")
    steps, accuracy = _series(log, "rewards/accuracies")
    if steps:
        _, margin = _series(log, "rewards/margins")
        fig, left = plt.subplots(figsize=(7, 4), dpi=110)
        left.plot(steps, accuracy, color="tab:blue", label="reward accuracy")
        left.set(title="dpo: rewards over training", xlabel="optimizer step", ylabel="reward accuracy (share of pairs)",
                 ylim=(-0.05, 1.05))
        right = left.twinx()
        right.plot(steps, margin, color="tab:orange", label="reward margin")
        right.set_ylabel("reward margin (beta x log-ratio, nats)")
        left.grid(alpha=0.3)
        handles = left.get_lines() + right.get_lines()
        left.legend(handles, [h.get_label() for h in handles], loc="center right")
        fig.tight_layout()
        path = out_dir / "dpo_rewards.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    log = _read_log(run_dir / "rl" / "metrics.jsonl")  # rl's loss is not a learning curve: its reward is
    steps, reward = _series(log, "reward")
    if steps:
        fig, left = plt.subplots(figsize=(7, 4), dpi=110)
        left.plot(steps, reward, color="tab:blue", label="mean reward")
        left.plot(*_series(log, "tied_groups"), color="tab:gray", linestyle=":", label="tied groups (no signal)")
        left.set(title="rl: reward over training", xlabel="optimizer step", ylabel="reward / share of groups")
        right = left.twinx()
        right.plot(*_series(log, "kl"), color="tab:orange", label="KL to the SFT model")  # absent at beta 0
        right.set_ylabel("KL (nats per token)")
        left.grid(alpha=0.3)
        handles = left.get_lines() + right.get_lines()
        left.legend(handles, [h.get_label() for h in handles], loc="center right")
        fig.tight_layout()
        path = out_dir / "rl_reward.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    stages = list(results)
    shares = [k for k in ("answer_accuracy", "habit_rate", "eot_rate", "prefers_chosen", "reward_accuracy")
              if any(results[s].get(k) is not None for s in stages)]
    if stages and shares:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        width = 0.8 / len(shares)
        for i, key in enumerate(shares):
            values = [results[s].get(key) or 0.0 for s in stages]
            bars = ax.bar([x + i * width for x in range(len(stages))], values, width, label=key.replace("_", " "))
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks([x + width * (len(shares) - 1) / 2 for x in range(len(stages))], stages)
        ax.set(title="held-out metrics per stage", xlabel="stage", ylabel="share of held-out examples", ylim=(0, 1.1))
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "metrics_by_stage.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
