"""Benchmark our stages against TRL's defaults and plain PyTorch loops, in one run.

    python -m pipeline.bench                      # pretrain, sft and dpo, 2 rounds
    python -m pipeline.bench --tasks sft --rounds 3 --out bench.json
    python -m pipeline.bench --workload gemma --rounds 1   # sft and dpo on the real Gemma-3-270M base

Every contender trains on the same model and data (pipeline/bench/workload.py), one trial
per fresh process, interleaved A B A B so that drift of the machine hits all contenders alike.
Prints throughput, peak memory and ratios against ours, and writes everything as JSON. Compare
numbers only within one run: these machines drift by tens of percent between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# our stage / contender: throughput ratio at least, and peak memory ratio at most (issue 17's targets)
TARGETS = {
    "pretrain": {"against": "plain loop", "speed": 1.0, "memory": None},
    "sft": {"against": "TRL defaults", "speed": 2.0, "memory": 1.0},
    "dpo": {"against": "TRL defaults", "speed": 2.0, "memory": 1.0},
}
UNITS = {"pretrain": "tokens/s", "sft": "real tokens/s", "dpo": "pairs/s"}


FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> dict:
    """The CPU's model name and the vector/matrix features that decide fp32 vs bf16 speed."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor(), "flags": []}
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    present = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    # kernels capped below what the CPU has (to reproduce a smaller CPU) are part of what was measured
    caps = {name: os.environ[name] for name in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
            if os.environ.get(name)}
    return {"model": model, "flags": [f for f in FLAGS_THAT_MATTER if f in present], **({"capped": caps} if caps else {})}


def run_trial(workdir: Path, task: str, contender: str, trial: int, overrides: list[str]) -> dict:
    out = workdir / "trials" / f"{task}-{contender.replace(' ', '_').replace(',', '')}-{trial}.json"
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        code = subprocess.call([sys.executable, "-m", "pipeline.bench.trial", str(workdir), task, contender,
                                str(trial), str(out)], stdout=handle, stderr=subprocess.STDOUT,
                               env={**os.environ, "PIPELINE_BENCH_SET": "\n".join(overrides)})
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"bench: trial {task} / {contender} #{trial} failed (exit {code}); log {log}:\n{tail}")
    return json.loads(out.read_text())


def summarise(task: str, trials: list[dict], flops_per_token: float, peaks: dict) -> dict:
    by_contender: dict[str, list[dict]] = {}
    for t in trials:
        by_contender.setdefault(t["contender"], []).append(t)
    contenders = {}
    for name, runs in by_contender.items():
        rates = [r["units"] / r["seconds"] for r in runs]
        summary = {"rate": statistics.median(rates), "rates": rates, "memory_kind": _memory_kind(runs),
                   "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                   "rss_above_start_mb": statistics.median(r["peak_rss_mb"] - r["start_rss_mb"] for r in runs),
                   "units_per_trial": runs[0]["units"]}
        if "peak_cuda_mb" in runs[0]:  # on a GPU the device's memory is the one that runs out
            summary["peak_cuda_mb"] = statistics.median(r["peak_cuda_mb"] for r in runs)
        for key in ("bf16", "gradient_checkpointing", "subset"):
            if key in runs[0]:
                summary[key] = runs[0][key]
        if task == "pretrain":
            achieved = summary["rate"] * flops_per_token
            summary["flop_per_s"] = achieved
            summary["mfu_fp32_peak"] = achieved / peaks["fp32"]
            summary["mfu_bf16_peak"] = achieved / peaks["bf16"]
        contenders[name] = summary
    ours = contenders["ours"]
    memory = "peak_cuda_mb" if "peak_cuda_mb" in ours else "peak_rss_mb"
    ratios = {name: {"speed": ours["rate"] / c["rate"], "memory": ours[memory] / c[memory]}
              for name, c in contenders.items() if name != "ours"}
    target = TARGETS[task]
    against = ratios.get(target["against"])
    met = None
    if against:
        met = against["speed"] >= target["speed"] and (target["memory"] is None or against["memory"] <= target["memory"])
    return {"unit": UNITS[task], "contenders": contenders, "ratios": ratios, "target": target, "target_met": met}


def _memory_kind(runs: list[dict]) -> str:
    return "CUDA allocator peak" if "peak_cuda_mb" in runs[0] else "process peak RSS"


def print_table(task: str, summary: dict) -> None:
    from pipeline.bench.workload import SLOW_SUBSET

    print(f"\n{task} ({summary['unit']}, median of trials; ratio = ours / contender)")
    cuda = "peak_cuda_mb" in summary["contenders"]["ours"]
    print(f"  {'contender':<20} {'rate':>10} {'peak CUDA MB' if cuda else 'peak RSS MB':>12} {'speed ratio':>12} "
          f"{'memory ratio':>13}  notes")
    for name, c in summary["contenders"].items():
        ratio = summary["ratios"].get(name)
        notes = []
        if "mfu_fp32_peak" in c:
            bf16 = f"{100 * c['mfu_bf16_peak']:.0f}% of the bf16 peak" if c["mfu_bf16_peak"] < c["mfu_fp32_peak"] \
                else "bf16 matmuls are slower than fp32 here"
            notes.append(f"{c['flop_per_s'] / 1e9:.1f} GFLOP/s, MFU {100 * c['mfu_fp32_peak']:.0f}% of the fp32 peak; {bf16}")
        if "bf16" in c:
            notes.append(f"bf16={c['bf16']} checkpointing={c['gradient_checkpointing']}"
                         + (f", rate on the first {SLOW_SUBSET} examples" if c.get("subset") else ""))
        notes.append("trials " + ", ".join(f"{r:,.1f}" for r in c["rates"]))
        speed = f"{ratio['speed']:.2f}x" if ratio else "-"
        memory = f"{ratio['memory']:.2f}x" if ratio else "-"
        peak = c["peak_cuda_mb"] if cuda else c["peak_rss_mb"]
        print(f"  {name:<20} {c['rate']:>10,.1f} {peak:>12,.0f} {speed:>12} {memory:>13}  "
              f"{'; '.join(notes)}")
    t = summary["target"]
    if summary["target_met"] is not None:
        memory = f", memory <= {t['memory']}x" if t["memory"] else ""
        print(f"  target vs {t['against']}: speed >= {t['speed']}x{memory}: "
              f"{'met' if summary['target_met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["tiny", "gemma"], default="tiny",
                        help="tiny = a 3.8M-parameter Llama on the tiny world (default); gemma = LoRA sft and dpo on "
                             "the real Gemma-3-270M base (its package's GGUF) with real instructions from "
                             "../shared/data, conversations of 64-512 tokens")
    parser.add_argument("--tasks", nargs="+", choices=["pretrain", "sft", "dpo"],
                        help="default: pretrain, sft and dpo (tiny); sft and dpo (gemma)")
    parser.add_argument("--contenders", nargs="+", help="only these contenders (ours always runs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override our recipe for this run, to measure one lever (e.g. sft.batching=random)")
    parser.add_argument("--rounds", type=int, default=2, help="trials per contender, interleaved (default 2)")
    parser.add_argument("--size", choices=["full", "quick"], default="full", help="quick = a smoke test of the bench")
    parser.add_argument("--workdir", help="where the workload and trial outputs go (default runs/bench, "
                                          "runs/bench-gemma)")
    parser.add_argument("--shared-data", default=str(Path(__file__).resolve().parents[2].parent / "shared" / "data"),
                        help="the shared data folder the gemma workload reads (default ../shared/data)")
    parser.add_argument("--out", help="JSON results (default WORKDIR/bench.json)")
    args = parser.parse_args(argv)
    gemma = args.workload == "gemma"
    args.tasks = args.tasks or (["sft", "dpo"] if gemma else ["pretrain", "sft", "dpo"])
    if gemma and "pretrain" in args.tasks:
        parser.error("the gemma workload has no pretrain task (its base is pretrained); use --tasks sft dpo")

    import torch

    from pipeline.bench.contenders import CONTENDERS
    from pipeline.bench.flops import matmul_peak, training_flops_per_token
    from pipeline.bench.workload import SEQ_LEN, SIZES, prepare, prepare_gemma

    workdir = Path(args.workdir or ("runs/bench-gemma" if gemma else "runs/bench")).resolve()
    started = time.time()
    cpu = cpu_flags()
    capped = "".join(f"; {name}={value}" for name, value in cpu.get("capped", {}).items())
    print(f"CPU: {cpu['model']}; {', '.join(cpu['flags']) or 'none of ' + ', '.join(FLAGS_THAT_MATTER)}{capped}",
          flush=True)
    print(f"preparing the workload in {workdir} ...", flush=True)
    if gemma:
        setup_dir = prepare_gemma(workdir, args.size, Path(args.shared_data))
    else:
        setup_dir = prepare(workdir, SIZES[args.size])
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peaks = {"fp32": matmul_peak(torch.float32, device=device), "bf16": matmul_peak(torch.bfloat16, device=device)}
    where = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"matmul peak on {where}: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s", flush=True)
    from transformers import AutoConfig

    # MFU is reported for pretraining only (the tiny workload's model)
    flops_per_token = None if gemma else training_flops_per_token(AutoConfig.from_pretrained(setup_dir / "pretrain"),
                                                                  SEQ_LEN)

    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "cuda": torch.cuda.is_available(), "matmul_peak_flop_per_s": peaks,
                           "device": where, "cpu": cpu},
               "workload": args.workload, "size": args.size, "rounds": args.rounds, "overrides": args.overrides,
               "flops_per_token": flops_per_token, "tasks": {}}
    for task in args.tasks:
        names = [n for n in CONTENDERS[task] if n == "ours" or not args.contenders or n in args.contenders]
        trials = []
        for trial in range(args.rounds):
            for name in names:  # A B A B: every round visits every contender once, in the same order
                result = run_trial(workdir, task, name, trial, args.overrides)
                trials.append(result)
                cuda = f", CUDA {result['peak_cuda_mb']:,.0f} MB" if "peak_cuda_mb" in result else ""
                print(f"  {task} #{trial} {name:<20} {result['units'] / result['seconds']:>10,.1f} {UNITS[task]}"
                      f"  peak RSS {result['peak_rss_mb']:,.0f} MB{cuda}", flush=True)
        results["tasks"][task] = summary = summarise(task, trials, flops_per_token, peaks)
        summary["trials"] = trials
        print_table(task, summary)
    results["wall_time_s"] = time.time() - started
    out = Path(args.out) if args.out else workdir / "bench.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {out}  ({results['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
