"""DPO's chosen and rejected replies scored in one row per pair, with their common prompt computed once.

TRL's DPOTrainer runs every pair as two padded rows, prompt + chosen and prompt + rejected, so the
prompt goes through the model twice and the shorter reply is padded to the longer. Here each pair
becomes one row

    [ prompt | chosen | prompt's last token again | rejected ]      position ids 0..P-1, P.., P-1, P..

with a 4D attention mask that keeps the two replies apart: chosen tokens see the prompt and the
chosen tokens before them; the rejected segment sees the prompt without its last token (its copy
stands in for it, so the first rejected token is predicted from the same state as in TRL's row)
and the rejected tokens before it. Every scored position sees exactly the keys, at the same
positions, that it sees in TRL's layout, so the log-probabilities are the same up to rounding
(tests/test_shared_prompt.py). The per-token results are then put back into TRL's padded
[chosen; rejected] layout, so TRL's losses and metrics run unchanged.

TRL has no such option (1.16: `padding_free` is disabled in its DPOTrainer), hence this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
MASKED_ATTENTION = ("sdpa", "eager")  # implementations that take a custom 4D mask (flash attention does not)


@dataclass
class SharedLayout:
    """One packed row per pair and where each of TRL's scored positions lives in it."""

    input_ids: torch.Tensor  # (B, W)
    position_ids: torch.Tensor  # (B, W)
    allowed: torch.Tensor  # (B, 1, W, W) bool, True = the query may attend to the key
    shift_labels: torch.Tensor  # (B, W): the token each position predicts, -100 where none is scored
    padded_rows: torch.Tensor  # (n,) row of TRL's (2B, T - 1) per-token layout ...
    padded_cols: torch.Tensor  # (n,) ... and its column
    packed_rows: torch.Tensor  # (n,) the same position in the packed (B, W) layout
    packed_cols: torch.Tensor  # (n,)
    padded_shape: tuple[int, int]  # (2B, T - 1)


def _prompt_length(labels: torch.Tensor, length: int) -> int | None:
    """Index of the first scored token of a right-padded row, None when no token of the reply is scored."""
    scored = torch.nonzero(labels[:length] != -100)
    return int(scored[0]) if len(scored) else None


def shared_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                  pad_id: int, multiple_of: int | None = None) -> SharedLayout | None:
    """The packed layout of TRL's [chosen; rejected] batch, or None when a pair does not share its prompt."""
    if input_ids.shape[0] % 2 or attention_mask.ndim != 2:
        return None
    pairs = input_ids.shape[0] // 2
    # built on the CPU in one copy (on a GPU, per-pair checks on device tensors would each wait for it)
    cpu_ids, cpu_labels, cpu_mask = input_ids.cpu(), labels.cpu(), attention_mask.cpu()
    lengths = cpu_mask.sum(-1).tolist()
    segments = []  # per pair: (prompt length P, chosen row length, rejected row length)
    for i in range(pairs):
        chosen_len, rejected_len = lengths[i], lengths[pairs + i]
        right_padded = (cpu_mask[i, :chosen_len].sum() == chosen_len
                        and cpu_mask[pairs + i, :rejected_len].sum() == rejected_len)
        if not right_padded:
            return None
        prompt = _prompt_length(cpu_labels[i], chosen_len)
        if prompt is None or prompt == 0 or prompt != _prompt_length(cpu_labels[pairs + i], rejected_len):
            return None
        if not torch.equal(cpu_ids[i, :prompt], cpu_ids[pairs + i, :prompt]):
            return None
        segments.append((prompt, chosen_len, rejected_len))

    widths = [chosen + 1 + rejected - prompt for prompt, chosen, rejected in segments]
    width = -(-max(widths) // multiple_of) * multiple_of if multiple_of else max(widths)
    ids = torch.full((pairs, width), pad_id, dtype=input_ids.dtype)
    positions = torch.zeros((pairs, width), dtype=torch.long)
    segment = torch.full((pairs, width), 3, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, 3 padding
    shift_labels = torch.full((pairs, width), -100, dtype=labels.dtype)
    padded_rows, padded_cols, packed_rows, packed_cols = [], [], [], []
    for i, (prompt, chosen, rejected) in enumerate(segments):
        start = chosen  # where the rejected segment (the prompt's last token again) begins
        ids[i, :chosen] = cpu_ids[i, :chosen]
        ids[i, start] = cpu_ids[i, prompt - 1]
        ids[i, start + 1: start + 1 + rejected - prompt] = cpu_ids[pairs + i, prompt:rejected]
        positions[i, :chosen] = torch.arange(chosen)
        positions[i, start: start + 1 + rejected - prompt] = torch.arange(prompt - 1, rejected)
        segment[i, :prompt] = 0
        segment[i, prompt:chosen] = 1
        segment[i, start: start + 1 + rejected - prompt] = 2
        # TRL's position j of a row predicts token j + 1; the chosen ones keep their index, the rejected ones
        # from P - 1 on move to start + (j - (P - 1))
        chosen_cols = torch.arange(prompt - 1, chosen - 1)
        rejected_cols = torch.arange(prompt - 1, rejected - 1)
        moved_rejected = rejected_cols - (prompt - 1) + start
        for row, cols, moved in ((i, chosen_cols, chosen_cols), (pairs + i, rejected_cols, moved_rejected)):
            targets = cpu_labels[row, cols + 1]
            keep = targets != -100
            shift_labels[i, moved[keep]] = targets[keep]
            padded_rows.append(torch.full((int(keep.sum()),), row))
            padded_cols.append(cols[keep])
            packed_rows.append(torch.full((int(keep.sum()),), i))
            packed_cols.append(moved[keep])

    causal = torch.ones(width, width, dtype=torch.bool).tril()
    query, key = segment[:, :, None], segment[:, None, :]  # (B, W, 1), (B, 1, W)
    from_prompt = (key == 0) & ((query == 1) | (query == 2))
    # the rejected segment does not see the prompt's last token: its own copy of it stands in
    original_last = torch.zeros((pairs, width), dtype=torch.bool)
    original_last[torch.arange(pairs), torch.tensor([p - 1 for p, _, _ in segments])] = True
    from_prompt &= ~((query == 2) & original_last[:, None, :])
    allowed = causal & ((query == key) | from_prompt)

    device = input_ids.device
    return SharedLayout(
        input_ids=ids.to(device), position_ids=positions.to(device), allowed=allowed[:, None].to(device),
        shift_labels=shift_labels.to(device),
        padded_rows=torch.cat(padded_rows).to(device), padded_cols=torch.cat(padded_cols).to(device),
        packed_rows=torch.cat(packed_rows).to(device), packed_cols=torch.cat(packed_cols).to(device),
        padded_shape=(input_ids.shape[0], input_ids.shape[1] - 1),
    )


def attention_mask_for(allowed: torch.Tensor, implementation: str) -> torch.Tensor:
    """sdpa takes the boolean mask; eager attention adds it to the scores (0 or the most negative float)."""
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)


def can_share(config) -> bool:
    """Whether this model's attention takes a custom 4D mask (flash attention does not)."""
    return getattr(config, "_attn_implementation", None) in MASKED_ATTENTION


class SharedPromptForward:
    """Stands in for the model in TRL's `model(**inputs, labels=labels, fused_lm_head=True)` call."""

    def __init__(self, model, config, pad_id: int, multiple_of: int | None = None):
        self.model, self.config, self.pad_id, self.multiple_of = model, config, pad_id, multiple_of
        self.shared_batches = self.plain_batches = 0

    def _fits_window(self, width: int) -> bool:
        # a custom 4D mask replaces every layer's mask, sliding-window layers included
        window = getattr(self.config.get_text_config(), "sliding_window", None)
        return window is None or width <= window

    def __call__(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        layout = None
        if fused_lm_head and labels is not None and attention_mask is not None and "position_ids" not in kwargs:
            layout = shared_layout(input_ids, attention_mask, labels, self.pad_id, self.multiple_of)
        if layout is None or not self._fits_window(layout.input_ids.shape[1]):
            self.plain_batches += 1
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                              fused_lm_head=fused_lm_head, **kwargs)
        self.shared_batches += 1
        outputs = self.model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                             attention_mask=attention_mask_for(layout.allowed, self.config._attn_implementation),
                             shift_labels=layout.shift_labels, fused_lm_head=True, **kwargs)
        for name in PER_TOKEN_FIELDS:
            packed = getattr(outputs, name, None)
            if packed is None:
                continue
            padded = packed.new_zeros(layout.padded_shape)
            padded[layout.padded_rows, layout.padded_cols] = packed[layout.packed_rows, layout.packed_cols]
            setattr(outputs, name, padded)
        return outputs
