"""Benchmarks and self-checks: `fastnce-bench memory | gradcheck | gpu` (python -m fastnce.bench)."""
