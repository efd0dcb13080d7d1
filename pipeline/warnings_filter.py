"""Silence the library warnings that are known to be harmless here; every other warning still shows.

Each entry names why it is noise (see ../shared/env-notes.md, "Noise users will see").
"""

import logging
import warnings

KNOWN_NOISE = [
    # transformers renames gradient_checkpointing on every TRL config
    r".*gradient_checkpointing.*activation_checkpointing.*",
    # peft asks about is_gradient_checkpointing on models that never checkpoint
    r".*is_gradient_checkpointing.*",
    # TRL repeats this for every chat template whose prompt is a prefix of the full text
    r".*prompt.*prefix.*",
]


def quiet_known_noise() -> None:
    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    # bitsandbytes logs a missing optional `kernels` module at import
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
