"""Unigram and bigram baselines: the perplexity a model must beat to have learned anything.

Both are fitted on the training blocks and scored on exactly the held-out targets the
model is scored on (next-token predictions that do not cross a document start).
The bigram interpolates with the unigram; its weight is chosen on the held-out set
itself, which flatters the baseline, so beating it is the stricter claim.
"""

from __future__ import annotations

import math

import torch

from pipeline.data.packing import PackedBlocks


def _pairs(blocks: PackedBlocks) -> tuple[torch.Tensor, torch.Tensor]:
    """(prev, next) token ids of every counted prediction."""
    mask = blocks.target_mask()
    return blocks.input_ids[:, :-1][mask], blocks.input_ids[:, 1:][mask]


def baseline_perplexities(train: PackedBlocks, heldout: PackedBlocks, vocab_size: int) -> dict[str, float]:
    train_prev, train_next = _pairs(train)
    prev, nxt = _pairs(heldout)

    # Unigram with add-one smoothing, so unseen tokens are not infinitely surprising.
    unigram = torch.bincount(train_next, minlength=vocab_size).double() + 1.0
    unigram /= unigram.sum()
    unigram_nll = -torch.log(unigram[nxt]).mean().item()

    # Bigram counts as a sparse table keyed by prev * V + next.
    keys = train_prev * vocab_size + train_next
    uniq, counts = torch.unique(keys, return_counts=True)
    table = dict(zip(uniq.tolist(), counts.tolist()))
    prev_totals = torch.bincount(train_prev, minlength=vocab_size).double()
    bigram_counts = torch.tensor([table.get(k, 0) for k in (prev * vocab_size + nxt).tolist()], dtype=torch.float64)
    totals = prev_totals[prev]
    ml = torch.where(totals > 0, bigram_counts / totals.clamp(min=1), torch.zeros_like(totals))
    best = math.inf
    for weight in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
        nll = -torch.log(weight * ml + (1 - weight) * unigram[nxt]).mean().item()
        best = min(best, nll)
    return {
        "unigram_perplexity": math.exp(unigram_nll),
        "bigram_perplexity": math.exp(best),
        "heldout_targets": int(nxt.numel()),
    }
