"""Kernel microbenchmarks (pytest-benchmark); the harness and the work formulas are in ``conftest.py``."""
