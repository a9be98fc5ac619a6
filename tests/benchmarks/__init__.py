"""Tests of the benchmarks under benchmarks/ (run as subprocesses with tiny settings)."""
