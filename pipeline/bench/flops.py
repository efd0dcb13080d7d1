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


def matmul_peak(dtype: torch.dtype, seconds: float = 1.0, sizes: tuple[int, ...] | None = None,
                device: str = "cpu") -> float:
    """Best FLOP/s of square matmuls, about `seconds` per size (CPU: with this process's thread count;
    CUDA: large enough to fill the GPU, timed between synchronisations)."""
    cuda = device.startswith("cuda")
    sizes = sizes or ((4096, 8192) if cuda else (512, 1024))
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        repeats = 10 if cuda else 1  # one CUDA launch is too short to time on its own
        torch.mm(a, b)  # warm-up
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                torch.mm(a, b)
            if cuda:
                torch.cuda.synchronize()
            best = max(best, repeats * 2 * size**3 / (time.perf_counter() - start))
    return best
