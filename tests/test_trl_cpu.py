"""pipeline/trl_cpu.py: TRL's fused LM head scoring only labelled positions on the CPU gives what it gives when
it scores every position (log-probs, entropy, loss and gradients), and the switch is installed once."""

from __future__ import annotations

import torch


def _fused_outputs(model, ids, labels, attention):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    (out.loss + out.entropy.sum() * 0.1).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.log_probs.detach(), out.entropy.detach(), out.loss.detach(), grads


def test_labelled_positions_only_gives_the_same_outputs_and_gradients(monkeypatch):
    import trl.trainer.utils as trl_utils
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from pipeline.trl_cpu import score_only_labelled_positions_on_cpu

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, 300, (3, 12))
    attention = torch.ones_like(ids)
    attention[2, 8:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[2, 8:] = -100

    original = getattr(trl_utils._use_triton, "__wrapped__", trl_utils._use_triton)  # a stage may have installed it
    monkeypatch.setattr(trl_utils, "_use_triton", original)  # as TRL ships it; restored after the test
    assert original(torch.device("cpu")) is False  # every position scored on the CPU
    every = _fused_outputs(model, ids, labels, attention)
    assert score_only_labelled_positions_on_cpu() and score_only_labelled_positions_on_cpu()  # idempotent
    assert trl_utils._use_triton(torch.device("cpu")) is True
    assert trl_utils._use_triton.__wrapped__ is original  # wrapped once, not twice
    labelled = _fused_outputs(model, ids, labels, attention)

    for before, after in zip(every[:3], labelled[:3]):
        assert torch.allclose(before, after, atol=1e-6), (before, after)
    assert every[0][labels[:, 1:] == -100].abs().max() == 0  # unlabelled positions are 0 on both paths
    assert every[3].keys() == labelled[3].keys() and every[3]
    for name, grad in every[3].items():
        assert torch.allclose(grad, labelled[3][name], atol=1e-6), name
