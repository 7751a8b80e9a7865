"""Benchmarks: measured figures, never asserted by tests. Run with ``./dev bench``."""
