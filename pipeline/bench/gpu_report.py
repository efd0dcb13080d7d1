"""The one summary table of scripts/gpu_check.sh, read from what its runs wrote.

    python -m pipeline.bench.gpu_report --machine OUT_DIR   # GPU, versions, bf16 peak -> OUT_DIR/machine.json
    python -m pipeline.bench.gpu_report OUT_DIR             # the table, after scripts/gpu_check.sh OUT_DIR

Reads OUT_DIR/machine.json, the real-base runs OUT_DIR/runs/gemma-{bf16,qlora}/*/stage.json, the
pretraining MFU run OUT_DIR/runs/mfu/pretrain and the bench's OUT_DIR/bench.json. A part that did
not run (or failed) shows as a row saying so, so one failure never hides the rest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REAL_BASE_RUNS = {"gemma-bf16": "LoRA, bf16", "gemma-qlora": "QLoRA (4-bit NF4 base)"}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stage_row(run: str, label: str, stage: str, record: dict | None) -> str:
    if record is None:
        return f"| {label} | {stage} | did not run | | |"
    if record.get("status") != "done":
        return f"| {label} | {stage} | {record.get('status')}: {record.get('error', '')[:80]} | | |"
    metrics = record.get("metrics") or {}
    peak = f"{record['peak_cuda_mb']:,.0f}" if "peak_cuda_mb" in record else "-"
    before, after = metrics.get("heldout_before") or {}, metrics.get("heldout_after") or {}
    notes = []
    if stage == "base":
        notes.append(f"{metrics.get('parameters', 0) / 1e6:.0f}M parameters imported")
    if stage == "sft" and after:
        notes.append(f"response ppl {before.get('response_perplexity', float('nan')):.2f} -> "
                     f"{after.get('response_perplexity', float('nan')):.2f}, end-of-turn "
                     f"{before.get('eot_rate', float('nan')):.3f} -> {after.get('eot_rate', float('nan')):.3f}")
    if stage == "dpo" and after:
        notes.append(f"reward acc {before.get('reward_accuracy', float('nan')):.3f} -> "
                     f"{after.get('reward_accuracy', float('nan')):.3f}, chosen ppl "
                     f"{before.get('chosen_perplexity', float('nan')):.2f} -> "
                     f"{after.get('chosen_perplexity', float('nan')):.2f}, KL {after.get('kl_from_reference', float('nan')):.2f}")
    if "train_s" in metrics:
        notes.append(f"training {metrics['train_s']:.0f} s")
    return f"| {label} | {stage} | {record.get('wall_time_s', 0):.0f} s | {peak} | {'; '.join(notes)} |"


def real_base_rows(out: Path) -> list[str]:
    rows = ["| run | stage | wall | peak CUDA MB | held-out |", "|---|---|---|---|---|"]
    for run, label in REAL_BASE_RUNS.items():
        for stage in ("base", "sft", "dpo"):
            rows.append(_stage_row(run, label, stage, _read(out / "runs" / run / stage / "stage.json")))
    return rows


MFU_RUNS = {"mfu": "eager", "mfu-compiled": "torch.compile"}


def mfu_rows(out: Path, machine: dict) -> list[str]:
    rows = []
    for run_name, label in MFU_RUNS.items():
        record = _read(out / "runs" / run_name / "pretrain" / "stage.json")
        if record is None and run_name != "mfu":
            continue  # an optional part that was not asked for
        rows.append(_mfu_row(out / "runs" / run_name / "pretrain", label, record, machine))
    return rows


def _mfu_row(run: Path, label: str, record: dict | None, machine: dict) -> str:
    if not record or record.get("status") != "done":
        return f"pretraining MFU ({label}): did not finish ({(record or {}).get('status', 'no run')})"
    from transformers import AutoConfig

    from pipeline.bench.flops import training_flops_per_token

    config = AutoConfig.from_pretrained(run)
    seq_len = record["config"]["seq_len"]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rated = [r for r in logged if "tokens_per_s" in r]
    rate = rated[-1]["tokens_per_s"]  # over the whole loop, warm-up steps (and compiling) included
    per_token = training_flops_per_token(config, seq_len)
    peak = machine.get("bf16_peak_flop_per_s") or float("nan")
    line = (f"pretraining MFU ({label}): {record['metrics']['parameters'] / 1e6:.0f}M parameters, seq {seq_len}, "
            f"{record['metrics']['tokens_per_step']:,} tokens/step, {record['metrics']['precision']}: whole loop "
            f"{rate:,.0f} tokens/s = {rate * per_token / 1e12:.1f} TFLOP/s = {100 * rate * per_token / peak:.1f}%")
    steady = steady_rate(rated, record['metrics']['tokens_per_step'])
    if steady:
        line += (f"; second half {steady:,.0f} tokens/s = {steady * per_token / 1e12:.1f} TFLOP/s = "
                 f"{100 * steady * per_token / peak:.1f}%")
    return (f"{line} of the measured bf16 matmul peak ({peak / 1e12:.0f} TFLOP/s); peak CUDA "
            f"{record.get('peak_cuda_mb', 0):,.0f} MB; stage wall {record.get('wall_time_s', 0):.0f} s")


def steady_rate(rated: list[dict], tokens_per_step: int) -> float | None:
    """Tokens/s between the first log record of the loop's second half and the last one.

    The stage logs a running mean from the loop's start, so each record gives the elapsed time
    (tokens so far / rate); the difference of two leaves out warm-up and compiling."""
    if len(rated) < 2:
        return None
    half = next(r for r in rated if r["step"] >= rated[-1]["step"] / 2)
    if half is rated[-1]:
        half = rated[-2]

    def elapsed(r: dict) -> float:
        return r["step"] * tokens_per_step / r["tokens_per_s"]  # no resume in these runs: the loop began at 0

    seconds = elapsed(rated[-1]) - elapsed(half)
    return (rated[-1]["step"] - half["step"]) * tokens_per_step / seconds if seconds > 0 else None


def bench_rows(out: Path) -> list[str]:
    bench = _read(out / "bench.json")
    if not bench:
        return ["bench: did not run"]
    rows = ["| task | ours | contender | speed ratio | memory ratio | target |", "|---|---|---|---|---|---|"]
    for task, summary in bench["tasks"].items():
        ours = summary["contenders"]["ours"]["rate"]
        for name, ratio in summary["ratios"].items():
            target = summary["target"]
            marker = ("met" if summary["target_met"] else "NOT met") if name == target["against"] else ""
            rows.append(f"| {task} ({summary['unit']}) | {ours:,.1f} | {name} "
                        f"{summary['contenders'][name]['rate']:,.1f} | {ratio['speed']:.2f}x | "
                        f"{ratio['memory']:.2f}x | {marker} |")
    return rows


def report(out: Path) -> str:
    machine = _read(out / "machine.json") or {}
    lines = [f"# GPU check: {machine.get('gpu', 'no GPU seen')}",
             f"torch {machine.get('torch')}, CUDA {machine.get('cuda')}, transformers {machine.get('transformers')}, "
             f"trl {machine.get('trl')}, peft {machine.get('peft')}, bitsandbytes {machine.get('bitsandbytes')}; "
             f"bf16 matmul peak {machine.get('bf16_peak_flop_per_s', 0) / 1e12:.0f} TFLOP/s; "
             f"attention: {machine.get('attention')}",
             "", "## Real base (recipes/gemma3-270m.yaml)", *real_base_rows(out),
             "", "## Pretraining", *mfu_rows(out, machine),
             "", "## Bench (ours / contender, one round)", *bench_rows(out)]
    return "\n".join(lines)


def describe_machine() -> dict:
    """GPU, library versions, the measured bf16 matmul peak, and which SDPA kernels run in bf16."""
    import importlib.metadata

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.bench.flops import matmul_peak

    info = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("transformers", "trl", "peft", "accelerate", "bitsandbytes"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if not torch.cuda.is_available():
        return {**info, "gpu": None}
    info["gpu"] = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    info["bf16_peak_flop_per_s"] = matmul_peak(torch.bfloat16, device="cuda")
    q = torch.randn(4, 8, 1024, 64, device="cuda", dtype=torch.bfloat16)  # (B, heads, T, head_dim)
    kernels = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            kernels.append(backend.name.lower())
        except RuntimeError:
            pass
    info["attention"] = "sdpa kernels that run in bf16: " + (", ".join(kernels) or "none (math only)")
    return info


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--machine":
        Path(argv[1]).mkdir(parents=True, exist_ok=True)
        (Path(argv[1]) / "machine.json").write_text(json.dumps(describe_machine(), indent=2))
        return 0
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    text = report(out)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
