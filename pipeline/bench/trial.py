"""One trial in a fresh process: `python -m pipeline.bench.trial WORKDIR TASK CONTENDER N OUT.json`.

A process per trial makes peak memory that contender's own (ru_maxrss is a high-water mark)
and keeps one contender's caches and allocator state away from the next.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv: list[str]) -> None:
    workdir, task, contender, trial, out = Path(argv[0]), argv[1], argv[2], int(argv[3]), Path(argv[4])
    import torch
    import trl  # noqa: F401  every contender pays for the same imports before the baseline
    from peft import PeftModel  # noqa: F401

    from pipeline.bench.contenders import CONTENDERS
    from pipeline.warnings_filter import quiet_known_noise

    quiet_known_noise()
    torch.set_num_threads(os.cpu_count() or 1)
    start_rss = rss_mb()
    result = CONTENDERS[task][contender](workdir, trial)
    result.update(
        task=task, contender=contender, trial=trial,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        start_rss_mb=start_rss,
        threads=torch.get_num_threads(),
    )
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
