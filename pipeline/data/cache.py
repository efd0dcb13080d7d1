"""Tokenized training rows built once per run: the main process builds and saves them, the
other processes (and a resumed run) load what it saved."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from pipeline.artifacts import replace_dir


def cached_rows(accelerator, folder: Path, key: str, build: Callable[[], tuple[list[dict], dict]]):
    """(datasets.Dataset of rows, metadata dict), from `folder` when it holds `key`, else from build().

    The cache lives in the stage's folder, which the runner empties whenever the stage's config,
    data or upstream change; `key` also covers what the folder cannot see (the tokenizer).
    """
    from datasets import Dataset, load_from_disk

    meta_file = folder / "meta.json"

    def saved() -> dict | None:
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        return meta["meta"] if meta.get("key") == key else None

    with accelerator.main_process_first():
        meta = saved()
        if meta is None:
            rows, meta = build()
            if accelerator.is_main_process:
                tmp = folder.with_name(folder.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                Dataset.from_list(rows).save_to_disk(str(tmp))
                (tmp / "meta.json").write_text(json.dumps({"key": key, "meta": meta}))
                replace_dir(tmp, folder)
            else:  # only the main process writes; this one keeps its rows in memory
                return Dataset.from_list(rows), meta
    # Every process reads the same files, so a later .map() (TRL's precomputed reference
    # log-probs) finds its cache file at the same path on every rank.
    return load_from_disk(str(folder)), meta


def tokenizer_key(tokenizer) -> str:
    """What about a tokenizer decides its ids: its name, size, special tokens and chat template."""
    import hashlib

    parts = [str(tokenizer.name_or_path), str(len(tokenizer)), str(tokenizer.all_special_tokens),
             str(getattr(tokenizer, "chat_template", ""))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
