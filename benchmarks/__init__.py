"""Benchmarks for cancelk (design section P); each module runs as a script or is importable."""
