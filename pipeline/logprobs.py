"""Log-probabilities of completions and KL between two models, computed directly from logits."""

from __future__ import annotations

import torch


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _padded(pairs: list[tuple[list[int], list[int]]], pad_id: int, device):
    """Right-padded (B, T) ids, attention mask, and a mask of completion tokens."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(pairs), width), dtype=torch.long)
    completion = torch.zeros((len(pairs), width), dtype=torch.bool)
    for row, (prompt, answer) in enumerate(pairs):
        n = len(prompt) + len(answer)
        ids[row, :n] = torch.tensor(prompt + answer)
        attention[row, :n] = 1
        completion[row, len(prompt) : n] = True
    return ids.to(device), attention.to(device), completion.to(device)


@torch.no_grad()
def completion_logps(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """(N,) summed log p(completion | prompt) for (prompt_ids, completion_ids) pairs."""
    device = next(model.parameters()).device
    out = []
    for batch in _batches(pairs, batch_size):
        ids, attention, completion = _padded(batch, pad_id, device)
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits.float()  # (B, T, V)
        logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        out.append((logps * completion[:, 1:]).sum(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def sequence_kl(policy, reference, pairs: list[tuple[list[int], list[int]]], pad_id: int,
                batch_size: int = 16) -> torch.Tensor:
    """(N,) KL(policy || reference) summed over the completion's positions, exact over the vocabulary.

    With completions sampled from the policy this estimates the sequence-level KL that DPO's beta
    regularises.
    """
    device = next(policy.parameters()).device
    out = []
    for batch in _batches(pairs, batch_size):
        ids, attention, completion = _padded(batch, pad_id, device)
        p = policy(input_ids=ids, attention_mask=attention, use_cache=False).logits.float()[:, :-1].log_softmax(-1)
        q = reference(input_ids=ids, attention_mask=attention, use_cache=False).logits.float()[:, :-1].log_softmax(-1)
        per_token = (p.exp() * (p - q)).sum(-1)  # (B, T-1)
        out.append((per_token * completion[:, 1:]).sum(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)
