"""Benchmarks' shared parts: timing, the transformers baselines, the Spec-Bench evaluation."""
