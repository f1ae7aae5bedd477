"""Benchmarks: backends (per-stage latency in this process), node (end to end through localizer_node), machine."""
