"""pipeline/lean_lora.py: the fused LoRA forward gives peft's outputs and gradients, and leaves every other
case to peft."""

import pytest
import torch

from pipeline.lean_lora import add_lora_updates_in_one_gemm_on_cpu


def _model(seed: int = 0, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the update something to add
            torch.nn.init.normal_(p, std=0.2)
    return model


def _run(model, ids, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach().float(), grads


@pytest.fixture
def peft_forward():
    """Runs a test against peft's own forward first, then with the lean one installed; restores peft's after."""
    from peft.tuners.lora.layer import Linear

    original = getattr(Linear.forward, "__wrapped__", Linear.forward)
    Linear.forward = original
    yield original
    Linear.forward = original


@pytest.mark.parametrize("autocast", [False, True])
def test_lean_forward_gives_peft_outputs_and_gradients(peft_forward, autocast):
    from peft.tuners.lora.layer import Linear

    torch.manual_seed(0)  # the same ids whatever ran before
    ids = torch.randint(0, 64, (3, 11))
    model = _model()
    theirs = _run(model, ids, autocast)
    assert add_lora_updates_in_one_gemm_on_cpu() and add_lora_updates_in_one_gemm_on_cpu()  # idempotent
    assert Linear.forward.__wrapped__ is peft_forward
    ours = _run(model, ids, autocast)
    tol = dict(atol=3e-2, rtol=3e-2) if autocast else dict(atol=1e-5, rtol=1e-4)
    assert torch.allclose(theirs[0], ours[0], **tol)
    assert theirs[1].keys() == ours[1].keys() and any("lora_A" in n for n in ours[1])
    for name in theirs[1]:
        assert torch.allclose(theirs[1][name], ours[1][name], **tol), name


def test_the_other_cases_stay_with_peft(peft_forward, monkeypatch):
    """Disabled adapters (a dpo reference pass), merged weights and DoRA run peft's forward exactly."""
    import pipeline.lean_lora as lean

    ids = torch.randint(0, 64, (2, 7))
    add_lora_updates_in_one_gemm_on_cpu()
    lean_calls = []
    monkeypatch.setattr(lean, "lean_forward", lambda layer, x, adapters: lean_calls.append(1) or peft_forward(layer, x))

    model = _model()
    with torch.no_grad():
        model(input_ids=ids)
        assert lean_calls  # the plain case takes the lean path
        lean_calls.clear()
        with model.disable_adapter():
            model(input_ids=ids)
        dora = _model(use_dora=True)
        dora(input_ids=ids)
        model.merge_adapter()
        model(input_ids=ids)
    assert not lean_calls
