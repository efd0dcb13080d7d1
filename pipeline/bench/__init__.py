"""Benchmarks: our stages against TRL defaults and plain PyTorch loops (python -m pipeline.bench)."""
