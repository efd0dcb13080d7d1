"""Three changes to TRL on the CPU: its fused LM head scores only the positions that have a label, folds each
logits tile in fewer passes (`fold_tiles_leanly_on_cpu` below), and projects tiles of fewer tokens
(`smaller_token_tiles_on_cpu` at the end).

TRL (1.16) computes per-token log-probabilities through a fused, chunked LM head that never holds
the (tokens x vocabulary) logits (trl.trainer.utils.add_fused_lm_head). On Triton devices it
projects only the positions whose label is not -100; elsewhere it projects every position, prompt
and padding included, because on compiled backends (Neuron) a changing number of positions would
recompile the graph on every batch. Eager CPU code never recompiles, so there that choice only costs
time: with Gemma's 262,144-token vocabulary the head is most of a step, and DPO on
recipes/gemma3-270m.yaml took 72 s for 4 steps as TRL ships it and 43 s scoring labelled positions
only (the same loss; 2-core Xeon, bf16). The per-token results are the same either way: TRL sets
the unlabelled positions to 0 after the head (tests/test_trl_cpu.py compares both paths).

TRL decides with the name `_use_triton` in trl.trainer.utils (the kernels read their own copy), so
that name is wrapped to also say yes for the CPU. A TRL without it is left as it is.
"""

from __future__ import annotations

import torch


def score_only_labelled_positions_on_cpu() -> bool:
    """Install the change (idempotent); False when this TRL has no such switch."""
    import trl.trainer.utils as trl_utils

    decide = getattr(trl_utils, "_use_triton", None)
    if decide is None:
        return False
    if getattr(decide, "_labelled_only_on_cpu", False):
        return True

    def compact_scoring(device) -> bool:
        return device.type == "cpu" or decide(device)

    compact_scoring._labelled_only_on_cpu = True
    compact_scoring.__wrapped__ = decide
    trl_utils._use_triton = compact_scoring
    return True


# ---------------------------------------------------------------- a leaner CPU fold of each logits tile
#
# Without Triton, TRL folds every (tokens x vocabulary-chunk) tile of logits with plain torch ops
# (trl.kernels.chunked_logprob._forward_tile / _backward_tile), written for any softcap, scale and
# temperature: it casts the tile, multiplies it by 1.0 twice, builds a boolean tile to find each row's
# target and another for its top-1 statistic, and builds the gradient in a zeroed tile. With Gemma's
# 262,144-token vocabulary these element-wise passes, not the matmuls, were most of a DPO step on the
# CPU (51 of 70 s in a profile). The folds below compute the same statistics (same formulas, fp32) in
# fewer passes over the tile: in-place shifts, the target and top-1 by index instead of a boolean tile,
# and the entropy sum as one dot product. They run when the plain case holds (no softcap, scale 1,
# temperature 1) and hand everything else to TRL's own fold. The kernels look the folds up by module
# name at call time, which is what makes them replaceable.


def _lean_forward_tile(tile, tile_stride, targets, running_max, sum_exp, x_sum_exp, sq_sum_exp, z_sum,
                       max_before_target, target_logit, vocab_start, n_cols, logit_scale, softcap, inv_t,
                       HAS_SOFTCAP, HAS_ENTROPY, HAS_LOG_SUM_SQ_PROBS, HAS_MEAN_LOGITS, HAS_IS_TOP1, BLOCK_SIZE):
    z = tile.float()  # the tile is a scratch buffer: when it is fp32 already, working in place is fine
    local = targets - vocab_start
    rows = torch.nonzero((local >= 0) & (local < n_cols)).squeeze(-1)
    if rows.numel():
        target_logit[rows] = z[rows, local[rows]]
    if HAS_MEAN_LOGITS:
        z_sum += z.sum(-1)
    tile_max = z.amax(-1)
    if HAS_IS_TOP1:
        # the largest logit before the target, as TRL's argmax tie rule needs: the whole tile for rows whose
        # target lies in a later tile, nothing for rows whose target lies earlier, a slice for the rest
        before = torch.where(local >= n_cols, tile_max, torch.full_like(tile_max, float("-inf")))
        if rows.numel():  # one masked pass over those rows (a loop over rows cost ~2x, in Python)
            cols = torch.arange(z.shape[-1], device=z.device)
            before[rows] = z[rows].masked_fill_(cols >= local[rows].unsqueeze(-1), float("-inf")).amax(-1)
        torch.maximum(max_before_target, before, out=max_before_target)
    new_max = torch.maximum(running_max, tile_max)
    rescale = torch.exp(running_max - new_max)
    z.sub_(new_max.unsqueeze(-1))  # z - max: every exponent <= 0
    e = torch.exp(z)
    tile_sum = e.sum(-1)
    if HAS_ENTROPY:  # sum(e * z) = sum(e * (z - max)) + max * sum(e)
        x_sum_exp.mul_(rescale).add_(torch.linalg.vecdot(e, z) + new_max * tile_sum)
    if HAS_LOG_SUM_SQ_PROBS:
        sq_sum_exp.mul_(rescale * rescale).add_(torch.linalg.vecdot(e, e))
    sum_exp.mul_(rescale).add_(tile_sum)
    running_max.copy_(new_max)


def _lean_backward_tile(tile, tile_stride, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start,
                        n_cols, logit_scale, softcap, inv_t, HAS_SOFTCAP, HAS_LOGPROB_GRAD, HAS_ENTROPY_GRAD,
                        BLOCK_SIZE):
    g = grad_logprobs if HAS_LOGPROB_GRAD else torch.zeros_like(log_z)
    log_p = tile.float().sub_(log_z.unsqueeze(-1))
    if HAS_ENTROPY_GRAD:
        # d(log p_t)/dz_j = 1[j = t] - p_j and d(entropy)/dz_j = -p_j (log p_j + entropy), so the gradient
        # is 1[j = t] g - p_j (g + g_H (log p_j + entropy))
        factor = (log_p + entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1)).add_(g.unsqueeze(-1))
        grad = log_p.exp_().mul_(factor).neg_()
    else:
        grad = log_p.exp_().mul_(-g.unsqueeze(-1))
    if HAS_LOGPROB_GRAD:
        local = targets - vocab_start
        rows = torch.nonzero((local >= 0) & (local < n_cols)).squeeze(-1)
        if rows.numel():
            grad[rows, local[rows]] += g[rows]
    if grad.data_ptr() != tile.data_ptr():
        tile.copy_(grad)


def _plain(kwargs) -> bool:
    return not kwargs["HAS_SOFTCAP"] and kwargs["logit_scale"] == 1 and kwargs["inv_t"] == 1


def fold_tiles_leanly_on_cpu() -> bool:
    """Install the lean folds (idempotent); False when this TRL has no torch fold to replace."""
    import trl.kernels.chunked_logprob as kernels

    trl_forward, trl_backward = getattr(kernels, "_forward_tile", None), getattr(kernels, "_backward_tile", None)
    if trl_forward is None or trl_backward is None:
        return False
    if getattr(trl_forward, "_lean", False):
        return True

    # the lean folds are looked up by name at call time, like TRL's own
    def forward_tile(tile, *args, **kwargs):
        if not _plain(kwargs):
            return trl_forward(tile, *args, **kwargs)
        with torch.autocast(tile.device.type, enabled=False):  # the dot products stay fp32 under autocast
            return _lean_forward_tile(tile, *args, **kwargs)

    def backward_tile(tile, *args, **kwargs):
        if not _plain(kwargs):
            return trl_backward(tile, *args, **kwargs)
        with torch.autocast(tile.device.type, enabled=False):
            return _lean_backward_tile(tile, *args, **kwargs)

    for fold, original in ((forward_tile, trl_forward), (backward_tile, trl_backward)):
        fold._lean, fold.__wrapped__ = True, original
    kernels._forward_tile, kernels._backward_tile = forward_tile, backward_tile
    return True


# ---------------------------------------------------------------- tiles of fewer tokens on the CPU
#
# TRL's head projects tiles of up to TOKEN_CHUNK_SIZE = 4,096 tokens x 32,768 vocabulary columns, sized for a
# GPU. On the CPU each fold works through a few fp32 temporaries of a tile's size (the exponentials, the
# gradient), so with Gemma's 262,144-token vocabulary a full tile of 4,096 tokens costs 512 MB per temporary.
# Measured on a 2-core Xeon (AMX), 4,096 tokens x 262,144 vocabulary x 640 hidden, bf16, forward and backward
# with both lean folds: peak RSS 2,170 MB above the inputs with 4,096-token tiles, 1,549 with 2,048, 1,280 with
# 1,024 (31.0 / 31.0 / 31.6 s); 512 rows saved little more (1,229 MB) and cost 15% (the weight chunk is read
# again for every tile). The per-token outputs are the same to the last bit (each is a fold over its own row);
# the weight's gradient sums the same terms grouped by tile. A stage gains only where its micro-batches hold
# more than 1,024 labelled tokens and the head's temporaries set its peak: on the bench's gemma workload (at
# most ~1,400 labelled tokens per micro-batch) sft peaked at 5,575 vs 5,475 MB and dpo at 2,623 vs 2,597 MB
# with and without the cap (one trial each, within the drift).
CPU_TOKEN_TILE = 1024


def smaller_token_tiles_on_cpu() -> bool:
    """Cap TRL's token tile at CPU_TOKEN_TILE (idempotent) when no GPU is present: a GPU process keeps TRL's
    tiles for its kernels. False when this TRL has no such setting or a GPU is present."""
    import trl.kernels.chunked_logprob as kernels

    if not isinstance(getattr(kernels, "TOKEN_CHUNK_SIZE", None), int) or torch.cuda.is_available():
        return False
    kernels.TOKEN_CHUNK_SIZE = min(kernels.TOKEN_CHUNK_SIZE, CPU_TOKEN_TILE)
    return True
