"""The benchmark's own arithmetic and workload (the benchmark itself runs outside the test suite)."""

from __future__ import annotations

import json

import pytest

from pipeline.bench.__main__ import summarise
from pipeline.bench.flops import training_flops_per_token
from pipeline.bench.workload import GEMMA_SFT_LENGTHS, SFT_LENGTHS, varied_length_chats


def test_flops_per_token_by_hand():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=16, vocab_size=100)
    # per layer: q and o 8x8 each, k and v 8x4 each (one kv head of size 4), gate/up/down 8x16 each
    per_layer = 2 * 64 + 2 * 32 + 3 * 128
    weights = 2 * per_layer + 8 * 100  # + output head
    assert training_flops_per_token(config, seq_len=10) == 6 * weights + 12 * 2 * 8 * 10


def test_varied_length_chats_span_the_range(tiny_world, tiny_tokenizer):
    from pipeline.chat_template import ChatRenderer

    renderer = ChatRenderer(tiny_tokenizer)
    turns = [json.loads(line)["messages"] for line in (tiny_world / "sft_train.jsonl").read_text().splitlines()]
    for low, high in (SFT_LENGTHS, GEMMA_SFT_LENGTHS):
        chats = varied_length_chats(turns, renderer, 40, seed=0, lengths=(low, high))
        lengths = [len(renderer.render(c["messages"]).input_ids) for c in chats]
        assert len(chats) == 40 and min(lengths) >= low and max(lengths) <= high
        assert max(lengths) - min(lengths) > (high - low) / 2  # spread out, so padding matters
    assert all(m["role"] == ("user", "assistant")[i % 2] for c in chats for i, m in enumerate(c["messages"]))


def test_gemma_workload_has_no_pretrain_task(capsys):
    from pipeline.bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["--workload", "gemma", "--tasks", "pretrain"])
    assert "no pretrain task" in capsys.readouterr().err


def test_trials_start_from_the_workloads_own_stages(tmp_path):
    """The gemma workload starts from the imported base (no tokenizer or pretrain stage); its gigabyte of
    weights is hard-linked into each trial's folder, not copied."""
    import os

    from pipeline.bench.workload import _mark, trial_run_dir

    for stage in ("base", "sft"):
        (tmp_path / "runs" / "setup" / stage / "cache").mkdir(parents=True)
        (tmp_path / "runs" / "setup" / stage / "model.safetensors").write_bytes(b"weights")
    _mark(tmp_path, "gemma", start="base")
    run_dir = trial_run_dir(tmp_path, "dpo", 0)
    assert sorted(p.name for p in run_dir.iterdir()) == ["base", "sft"]
    assert not (run_dir / "base" / "cache").exists()
    linked = run_dir / "base" / "model.safetensors"
    assert os.path.samefile(linked, tmp_path / "runs" / "setup" / "base" / "model.safetensors")
    assert sorted(p.name for p in trial_run_dir(tmp_path, "sft", 1).iterdir()) == ["base"]


def _trial(contender, units, seconds, peak):
    return {"contender": contender, "units": units, "seconds": seconds, "peak_rss_mb": peak, "start_rss_mb": 100}


def test_summary_ratios_use_medians():
    trials = [_trial("ours", 100, 1, 500), _trial("TRL defaults", 100, 4, 600),
              _trial("ours", 100, 2, 520), _trial("TRL defaults", 100, 5, 640),
              _trial("ours", 100, 1.5, 510), _trial("TRL defaults", 100, 3, 620)]
    summary = summarise("sft", trials, flops_per_token=1.0, peaks={"fp32": 1.0, "bf16": 1.0})
    ours, trl = summary["contenders"]["ours"], summary["contenders"]["TRL defaults"]
    assert ours["rate"] == pytest.approx(100 / 1.5) and trl["rate"] == pytest.approx(25)
    assert summary["ratios"]["TRL defaults"]["speed"] == pytest.approx((100 / 1.5) / 25)
    assert summary["ratios"]["TRL defaults"]["memory"] == pytest.approx(510 / 620)
    assert summary["target_met"] is True  # 2.67x faster with less memory


def test_bench_runs_our_dpo_from_its_own_setup(tmp_path):
    """The smallest bench run end to end: the dpo trial must accept the sft stage the setup made (it once
    refused it as made with another config, and only a GPU session found out), and the JSON keeps the CPU."""
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "pipeline.bench", "--tasks", "dpo", "--size", "quick", "--rounds",
                           "1", "--contenders", "TRL defaults", "--workdir", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    dpo = results["tasks"]["dpo"]
    assert set(dpo["contenders"]) == {"ours", "TRL defaults"}
    assert all(c["rate"] > 0 for c in dpo["contenders"].values())
    assert results["machine"]["cpu"]["model"] and isinstance(results["machine"]["cpu"]["flags"], list)
    assert "CPU:" in done.stdout and "matmul peak" in done.stdout


def test_gpu_report_reads_what_the_check_wrote(tmp_path):
    """scripts/gpu_check.sh's table: finished stages with their held-out numbers, the rest named as missing."""
    from pipeline.bench.gpu_report import report

    (tmp_path / "machine.json").write_text(json.dumps({"gpu": "Test GPU (80 GiB)", "bf16_peak_flop_per_s": 7e14}))
    stage = tmp_path / "runs" / "gemma-bf16" / "dpo"
    stage.mkdir(parents=True)
    stage.joinpath("stage.json").write_text(json.dumps({
        "status": "done", "wall_time_s": 43.0, "peak_cuda_mb": 3354.0,
        "metrics": {"train_s": 23.0, "heldout_before": {"reward_accuracy": 0.5, "chosen_perplexity": 7.68},
                    "heldout_after": {"reward_accuracy": 0.875, "chosen_perplexity": 4.21, "kl_from_reference": 23.3}}}))
    text = report(tmp_path)
    assert "# GPU check: Test GPU (80 GiB)" in text
    assert "| LoRA, bf16 | dpo | 43 s | 3,354 | reward acc 0.500 -> 0.875" in text
    assert "| QLoRA (4-bit NF4 base) | sft | did not run |" in text
    assert "pretraining MFU (eager): did not finish" in text and "bench: did not run" in text
    assert "torch.compile" not in text  # the optional compiled run was not asked for


def test_steady_rate_leaves_out_the_slow_start():
    """The stage logs running means from step 0; the second half's rate must exclude a slow first step."""
    from pipeline.bench.gpu_report import steady_rate

    tokens_per_step = 100
    # step 1 takes 10 s (compiling), every later step 1 s
    elapsed = {step: 10 + (step - 1) for step in (10, 20, 30, 40)}
    rated = [{"step": s, "tokens_per_s": s * tokens_per_step / t} for s, t in elapsed.items()]
    assert steady_rate(rated, tokens_per_step) == pytest.approx(100.0)
    assert rated[-1]["tokens_per_s"] < 90  # the whole-loop mean the slow start drags down
    assert steady_rate(rated[:1], tokens_per_step) is None
