"""What `pipeline check` needs to know about a GGUF file, read from its header in well under a second.

gguf.GGUFReader would answer too, but it turns every vocabulary entry into a numpy array (8 s for
Gemma's 262,144 tokens), and a truncated file fails inside numpy with a reshape error. This reads
the header sequentially: the architecture, the chat template if any, the hyperparameters (what the
base stage's import completes transformers' config with: pipeline/gguf_hparams.py), the tensor names,
the values of the small rope factor tensors (Llama 3.1's rope_freqs, read back as its llama3 rope), and
whether the tensor data the header promises is all in the file.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.gguf_hparams import ROPE_FACTOR_TENSORS, require_readable_rope

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEPT_ARRAY = 4096  # numeric arrays up to this long are kept (a per-layer pattern); the vocabulary's are skipped


@dataclass
class GgufHeader:
    architecture: str
    chat_template: str | None
    tensors: int
    data_end: int  # the byte where the last tensor's data ends
    file_size: int
    fields: dict = field(default_factory=dict)  # every key: numbers, strings, short arrays (long ones None)
    tensor_names: frozenset = frozenset()
    rope_factors: dict = field(default_factory=dict)  # the float32 rope factor tensors' values (Llama 3.1's rope_freqs)


class _Cursor:
    def __init__(self, data, path: Path):
        self.data, self.at, self.path = data, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise PipelineError(f"{self.path}: truncated GGUF file (the header ends early at byte {self.at:,})")
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return value

    def string(self) -> str:
        length = self.take("<Q")
        if self.at + length > len(self.data):
            raise PipelineError(f"{self.path}: truncated GGUF file (the header ends early at byte {self.at:,})")
        text = bytes(self.data[self.at : self.at + length]).decode("utf-8", errors="replace")
        self.at += length
        return text

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.take("<I"), self.take("<Q")
            if item_kind in _SCALARS and count <= _KEPT_ARRAY:
                return [self.take(_SCALARS[item_kind]) for _ in range(count)]
            if item_kind in _SCALARS:  # skipped whole: a vocabulary's scores or types
                self.at += struct.calcsize(_SCALARS[item_kind]) * count
                return None
            for _ in range(count):
                self.value(item_kind)
            return None
        raise PipelineError(f"{self.path}: not a GGUF file we can read (unknown value type {kind} at byte {self.at:,})")


def read_gguf_header(path: str | Path) -> GgufHeader:
    """The header facts of a GGUF file; a one-line PipelineError for anything that is not a whole GGUF file."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise PipelineError(f"{path}: reading a GGUF file needs the gguf package (pip install gguf)") from None

    path = Path(path)
    with open(path, "rb") as handle:
        size = path.stat().st_size
        if size < 24:
            raise PipelineError(f"{path}: not a GGUF file ({size} bytes)")
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            if data[:4] != b"GGUF":
                raise PipelineError(f"{path}: not a GGUF file (it does not start with the bytes GGUF)")
            cursor = _Cursor(data, path)
            cursor.at = 4
            version, tensor_count, kv_count = cursor.take("<I"), cursor.take("<Q"), cursor.take("<Q")
            if version < 2:
                raise PipelineError(f"{path}: GGUF version {version} is too old (2 or later is readable)")
            fields = {}
            for _ in range(kv_count):
                key = cursor.string()
                value = cursor.value(cursor.take("<I"))
                fields[key] = value  # the vocabulary's long arrays are None
            ends, names, rope_tensors = [], set(), {}
            for _ in range(tensor_count):
                name = cursor.string()
                names.add(name)
                dims = [cursor.take("<Q") for _ in range(cursor.take("<I"))]
                kind, offset = cursor.take("<I"), cursor.take("<Q")
                if name in ROPE_FACTOR_TENSORS and kind == int(GGMLQuantizationType.F32) and len(dims) == 1:
                    rope_tensors[name] = (offset, dims[0])
                try:
                    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
                except (KeyError, ValueError):
                    raise PipelineError(f"{path}: tensor type {kind} is unknown to the installed gguf package") from None
                elements = 1
                for d in dims:
                    elements *= d
                ends.append(offset + elements // block * block_bytes)
            alignment = int(fields.get("general.alignment") or 32)
            data_start = -(-cursor.at // alignment) * alignment
            rope_factors = {}
            for name, (offset, count) in rope_tensors.items():
                if data_start + offset + 4 * count <= size:  # else the truncation error below says so
                    rope_factors[name] = list(struct.unpack_from(f"<{count}f", data, data_start + offset))
        finally:
            data.close()
    header = GgufHeader(str(fields.get("general.architecture", "")), fields.get("tokenizer.chat_template"),
                        tensor_count, data_start + max(ends, default=0), size, fields, frozenset(names), rope_factors)
    if header.data_end > size:
        raise PipelineError(f"{path}: truncated GGUF file ({size:,} bytes; its header promises {header.data_end:,}); "
                            f"download or assemble it again")
    return header


# GGUF architectures the installed transformers can dequantize into a torch model: a fixed list, so
# `check` needs no transformers import; tests/test_base_import.py pins it to transformers' own.
SUPPORTED_ARCHITECTURES = (
    "bloom", "deci", "falcon", "gemma2", "gemma3", "gemma4", "gpt2", "gpt_oss", "lfm2", "llama", "mamba",
    "minimax_m2", "mistral", "nemotron", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "stablelm",
    "starcoder2", "t5", "umt5",
)


def check_gguf(path: str | Path) -> GgufHeader:
    """read_gguf_header plus: transformers can load this architecture, and its rope as llama.cpp reads it."""
    header = read_gguf_header(path)
    known = SUPPORTED_ARCHITECTURES
    if header.architecture not in known:
        raise PipelineError(f"{path}: GGUF architecture `{header.architecture}` cannot be loaded by the installed "
                            f"transformers (it loads: {', '.join(known)})")
    require_readable_rope(header.architecture, header.fields, header.tensor_names, where=str(path),
                          rope_factors=header.rope_factors)
    return header
