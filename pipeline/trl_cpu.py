"""One change to TRL on the CPU: its fused LM head scores only the positions that have a label.

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
