"""Checks that hold the processes of one run together."""

from __future__ import annotations

import torch

from pipeline.errors import StageFailed


@torch.no_grad()
def ranks_agree(model, accelerator, trainable_only: bool = False) -> bool:
    """Every process holds the same weights (compared by a sum and a sum of squares per process)."""
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    flat = torch.cat([p.detach().double().flatten() for p in params])
    summary = torch.stack([flat.sum(), (flat * flat).sum()]).to(accelerator.device)
    gathered = accelerator.gather(summary[None]).view(-1, 2)
    return bool((gathered == gathered[0]).all())


def whole_state_dict(trainer) -> dict:
    """The trained model's whole state dict, for the main process to save. Every process must call it: under
    ZeRO-3 or FSDP it gathers the shards (a collective). On one device or under DDP it is the model's own tensors,
    no copy. Saving the model as it is wrote ZeRO-3's empty parameter stubs, or the main process's FSDP shard."""
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def leave_process_group() -> None:
    """Destroy the default process group, if one was started, before the interpreter exits.

    Without it gloo's worker thread can still be freeing a collective's work object while Python
    finalizes; it then needs the GIL and the process aborts ("terminate called without an active
    exception", SIGABRT) after the work is done. Every entry point calls this on every exit path.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def require_ranks_agree(stage: str, model, accelerator, trainable_only: bool = False) -> bool:
    """ranks_agree, or the stage fails loudly: diverged processes would save one rank's weights."""
    params = [p for p in model.parameters() if p.requires_grad or not trainable_only]
    if not all(torch.isfinite(p.detach()).all() for p in params):
        # NaN != NaN: without this the message below would blame the processes for bad weights
        raise StageFailed(f"{stage}: the trained weights are not finite (NaN or inf); lower {stage}.learning_rate")
    if not ranks_agree(model, accelerator, trainable_only):
        kind = "adapter weights" if trainable_only else "weights"
        raise StageFailed(f"{stage}: the processes ended with different {kind} (gradients were not synchronised)")
    return True
