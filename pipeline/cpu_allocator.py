"""Keep freed memory in the process for training on the CPU (glibc's allocator settings).

Every training step frees and allocates again the same large tensors (logits, activations,
gradients). glibc serves blocks above its mmap threshold (128 KiB, rising to at most 32 MiB as
large blocks are freed) with fresh pages from the kernel and returns them on free, so each step
pays a page fault and the kernel's zeroing for every 4 KiB again: 10,500-12,000 minor faults per
step of the bench's pretraining (3.8M parameters, 8 x 256 tokens, bf16) on a 2-core EPYC, 8% of
the step (152-173 -> 142-144 ms, an A/B in one process, 2026-12-01). With blocks up to 32 MiB taken from
the heap and its free memory kept, 0.5-27 faults per step remain, at the same peak RSS (670-686 MB). Only the
allocator changes, so every number computed is bit for bit the same. jemalloc or tcmalloc under
LD_PRELOAD do this too but are a system dependency; mallopt is in every glibc, so it is set here.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
# blocks up to 32 MiB (the ceiling of glibc's own moving threshold, which every version accepts) come from the
# heap; larger ones (a real vocabulary's logits) are still mapped and returned, so they cannot fragment the heap
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30  # give the heap's free top back only beyond 1 GiB
OPT_OUT = "PIPELINE_KEEP_FREED_MEMORY"  # =0 leaves glibc's defaults


def keep_freed_memory() -> bool:
    """Serve blocks up to 32 MiB from the heap and keep its free memory; False where not glibc or opted out."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator is left as it is
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
