"""``python -m cancelk demo | bench``."""

from __future__ import annotations

import argparse
import importlib
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cancelk")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="show timeouts, cancels and deaths, measured")
    bench = commands.add_parser("bench", help="run the benchmarks (from a source checkout)")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    if options.command == "demo":
        from cancelk.demo import run_demo

        return run_demo()
    return _bench(options.args)


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
