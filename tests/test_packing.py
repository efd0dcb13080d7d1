"""Packing: documents in one block must not see each other (position ids reset, cache off)."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.packing import document_positions, pack


def test_positions_restart_at_each_document_and_block():
    blocks = pack([[5, 6, 7], [8, 9], [10, 11, 12, 13]], seq_len=6, bos_id=0, eos_id=1)
    # stream: 0 5 6 7 1 | 0 8 9 1 0 10 11 12 13 1 -> blocks of 6 (the 3-token tail is dropped)
    assert blocks.input_ids.tolist() == [[0, 5, 6, 7, 1, 0], [8, 9, 1, 0, 10, 11]]
    assert blocks.position_ids.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 1, 2]]
    # a prediction never crosses a document start
    assert blocks.target_mask().tolist() == [[True, True, True, True, False], [True, True, False, True, True]]


def test_document_positions_vectorised():
    ids = torch.tensor([[3, 0, 4, 4, 0, 5]])
    assert document_positions(ids, bos_id=0).tolist() == [[0, 0, 1, 2, 0, 1]]


@pytest.mark.parametrize("architecture", ["llama", "gemma2"])
def test_packed_logits_equal_separate_logits(architecture):
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

    common = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if architecture == "llama":
        config, attn = LlamaConfig(**common), "sdpa"
    else:
        config, attn = Gemma2Config(head_dim=8, **common), "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    docs = [[0, 5, 6, 7, 8, 1], [0, 9, 10, 1], [0, 11, 12, 13, 14, 15, 1]]
    packed = torch.tensor([sum(docs, [])])
    positions = document_positions(packed, bos_id=0)
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0]
        apart = torch.cat([model(input_ids=torch.tensor([d]), use_cache=False).logits[0] for d in docs])
    assert torch.allclose(together, apart, atol=1e-5), (together - apart).abs().max()


def test_packed_loss_counts_only_in_document_targets():
    """summed_loss over a packed block = each document's own next-token loss, summed: no target across a
    document start, none after the block's last token."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pipeline.logprobs import summed_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    blocks = pack([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15, 16, 17, 18]], seq_len=8, bos_id=0, eos_id=1)
    with torch.no_grad():
        loss, count = summed_loss(model, blocks, [0, 1], None)
        expected, n = 0.0, 0
        for row in range(2):
            ids, pos = blocks.input_ids[row].tolist(), blocks.position_ids[row].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
            for a, b in zip(starts, starts[1:]):  # each document piece alone
                if b - a < 2:
                    continue
                logits = model(input_ids=torch.tensor([ids[a:b]]), use_cache=False).logits[0]
                expected += F.cross_entropy(logits[:-1], torch.tensor(ids[a + 1:b]), reduction="sum").item()
                n += b - a - 1
    assert count == n == int(blocks.target_mask()[[0, 1]].sum())
    assert torch.equal(blocks.target_mask([1, 0]), blocks.target_mask()[[1, 0]])
    assert abs(loss.item() - expected) < 1e-4 * expected, (loss.item(), expected)
