"""Model FLOPs per token and this machine's measured matmul peak, for MFU."""

from __future__ import annotations

import time

import torch


def training_flops_per_token(config, seq_len: int) -> float:
    """Forward + backward FLOPs per token of a decoder (PaLM appendix B): 6 N + 12 L d T.

    N counts the weights that do matmuls (every layer and the output head; the input embedding
    is a lookup); 12 L d T is attention's score and value matmuls over a T-token context.
    """
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * config.intermediate_size  # q, o, k, v, gate/up/down
    matmul_weights = layers * per_layer + d * config.vocab_size  # + output head
    return 6 * matmul_weights + 12 * layers * d * seq_len


def matmul_peak(dtype: torch.dtype, seconds: float = 1.0, sizes: tuple[int, ...] = (512, 1024)) -> float:
    """Best FLOP/s of square matmuls, about `seconds` per size, with this process's thread count."""
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)  # warm-up
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best
