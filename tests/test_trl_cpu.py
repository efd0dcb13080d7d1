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


def _chunked(hidden, weight, targets, chunk, entropy_weight):
    from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS, ChunkedLogProbFunction

    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    logprobs, entropy, log_sum_sq, mean_logits, is_top1 = ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, chunk, None, 1.0, OPTIONAL_OUTPUTS)
    loss = -logprobs.sum() + (entropy_weight * entropy.sum() if entropy_weight else 0)
    loss.backward()
    return [logprobs, entropy, log_sum_sq, mean_logits, is_top1.float(), hidden.grad, weight.grad]


def test_lean_tile_folds_give_what_trls_folds_give(monkeypatch):
    """Every output (log-prob, entropy, sum of squared probabilities, mean logit, top-1) and both gradients,
    fp32 and bf16 autocast, over tiles cut so that targets sit at tile edges, and ties for the top-1 rule."""
    import trl.kernels.chunked_logprob as kernels

    from pipeline.trl_cpu import fold_tiles_leanly_on_cpu

    original = (getattr(kernels._forward_tile, "__wrapped__", kernels._forward_tile),
                getattr(kernels._backward_tile, "__wrapped__", kernels._backward_tile))
    monkeypatch.setattr(kernels, "_forward_tile", original[0])
    monkeypatch.setattr(kernels, "_backward_tile", original[1])
    torch.manual_seed(0)
    vocab, chunk = 37, 8  # tiles of 8, 8, 8, 8, 5 columns
    hidden, weight = torch.randn(11, 16), torch.randn(vocab, 16)
    weight[5] = weight[3]  # two equal logits: target 5 ties with an earlier token, so it is not top-1
    hidden[7], hidden[8] = 3 * weight[3], 3 * weight[3]  # rows whose largest logits are tokens 3 and 5, tied
    targets = torch.tensor([0, 7, 8, 15, 16, 36, 32, 5, 3, 20, 31])
    targets[[0, 4, 9]] = (hidden @ weight.T)[[0, 4, 9]].argmax(-1)  # top-1 targets in three other rows
    for autocast in (False, True):
        for entropy_weight in (0.0, 0.3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                theirs = _chunked(hidden, weight, targets, chunk, entropy_weight)
                assert fold_tiles_leanly_on_cpu() and fold_tiles_leanly_on_cpu()  # idempotent
                assert kernels._forward_tile.__wrapped__ is original[0]
                ours = _chunked(hidden, weight, targets, chunk, entropy_weight)
                monkeypatch.setattr(kernels, "_forward_tile", original[0])
                monkeypatch.setattr(kernels, "_backward_tile", original[1])
            for name, a, b in zip(("logprobs", "entropy", "log_sum_sq", "mean", "top1", "d hidden", "d weight"),
                                  theirs, ours):
                assert torch.allclose(a, b, atol=2e-5, rtol=1e-5), (name, autocast, entropy_weight, a, b)
            assert theirs[4][7] == 0 and theirs[4][8] == 1 and theirs[4][[0, 4, 9]].all()  # ties: the first counts


def test_lean_folds_hand_a_softcap_to_trls_own(monkeypatch):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    import pipeline.trl_cpu as trl_cpu

    trl_cpu.fold_tiles_leanly_on_cpu()
    lean_calls = []
    monkeypatch.setattr(trl_cpu, "_lean_forward_tile", lambda *a, **k: lean_calls.append(k))
    hidden, weight, targets = torch.randn(4, 8), torch.randn(20, 8), torch.tensor([1, 2, 3, 4])
    logprobs = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 8, 30.0, 1.0, ("entropy",))[0]
    assert not lean_calls  # TRL's own fold handled the softcap
    expected = (30.0 * torch.tanh(hidden @ weight.T / 30.0)).log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    assert torch.allclose(logprobs, expected, atol=1e-5)
    ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 8, None, 1.0, ("entropy",))
    assert lean_calls  # and the plain case comes to the lean fold


def test_token_tiles_capped_on_the_cpu_give_the_same_results(monkeypatch):
    """Tiles of fewer tokens than a batch holds (several token chunks) give the per-token outputs of one tile bit
    for bit and the same gradients; the cap is installed once, on a machine without a GPU only."""
    import trl.kernels.chunked_logprob as kernels

    import pipeline.trl_cpu as trl_cpu

    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(23, 16), torch.randn(37, 16), torch.randint(0, 37, (23,))
    trl_cpu.fold_tiles_leanly_on_cpu()
    monkeypatch.setattr(kernels, "TOKEN_CHUNK_SIZE", 4096)
    whole = _chunked(hidden, weight, targets, 8, 0.3)
    monkeypatch.setattr(kernels, "TOKEN_CHUNK_SIZE", 5)  # tiles of 5, 5, 5, 5 and 3 tokens
    tiled = _chunked(hidden, weight, targets, 8, 0.3)
    for name, a, b in zip(("logprobs", "entropy", "log_sum_sq", "mean", "top1"), whole[:5], tiled[:5]):
        assert torch.equal(a, b), name
    for name, a, b in zip(("d hidden", "d weight"), whole[5:], tiled[5:]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), name  # the weight's gradient sums tiles in another order

    monkeypatch.setattr(kernels, "TOKEN_CHUNK_SIZE", 4096)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trl_cpu.smaller_token_tiles_on_cpu() and trl_cpu.smaller_token_tiles_on_cpu()  # idempotent
    assert kernels.TOKEN_CHUNK_SIZE == trl_cpu.CPU_TOKEN_TILE
    monkeypatch.setattr(kernels, "TOKEN_CHUNK_SIZE", 4096)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not trl_cpu.smaller_token_tiles_on_cpu() and kernels.TOKEN_CHUNK_SIZE == 4096  # a GPU keeps TRL's tiles
