"""Benchmarks: each measures a claim against a baseline in the same run and writes JSON."""
