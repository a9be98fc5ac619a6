"""Benchmarks: `python -m benchmarks.<name> [options] --json FILE` (see ../shared/BENCHMARKS.md)."""
