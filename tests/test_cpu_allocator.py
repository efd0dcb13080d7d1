"""Keeping freed memory (pipeline/cpu_allocator.py): with the setting, blocks up to 32 MiB freed together
(a step's activations and logits) stay in the process and the next round reuses their pages; glibc's default
gives them back and faults them in again; blocks over 32 MiB stay mapped either way; PIPELINE_KEEP_FREED_MEMORY=0
leaves glibc as it is.

The probe calls malloc and free directly: a training loop's own fault count depends on glibc's moving mmap
threshold and on which thread's arena served a block, so it varies 0-60,000 faults per 10 steps between runs of
the same loop (measured 2026-12-01, CPU family 26 with and without AVX-512) and cannot carry a test; the effect on
training is measured by the bench (python -m pipeline.bench --tasks pretrain). Each case runs in a fresh process:
mallopt changes the whole process for good."""

import ctypes
import os
import subprocess
import sys

import pytest

try:
    ctypes.CDLL("libc.so.6").mallopt
    GLIBC = True
except (OSError, AttributeError):
    GLIBC = False

# ten rounds of: malloc BLOCKS blocks of MIB MiB, write every page, free them all; print whether the setting took
# and the minor page faults of each round
PROBE = """
import ctypes, resource, sys
libc = ctypes.CDLL("libc.so.6")
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: with huge pages one fault maps 512 pages ("always" on some distros)
from pipeline.cpu_allocator import keep_freed_memory
kept = keep_freed_memory()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks, size = int(sys.argv[1]), int(sys.argv[2]) << 20
faults = []
for round in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    pointers = [libc.malloc(size) for _ in range(blocks)]
    for pointer in pointers:
        ctypes.memset(pointer, 1, size)
    for pointer in pointers:
        libc.free(pointer)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, *faults)
"""
PAGE = os.sysconf("SC_PAGE_SIZE")


def probe(keep: str, blocks: int, mib: int) -> tuple[bool, list[int]]:
    # without the environment's own malloc settings (MALLOC_TRIM_THRESHOLD_ and the like, GLIBC_TUNABLES)
    env = {name: value for name, value in os.environ.items() if not name.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env["PIPELINE_KEEP_FREED_MEMORY"] = keep
    command = [sys.executable, "-c", PROBE, str(blocks), str(mib)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", [int(count) for count in out[1:]]


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; other C libraries keep their own allocator")
def test_freed_blocks_are_reused_without_new_page_faults():
    pages = 3 * (8 << 20) // PAGE
    kept, faults_kept = probe("1", blocks=3, mib=8)
    default, faults_default = probe("0", blocks=3, mib=8)
    assert kept and not default
    # glibc's default trims the freed 24 MiB off the heap's top, so every round faults them in again (6,112 of
    # 6,144 pages measured: the top pad of 128 KiB stays); kept, only the first round does
    assert all(count > pages * 0.9 for count in faults_default), faults_default
    assert faults_kept[0] > pages * 0.9 and sum(faults_kept[1:]) < pages / 100, faults_kept


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; other C libraries keep their own allocator")
def test_blocks_over_32_mib_are_still_given_back():
    # a real vocabulary's logits: mapped and returned in every round, so they cannot fragment the heap
    pages = (40 << 20) // PAGE
    kept, faults = probe("1", blocks=1, mib=40)
    assert kept and all(count > pages * 0.9 for count in faults), faults
