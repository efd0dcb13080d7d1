"""A staged fine-tuning and alignment pipeline for causal language models."""

__version__ = "0.1.0"
