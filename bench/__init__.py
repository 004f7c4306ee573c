"""Benchmark of meterproxy against the direct path, nginx and a bare pass-through (issue #6)."""
