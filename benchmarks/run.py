"""Entry point of ``python -m cancelk bench`` (run from a source checkout)."""

from __future__ import annotations

from benchmarks import wrapper_bench


def main(argv: list[str] | None = None) -> int:
    return wrapper_bench.main(argv)
