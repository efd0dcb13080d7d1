"""Log-probabilities, losses and KL computed directly from logits: what training and evaluation share.

With a real vocabulary the logits dominate memory (Gemma's 262,144 entries: 1 MB per token in
fp32), so batches are cut by a budget of logit entries rather than a row count, and the
log-softmax is taken only at the positions that count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOGIT_BUDGET = 1 << 28  # logit entries per forward pass (1 GiB in fp32)


def _batches(rows: list[tuple[list[int], list[int]]], vocab_size: int, max_rows: int = 64):
    """Consecutive runs of rows whose padded (rows x longest x vocab) logits fit LOGIT_BUDGET."""
    batch: list = []
    width = 0
    for row in rows:
        wider = max(width, len(row[0]))
        if batch and ((len(batch) + 1) * wider * vocab_size > LOGIT_BUDGET or len(batch) == max_rows):
            yield batch
            batch, wider = [], len(row[0])
        batch.append(row)
        width = wider
    if batch:
        yield batch


def _padded(rows: list[tuple[list[int], list[int]]], pad_id: int, device):
    """Right-padded (B, T) ids, attention mask, and the mask of positions that count."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    counted = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (row_ids, mask) in enumerate(rows):
        ids[r, : len(row_ids)] = torch.tensor(row_ids)
        attention[r, : len(row_ids)] = 1
        counted[r, : len(row_ids)] = torch.tensor(mask, dtype=torch.bool)
    return ids.to(device), attention.to(device), counted.to(device)


def _vocab(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def pairs_to_rows(pairs: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, completion_ids) -> (ids, mask over the completion)."""
    return [(prompt + completion, [0] * len(prompt) + [1] * len(completion)) for prompt, completion in pairs]


@torch.no_grad()
def masked_logps(model, rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) summed log p of the masked tokens of each (ids, mask) row, and (N,) their counts."""
    device = next(model.parameters()).device
    sums, counts = [], []
    for batch in _batches(rows, _vocab(model)):
        ids, attention, counted = _padded(batch, pad_id, device)
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits  # (B, T, V)
        target = counted[:, 1:]  # a token counts where the model predicted it from the positions before
        picked = logits[:, :-1][target].float().log_softmax(-1)  # (n, V): upcast only what counts
        token_logps = picked.gather(-1, ids[:, 1:][target][:, None]).squeeze(-1)
        row_of = torch.arange(len(batch), device=device)[:, None].expand_as(target)[target]
        sums.append(torch.zeros(len(batch), dtype=torch.float64, device=device)
                    .index_add_(0, row_of, token_logps.double()).cpu())
        counts.append(target.sum(-1).cpu())
    if not sums:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(sums), torch.cat(counts)


def completion_logps(model, pairs: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """(N,) summed log p(completion | prompt) for (prompt_ids, completion_ids) pairs."""
    return masked_logps(model, pairs_to_rows(pairs), pad_id)[0].float()


def perplexity_of(model, rows: list[tuple[list[int], list[int]]], pad_id: int) -> float | None:
    """exp(mean negative log-likelihood) over every masked token of every row."""
    sums, counts = masked_logps(model, rows, pad_id)
    total = int(counts.sum())
    return float(torch.exp(-sums.sum() / total)) if total else None


@torch.no_grad()
def sequence_kl(policy, reference, pairs: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """(N,) KL(policy || reference) summed over the completion's positions, exact over the vocabulary.

    With completions sampled from the policy this estimates the sequence-level KL that DPO's beta
    (and RL's KL penalty) regularises.
    """
    device = next(policy.parameters()).device
    rows = pairs_to_rows(pairs)
    out = []
    for batch in _batches(rows, 2 * _vocab(policy)):  # two models' logits at once
        ids, attention, counted = _padded(batch, pad_id, device)
        target = counted[:, 1:]
        p = policy(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1][target].float()
        q = reference(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1][target].float()
        p, q = p.log_softmax(-1), q.log_softmax(-1)
        per_token = (p.exp() * (p - q)).sum(-1)  # (n,)
        row_of = torch.arange(len(batch), device=device)[:, None].expand_as(target)[target]
        out.append(torch.zeros(len(batch), device=device).index_add_(0, row_of, per_token).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def summed_loss(model, blocks, rows, dtype) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over the counted targets of packed blocks, and their number.

    Packed blocks restart position ids at each document, and transformers keeps documents apart
    only when the cache is off (use_cache=False), so no token attends across a boundary.
    """
    ids, pos = blocks.input_ids[rows], blocks.position_ids[rows]
    device = next(model.parameters()).device
    ids, pos = ids.to(device), pos.to(device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # (B, T, V)
    # position t predicts token t+1 unless t+1 starts a document; the last position predicts nothing. Ignoring
    # those targets, rather than slicing and masking the logits, spares a copy of the (B, T, V) logits and a
    # scatter in backward (pretraining throughput)
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:].masked_fill(pos[:, 1:] == 0, -100)
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                             reduction="sum")  # upcast before log_softmax
    return losses, int((targets != -100).sum())
