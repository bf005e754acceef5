"""``python -m cancelk demo | bench``."""

from __future__ import annotations

import argparse
import importlib
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        # Everything after "bench" belongs to the benchmark's own parser.
        return _bench([arg for arg in argv[1:] if arg != "--"])
    parser = argparse.ArgumentParser(prog="python -m cancelk")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="show timeouts, cancels and deaths, measured")
    commands.add_parser("bench", help="run the benchmarks from a source checkout")
    parser.parse_args(argv)
    from cancelk.demo import run_demo

    return run_demo()


def _bench(args: list[str]) -> int:
    try:
        # Imported by name: benchmarks/ is not part of the installed package.
        bench = importlib.import_module("benchmarks.run")
    except ImportError:
        print(
            "The benchmarks live in the source tree: run `python -m cancelk bench` "
            "from a checkout of cancelk (its benchmarks/ folder must be importable).",
            file=sys.stderr,
        )
        return 2
    result: int = bench.main(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
