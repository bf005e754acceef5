"""Entry point of ``python -m cancelk bench`` (run from a source checkout).

    python -m cancelk bench -- [--quick | --full] [--figures P1,P3,...]
                               [--start-method fork|forkserver|spawn] [--workers N]
                               [--json FILE] [--plot FILE.png]
    python -m benchmarks.run [same options]

Figures: P1-P5, P7-P9 (figures.py: cancelk beside the stdlib pool, Pebble,
loky and Deadpool; P3 and P4 with the kernel's floor under them), P6
(wrapper_bench.py: killable_wrapper inside a stdlib pool, with its own P3
variant), L (limits.py: memory limits, queued deadlines; cancelk only) and D
(dask_bench.py: per-task cost and cancel on Dask, when Dask is installed).
Default: all, about 5 minutes on a 2-core machine; --quick about a minute;
--full adds 10^6 jobs to P8.

This module is the entry point: it measures (figures.py, wrapper_bench.py),
then prints the reports (report.py, wrapper_report.py).  Nothing imports it.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import sys
from collections.abc import Sequence
from typing import Any

try:
    from benchmarks import figures, limits, quiet, report, stats, wrapper_bench, wrapper_report
except ImportError:  # run as a script: the benchmarks directory itself is on sys.path
    import figures  # type: ignore[no-redef]
    import limits  # type: ignore[no-redef]
    import quiet  # type: ignore[no-redef]
    import report  # type: ignore[no-redef]
    import stats  # type: ignore[no-redef]
    import wrapper_bench  # type: ignore[no-redef]
    import wrapper_report  # type: ignore[no-redef]

ALL_FIGURES = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "L", "D")


def _figures(text: str) -> list[str]:
    names = [name.strip().upper() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALL_FIGURES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown figure(s) {', '.join(unknown)}; choose from {','.join(ALL_FIGURES)}"
        )
    return [name for name in ALL_FIGURES if name in names]


def _output_file(text: str) -> str:
    """A file to write at the end: not a directory, in a directory we can make."""
    if not text or text.endswith(("/", os.sep)) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory: name a file")
    parent = os.path.dirname(os.path.abspath(text))
    while not os.path.exists(parent):  # the nearest existing ancestor decides
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {parent!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {parent!r} is not writable")
    return text


def _made_parent(path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cancelk bench",
        description="cancelk benchmarks (design section 5) beside the stdlib pool and peers",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer samples: under a minute")
    size.add_argument("--full", action="store_true", help="also 10^6 jobs in P8")
    parser.add_argument(
        "--figures",
        type=_figures,
        default=list(ALL_FIGURES),
        metavar="P1,P2,...",
        help=f"which figures (default all: {','.join(ALL_FIGURES)})",
    )
    parser.add_argument(
        "--start-method",
        default="fork",
        choices=multiprocessing.get_all_start_methods(),
        help="start method of every pool (P7 always uses spawn; default fork)",
    )
    parser.add_argument("--workers", type=int, default=2, help="workers for P1, P2, P8 (default 2)")
    parser.add_argument(
        "--json", metavar="FILE", type=_output_file, help="also write the results as JSON"
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        type=_output_file,
        help="also draw the distributions there, PNG unless the name ends in another "
        "format matplotlib writes (needs matplotlib)",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _loose(capture: quiet.Capture, what: str) -> None:
    """Errors the libraries wrote outside any library's row (P6 has no rows)."""
    for note in capture.loose:
        _say(f"{what}: {note}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `python -m cancelk bench -- --quick`
        argv = argv[1:]
    args = _parse(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'cancelk[bench]')",
            file=sys.stderr,
        )
        return 2
    result: dict[str, Any] = {}
    executor_figures = [name for name in args.figures if name not in ("P6", "L", "D")]
    if executor_figures:
        with quiet.Capture() as capture:
            result["executor"] = figures.run(
                figures=executor_figures,
                quick=args.quick,
                full=args.full,
                start_method=args.start_method,
                workers=args.workers,
                progress=capture.say,
                capture=capture,
            )
        _loose(capture, "written while measuring")
        print(report.format_report(result["executor"]), flush=True)
    if "P6" in args.figures:
        _say("P6 killable_wrapper benchmark ...")
        with quiet.Capture() as capture:
            result["wrapper"] = wrapper_bench.run(
                quick=args.quick,
                repeat=5 if args.quick else None,  # keeps --quick under a minute
                start_method=args.start_method,
                progress=capture.say,
            )
        _loose(capture, "written while measuring P6")
        if executor_figures:
            print()
        print(wrapper_report.format_report(result["wrapper"]), flush=True)
    if "L" in args.figures:
        from cancelk import _core

        if _core.tree_rss([os.getpid()]) is None:
            _say("L (limits) needs Linux's /proc: skipped")
        else:
            with quiet.Capture() as capture:
                result["limits"] = limits.run(quick=args.quick, progress=capture.say)
            _loose(capture, "written while measuring L")
            print()
            print(limits.format_report(result["limits"]), flush=True)
    if "D" in args.figures:
        if importlib.util.find_spec("distributed") is None:
            _say("D (Dask) needs dask[distributed]: pip install 'cancelk[dask]'; skipped")
        else:
            from benchmarks import dask_bench

            with quiet.Capture() as capture:
                result["dask"] = dask_bench.run(
                    quick=args.quick, workers=args.workers, progress=capture.say
                )
            _loose(capture, "written while measuring D")
            print()
            print(dask_bench.format_report(result["dask"]), flush=True)
    if args.json:
        stats.dump_json(_made_parent(args.json), result)
        _say(f"results written to {args.json}")
    if args.plot:
        try:
            from benchmarks import plot
        except ImportError:
            import plot  # type: ignore[no-redef]

        kind = plot.draw(result, _made_parent(args.plot))
        _say(f"plot ({kind}) written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
