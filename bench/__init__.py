"""Runnable benchmarks: each prints one table and writes bench/results/<name>.json."""
