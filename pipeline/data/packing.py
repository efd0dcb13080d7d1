"""Pack tokenized documents into fixed-length blocks whose documents do not see each other.

Each document becomes [bos] + ids + [eos]; the stream is cut into blocks of `seq_len`.
Position ids restart at 0 wherever a document starts (and at every block start), which is
how transformers builds a block-diagonal causal mask for packed rows. That mask is only
built when the KV cache is off, so every forward over packed blocks passes use_cache=False.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class PackedBlocks:
    input_ids: torch.Tensor  # (N, T) int64
    position_ids: torch.Tensor  # (N, T) int64, 0 at each document (or block) start

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def target_mask(self, rows=None) -> torch.Tensor:
        """(N, T-1) bool: which next-token predictions count (never across a document start); of `rows` only
        when given (a training step asks for its own rows, not a mask of the whole corpus)."""
        position_ids = self.position_ids if rows is None else self.position_ids[rows]
        return position_ids[:, 1:] != 0


def tokenize_documents(texts: list[str], tokenizer, batch_size: int = 1000) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        # split_special_tokens: a "<|bos|>" typed in the corpus is text, not a control token.
        out.extend(tokenizer(batch, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    return out


def pack(documents: list[list[int]], seq_len: int, bos_id: int, eos_id: int) -> PackedBlocks:
    stream: list[int] = []
    for ids in documents:
        stream.extend([bos_id, *ids, eos_id])
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise ValueError(f"only {len(stream)} tokens: not enough for one block of {seq_len}")
    ids = torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    return PackedBlocks(ids, document_positions(ids, bos_id))


def document_positions(ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """(N, T) positions counting from 0 at each block start and at every BOS.

    A document cut at a block boundary goes on in the next block from position 0:
    the model cannot see the previous block anyway.
    """
    is_start = ids == bos_id
    is_start[:, 0] = True
    index = torch.arange(ids.shape[1]).expand_as(ids)
    last_start = torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - last_start


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def load_or_pack(cache_dir: Path, key: str, build) -> PackedBlocks:
    """Packed blocks from the cache, or built and cached (call under main_process_first)."""
    path = cache_dir / f"blocks-{key}.pt"
    if path.is_file():
        data = torch.load(path, weights_only=True)
        return PackedBlocks(data["input_ids"], data["position_ids"])
    blocks = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"input_ids": blocks.input_ids, "position_ids": blocks.position_ids}, tmp)
    tmp.replace(path)
    return blocks
