"""pretrain stage: a small causal transformer trained from scratch on packed text blocks.

Our own loop (nanoGPT-shaped) rather than a Trainer: the stage needs document-separated
packing, a global batch that is the same on 1 or N processes, atomic resumable checkpoints
and a NaN stop that keeps the last good one; a plain loop says all of that in one screen.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch

from pipeline.artifacts import (
    append_jsonl,
    atomic_write_json,
    file_sha256,
    last_good_checkpoint,
    read_json,
    truncate_log,
    write_checksums,
)
from pipeline.chat_template import ChatRenderer
from pipeline.data.packing import PackedBlocks, cache_key, load_or_pack, pack, tokenize_documents
from pipeline.data.readers import read_records
from pipeline.distributed import require_ranks_agree
from pipeline.errors import PipelineError, StageFailed
from pipeline.generation import stop_token_ids
from pipeline.logprobs import summed_loss
from pipeline.models import autocast_dtype, build_model, count_parameters
from pipeline.ngram import baseline_perplexities
from pipeline.recipe import PretrainConfig, ceiling_note, split_batch

# ---------------------------------------------------------------- data


def load_documents(files: list[str]) -> list[str]:
    return [r["text"] for f in files for r in read_records(f, "text").records if r["text"].strip()]


def render_chats(files: list[str], tokenizer) -> list[list[int]]:
    """Conversations as token ids through the one chat renderer, without the BOS that packing adds."""
    if not files:
        return []
    renderer = ChatRenderer(tokenizer)
    out = []
    for file in files:
        for record in read_records(file, "conversation").records:
            ids = renderer.render(record["messages"]).input_ids
            out.append(ids[1:] if ids and ids[0] == tokenizer.bos_token_id else ids)
    return out


def split_documents(cfg: PretrainConfig, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) documents: from eval_data, or a seeded share of train_data."""
    train = load_documents(cfg.train_data)
    if cfg.eval_data:
        return train, load_documents(cfg.eval_data)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(train) * cfg.eval_fraction))
    held = set(order[:n_eval])
    return [d for i, d in enumerate(train) if i not in held], [train[i] for i in sorted(held)]


def prepare_blocks(cfg: PretrainConfig, tokenizer, tokenizer_dir: Path, cache_dir: Path, seed: int, accelerator):
    """Tokenize and pack once (main process first; the others read its cache)."""
    key = cache_key(
        *(file_sha256(f) for f in [*cfg.train_data, *cfg.chat_data, *cfg.eval_data]),
        file_sha256(tokenizer_dir / "tokenizer.json"),
        str(cfg.seq_len), str(cfg.eval_fraction), str(seed),
    )

    def build(documents, chats=()):
        def tokenize():
            ids = tokenize_documents(documents, tokenizer) + list(chats)
            random.Random(seed).shuffle(ids)  # mix chat documents in among the text
            return pack(ids, cfg.seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)
        return tokenize

    with accelerator.main_process_first():
        train_docs, eval_docs = split_documents(cfg, seed)
        try:
            train = load_or_pack(cache_dir, key + "-train", build(train_docs, render_chats(cfg.chat_data, tokenizer)))
            heldout = load_or_pack(cache_dir, key + "-eval", build(eval_docs))
        except ValueError as exc:
            raise PipelineError(f"pretrain data: {exc}; add text or lower pretrain.seq_len") from None
    return train, heldout


def global_batch(step: int, size: int, n_blocks: int, seed: int, _perms: dict = {}) -> list[int]:
    """Block indices of optimizer step `step`: a fresh seeded permutation every epoch.

    A function of the step alone, so a resumed run and a run on any number of processes
    see exactly the same blocks in the same order.
    """
    indices = []
    for k in range(step * size, (step + 1) * size):
        epoch, offset = divmod(k, n_blocks)
        if (seed, epoch, n_blocks) not in _perms:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            _perms[(seed, epoch, n_blocks)] = torch.randperm(n_blocks, generator=generator).tolist()
        indices.append(_perms[(seed, epoch, n_blocks)][offset])
    return indices


# ---------------------------------------------------------------- loss and evaluation


@torch.no_grad()
def evaluate(model, blocks: PackedBlocks, max_blocks: int, batch_size: int, dtype, accelerator) -> float:
    """Held-out mean next-token loss (nats), sharded over processes."""
    model.eval()
    rows = list(range(min(len(blocks), max_blocks)))[accelerator.process_index :: accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for start in range(0, len(rows), batch_size):
        loss, count = summed_loss(model, blocks, rows[start : start + batch_size], dtype)
        total += torch.tensor([loss.item(), count], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(total, "sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


# ---------------------------------------------------------------- optimizer and schedule


def make_optimizer(model, cfg: PretrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused=True would step the bench's 3.8M-parameter model in 2.7 ms instead of 18.5 ms on 2 cores (~6% of a
    # pretraining step), but its rounding moves the quickstart across its bars: at 700 steps the seed-1 world
    # went from 0.088 to 0.128 held-out answer accuracy before SFT (bar 0.10); 800 fused steps met every bar
    # in bf16 but in fp32 left seed 0 at 0.848 after SFT and seed 2 at 0.128 before it (issue 14's notes)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2))


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio of the peak: over every remaining step, or over the
    last decay_steps after holding the peak (warmup-stable-decay)."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    decay_start = cfg.max_steps - cfg.decay_steps if cfg.decay_steps else cfg.warmup_steps
    if step < decay_start:
        return cfg.learning_rate
    progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


# ---------------------------------------------------------------- checkpoints


def latest_checkpoint(root: Path, log=print) -> Path | None:
    """Newest intact checkpoint; a torn or corrupt one is set aside with a message."""
    return last_good_checkpoint(root, "step-*", log)


def save_checkpoint(root: Path, step: int, model, optimizer, keep: int) -> Path:
    """Write into a temporary folder, then rename: a crash never leaves a half checkpoint."""
    from safetensors.torch import save_model

    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    atomic_write_json(tmp / "state.json", {"step": step})
    write_checksums(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer) -> int:
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"))
    # map_location: every rank's copy of the state lands on the CPU, then on its own device (not all on GPU 0)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return read_json(path / "state.json")["step"]


# ---------------------------------------------------------------- the stage


def run(cfg: PretrainConfig, ctx) -> dict:
    from transformers import AutoTokenizer

    accelerator, seed = ctx.accelerator, ctx.recipe.seed
    require_replicated(accelerator)
    tokenizer_dir = ctx.output_of("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    # data
    train, heldout = prepare_blocks(cfg, tokenizer, tokenizer_dir, ctx.out_dir / "cache", seed, accelerator)
    world = accelerator.num_processes
    split = split_batch("pretrain", cfg.global_batch_size, cfg.micro_batch_size, world)
    per_process, micro_batch, accumulation = cfg.global_batch_size // world, split.micro_batch, split.accumulation
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    baselines = baseline_perplexities(train, heldout, len(tokenizer))

    # model
    model = build_model(cfg.model, tokenizer, seed)
    dtype = autocast_dtype(cfg.precision, accelerator.device)
    trainable, total = count_parameters(model)
    ctx.log(
        f"{cfg.model.architecture} model with {total / 1e6:.2f}M parameters; {len(train):,} training blocks of "
        f"{cfg.seq_len} tokens ({len(train) * cfg.seq_len:,} tokens), {len(heldout):,} held-out blocks"
    )
    ctx.log(
        f"{tokens_per_step:,} tokens per step = {world} process(es) x {micro_batch} blocks x "
        f"{accumulation} accumulation x {cfg.seq_len}{ceiling_note(split, cfg.micro_batch_size)}; {cfg.max_steps} steps = "
        f"{cfg.max_steps * tokens_per_step / (len(train) * cfg.seq_len):.1f} epochs; "
        f"precision {'fp32' if dtype is None else str(dtype).removeprefix('torch.') + ' autocast'}"
        f"{'; compiled (torch.compile)' if cfg.compile else ''}"
    )
    optimizer = make_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    # fp16 autocast needs loss scaling, or small gradients underflow to zero. The launch configs leave accelerate's
    # mixed_precision at 'no' (the stages choose their own precision), so accelerate makes no scaler: ours.
    # Its scale is not checkpointed: a resumed run finds it again within a few skipped steps.
    scaler = torch.amp.GradScaler(accelerator.device.type, enabled=dtype == torch.float16)
    skipped = 0
    raw_model = accelerator.unwrap_model(model)
    # the training step runs the compiled module (fixed shapes: one graph); evaluation and saving use the plain
    # one. Off by default: inductor's CPU kernels add in a varying order (5th digit of the loss after 10 steps)
    step_model = compiled(model, accelerator.device) if cfg.compile else model

    # resume
    ckpt_root = ctx.out_dir / "checkpoints"
    metrics_path = ctx.out_dir / "metrics.jsonl"
    start_step = 0
    with accelerator.main_process_first():  # the main process sets corrupt ones aside first
        checkpoint = latest_checkpoint(ckpt_root, ctx.log)
    if checkpoint is not None:
        start_step = load_checkpoint(checkpoint, raw_model, optimizer)
        ctx.log(f"resuming from {checkpoint.name} (step {start_step})")
    if ctx.is_main:
        for stale in ckpt_root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        truncate_log(metrics_path, start_step)
    writer = _tensorboard(ctx)

    # loop
    from tqdm.auto import tqdm

    progress = tqdm(total=cfg.max_steps, initial=start_step, desc="pretrain", disable=not ctx.is_main,
                    dynamic_ncols=True, mininterval=1.0)
    model.train()
    eval_loss = None
    started, tokens_seen = time.perf_counter(), 0
    for step in range(start_step, cfg.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        rows = global_batch(step, cfg.global_batch_size, len(train), seed)
        # every process knows the whole global batch, so each can normalise by its target count
        n_targets = int(train.target_mask(rows).sum())
        mine = rows[accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process]
        step_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for micro in range(accumulation):
            chunk = mine[micro * micro_batch : (micro + 1) * micro_batch]
            sync = micro == accumulation - 1
            with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                loss_sum, _ = summed_loss(step_model, train, chunk, dtype)
                # DDP averages gradients over processes; scale so the result is the global-batch mean
                accelerator.backward(scaler.scale(loss_sum * world / n_targets))
            step_loss += loss_sum.detach().double()
        step_loss = accelerator.reduce(step_loss, "sum") / n_targets
        scaler.unscale_(optimizer)  # the true gradients, for the norm and the clipping
        grad_norm = _grad_norm(model, accelerator, cfg.grad_clip)
        # under fp16 a finite loss with overflowed gradients means the scale was too large, not a diverged run
        overflowed = scaler.is_enabled() and math.isfinite(step_loss.item()) and not math.isfinite(grad_norm)
        if not overflowed and not (math.isfinite(step_loss.item()) and math.isfinite(grad_norm)):
            last = max(ckpt_root.glob("step-*"), default=None)  # checked on resume, not here: every rank is here
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise StageFailed(
                f"pretrain: loss is {step_loss.item()} (gradient norm {grad_norm}) at step {step + 1}; stopped "
                f"before updating the weights; {kept}. Lower pretrain.learning_rate or check the data."
            )
        scaler.step(optimizer)  # no update where the gradients overflowed; optimizer.step() when the scaler is off
        scaler.update()  # halves the scale after an overflow, grows it after a run of good steps
        if overflowed:
            skipped += 1
            if skipped % 10 == 1:
                ctx.log(f"step {step + 1}: fp16 gradients overflowed; update skipped, loss scale now "
                        f"{scaler.get_scale():g} ({skipped} skipped so far)")
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        tokens_seen += tokens_per_step
        progress.update(1)

        if done % cfg.log_every == 0 or done == cfg.max_steps:
            rate = tokens_seen / (time.perf_counter() - started)
            record = {"step": done, "loss": round(step_loss.item(), 5), "lr": lr_at(step, cfg),
                      "grad_norm": round(grad_norm, 4) if math.isfinite(grad_norm) else None,
                      "tokens_per_s": round(rate, 1)}
            if scaler.is_enabled():
                record["loss_scale"] = scaler.get_scale()
            progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{rate:,.0f}")
            _log(ctx, writer, metrics_path, record)
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            eval_loss = evaluate(raw_model, heldout, cfg.eval_max_blocks, micro_batch, dtype, accelerator)
            _log(ctx, writer, metrics_path, {"step": done, "eval_loss": round(eval_loss, 5),
                                              "eval_perplexity": round(math.exp(eval_loss), 4)})
        if done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
            if ctx.is_main:
                save_checkpoint(ckpt_root, done, raw_model, optimizer, cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
    progress.close()
    if eval_loss is None:  # resumed at the very end
        eval_loss = evaluate(raw_model, heldout, cfg.eval_max_blocks, micro_batch, dtype, accelerator)

    in_sync = require_ranks_agree("pretrain", raw_model, accelerator)

    # save
    if ctx.is_main:
        raw_model.generation_config.bos_token_id = tokenizer.bos_token_id
        # the tokenizer carries the chat template, so plain transformers' generate stops at the end of a turn
        # (and at eos) as the stages built on this model do; eos alone ran on into an invented next turn
        raw_model.generation_config.eos_token_id = stop_token_ids(tokenizer, ChatRenderer(tokenizer))
        raw_model.generation_config.pad_token_id = tokenizer.pad_token_id
        raw_model.save_pretrained(ctx.out_dir, safe_serialization=True)
        tokenizer.save_pretrained(ctx.out_dir)
        if writer:
            writer.close()
    accelerator.wait_for_everyone()

    perplexity = math.exp(eval_loss)
    ctx.log(
        f"held-out perplexity {perplexity:.3f} (unigram {baselines['unigram_perplexity']:.1f}, "
        f"bigram {baselines['bigram_perplexity']:.2f}) on {baselines['heldout_targets']:,} tokens"
    )
    return {
        "eval_loss": eval_loss,
        "eval_perplexity": perplexity,
        **baselines,
        "parameters": total,
        "trainable_parameters": trainable,
        "steps": cfg.max_steps,
        "tokens_per_step": tokens_per_step,
        "gradient_accumulation": accumulation,
        "micro_batch": micro_batch,
        "world_size": world,
        "ranks_in_sync": in_sync,
        "precision": "fp32" if dtype is None else str(dtype).removeprefix("torch."),
        **({"fp16_skipped_steps": skipped} if scaler.is_enabled() else {}),
        "compiled": cfg.compile,
        "train_blocks": len(train),
        "heldout_blocks": len(heldout),
    }


# ---------------------------------------------------------------- small helpers


def require_replicated(accelerator) -> None:
    """This stage's own loop (accumulation, clipping, checkpoints of the whole model from the main process) is
    written for a whole model on every process: CPU, one GPU or DDP. Under DeepSpeed accelerate refuses to prepare a
    model without a dataloader (and its engine would step by its own count), and under FSDP the main process would
    save only its shard: refused before anything is trained, not left to fail inside accelerate or save a part."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise PipelineError(f"pretrain runs on one device or under DDP, not {accelerator.distributed_type.value}: "
                            "launch the recipe with launch/accelerate/ddp.yaml until pretrain is done (a model "
                            "trained from scratch here fits one GPU), then again with this config: the finished stage "
                            "is skipped")


def cxx_compiler_on_path() -> bool:
    """Whether inductor can build its CPU kernels here."""
    return any(shutil.which(cc) for cc in ("c++", "g++", "clang++"))


def compiled(model, device: torch.device):
    """torch.compile's inductor module, refused up front where it could only fail inside the first step."""
    if device.type == "cpu":
        if not cxx_compiler_on_path():
            raise PipelineError("pretrain.compile: torch.compile on the CPU builds C++ kernels, and no C++ compiler "
                                "(c++, g++ or clang++) is on PATH; install one (apt-get install g++) or set "
                                "pretrain.compile=false")
        inductor_cache_per_cpu_capability()
    return torch.compile(model, dynamic=False)


def inductor_cache_per_cpu_capability() -> None:
    """Keep inductor's on-disk CPU kernels apart per ATen CPU capability, where no cache folder is set.

    Its cache is not keyed on the capability (torch 2.13): kernels built under ATEN_CPU_CAPABILITY=avx2 (the
    README's way to run as an AVX2-only CPU) and loaded without it, or the reverse, crashed with "index out of
    bounds" or "free(): invalid pointer" or gave a NaN loss at the first step (2026-12-01). torch itself writes its
    default folder into TORCHINDUCTOR_CACHE_DIR once it has looked it up, so that value counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = os.path.abspath(default_cache_dir())
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default) == default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default}_{torch.backends.cpu.get_cpu_capability().lower()}"


def _grad_norm(model, accelerator, clip: float) -> float:
    if clip > 0:
        return float(accelerator.clip_grad_norm_(model.parameters(), clip))
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _tensorboard(ctx):
    if not ctx.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; metrics.jsonl always has the numbers
        return None
    return SummaryWriter(str(ctx.out_dir / "tensorboard"))


def _log(ctx, writer, path: Path, record: dict) -> None:
    if not ctx.is_main:
        return
    append_jsonl(path, record)
    if writer:
        for key, value in record.items():
            if key != "step" and value is not None:  # grad_norm of an fp16 step that overflowed
                writer.add_scalar(f"pretrain/{key}", value, record["step"])
        writer.flush()
