"""Benchmarks (not tests): ``python -m bench.attention`` and friends."""
