"""Checks that hold the processes of one run together."""

from __future__ import annotations

import torch


@torch.no_grad()
def ranks_agree(model, accelerator, trainable_only: bool = False) -> bool:
    """Every process holds the same weights (compared by a sum and a sum of squares per process)."""
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    flat = torch.cat([p.detach().double().flatten() for p in params])
    summary = torch.stack([flat.sum(), (flat * flat).sum()]).to(accelerator.device)
    gathered = accelerator.gather(summary[None]).view(-1, 2)
    return bool((gathered == gathered[0]).all())
