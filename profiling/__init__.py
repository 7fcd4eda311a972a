"""Per-stage measurement (time, memory, SM activity) and the benchmark report."""
