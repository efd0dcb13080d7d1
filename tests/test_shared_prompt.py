"""pipeline/shared_prompt.py: one row per pair with the prompt computed once gives TRL's per-token results for
[chosen; rejected] rows (log-probs, entropy, mean logits, top-1, and the gradients), on every attention that takes
the mask; pairs that do not share their prompt fall back to TRL's rows."""

from __future__ import annotations

import pytest
import torch

PAD = 0
FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1")


def _model(kind: str, attention: str):
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, attn_implementation=attention))
    elif kind == "gemma2":  # soft-capped attention and logits, query pre-scaling: a different attention path
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, sliding_window=64, attn_implementation=attention))
    else:  # the real base's family: sliding-window and global layers, two rope bases
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=8, sliding_window=64,
                                                   attn_implementation=attention))
    add_fused_lm_head(model, outputs=FIELDS)
    return model


def _trl_batch(pairs):
    """TRL's collator layout: prompt + chosen rows, then prompt + rejected rows, right-padded to a multiple of 8."""
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    scored = [[0] * len(p) + [1] * len(c) for p, c, _ in pairs] + [[0] * len(p) + [1] * len(r) for p, _, r in pairs]
    width = -(-max(map(len, rows)) // 8) * 8
    ids = torch.full((len(rows), width), PAD)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, mask) in enumerate(zip(rows, scored)):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        labels[i, : len(row)] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(row), -100)
    return ids, attention, labels


def _run(call, model, ids, attention, labels):
    model.zero_grad(set_to_none=True)
    out = call(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True, use_cache=False)
    chosen, rejected = out.log_probs.sum(-1).chunk(2)
    (-(torch.nn.functional.logsigmoid(chosen - rejected)).sum() + 0.1 * out.entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {f: getattr(out, f).detach() for f in FIELDS}, grads


def _pairs(seed: int, count: int = 4):
    g = torch.Generator().manual_seed(seed)

    def tokens(low, high):
        return torch.randint(1, 97, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    return [(tokens(1, 9), tokens(1, 7), tokens(1, 14)) for _ in range(count)]


@pytest.mark.parametrize("kind,attention", [("llama", "sdpa"), ("llama", "eager"), ("gemma2", "eager"),
                                              ("gemma3", "sdpa"), ("gemma3", "eager")])
def test_shared_prompt_rows_give_trls_per_token_results_and_gradients(kind, attention):
    from pipeline.shared_prompt import SharedPromptForward

    model = _model(kind, attention)
    pairs = _pairs(1) + [([5], [6], [7, 8])]  # a one-token prompt: the copy is the whole rejected context
    ids, mask, labels = _trl_batch(pairs)
    padded, padded_grads = _run(model, model, ids, mask, labels)
    shared_call = SharedPromptForward(model, model.config, PAD)
    shared, shared_grads = _run(shared_call, model, ids, mask, labels)

    assert shared_call.shared_batches == 1 and shared_call.plain_batches == 0
    for field in FIELDS:
        assert shared[field].shape == padded[field].shape == (ids.shape[0], ids.shape[1] - 1)
    assert torch.equal(shared["is_top1"], padded["is_top1"])
    for field in ("log_probs", "entropy", "mean_logits"):
        assert torch.allclose(shared[field], padded[field], atol=1e-5), field
    assert (shared["log_probs"][labels[:, 1:] == -100] == 0).all()  # TRL sums rows without a mask
    assert padded_grads.keys() == shared_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        assert torch.allclose(grad, shared_grads[name], atol=1e-5), name


def test_the_packed_row_holds_each_prompt_once():
    from pipeline.shared_prompt import shared_layout

    prompt, chosen, rejected = [11, 12, 13], [21, 22], [31, 32, 33, 34]
    ids, mask, labels = _trl_batch([(prompt, chosen, rejected)])
    layout = shared_layout(ids, mask, labels, PAD, multiple_of=1)
    assert layout.input_ids.tolist() == [[11, 12, 13, 21, 22, 13, 31, 32, 33, 34]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5, 6]]
    # the position of each token is predicted from: 21 from 13 (index 2), 31 from the copy of 13 (index 5)
    assert layout.shift_labels.tolist() == [[-100, -100, 21, 22, -100, 31, 32, 33, 34, -100]]
    allowed = layout.allowed[0, 0]
    assert allowed[5].tolist() == [True, True, False, False, False, True] + [False] * 4  # the copy: prompt[:-1], itself
    assert allowed[3].tolist() == [True] * 4 + [False] * 6  # chosen: the prompt and itself
    assert not allowed[6:, 2:5].any()  # rejected never sees the original last prompt token nor the chosen reply


def test_pairs_that_do_not_share_their_prompt_use_trls_rows():
    from pipeline.shared_prompt import SharedPromptForward, shared_layout

    ids, mask, labels = _trl_batch([([1, 2, 3], [4], [5, 6]), ([7, 8], [9], [10])])
    ids[3, 0] = 50  # the second pair's rejected row has another prompt
    assert shared_layout(ids, mask, labels, PAD) is None
    model = _model("llama", "sdpa")
    call = SharedPromptForward(model, model.config, PAD)
    out = call(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
    assert out.log_probs.shape == (4, ids.shape[1] - 1) and call.plain_batches == 1 and call.shared_batches == 0
    # a row wider than a sliding window would lose the window under a custom mask: TRL's rows instead
    gemma = _model("gemma2", "eager")
    gemma.config.sliding_window = 4
    call = SharedPromptForward(gemma, gemma.config, PAD)
    call(**dict(zip(("input_ids", "attention_mask", "labels"), _trl_batch(_pairs(2)))), fused_lm_head=True)
    assert call.plain_batches == 1
