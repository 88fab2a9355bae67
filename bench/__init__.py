"""Benchmarks: each prints its table and writes JSON (see docs/results/README.md)."""
