"""The benchmark: the full path against the ceilings it is held to (see BENCHMARKS.md)."""
