"""Latency benchmarks of teacher vs dual encoder."""
