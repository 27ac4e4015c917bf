"""Benchmarks: each writes JSON and appends its table to bench/RESULTS.md."""
