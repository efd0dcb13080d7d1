"""Data readers and the built-in data generator."""
