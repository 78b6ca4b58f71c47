"""Benchmarks: one script per figure in docs/BENCHMARKS.md (`make bench` runs them all)."""
