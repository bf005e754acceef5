"""cffi build script for the cancelk._cancelk_core extension (API mode, abi3)."""

from __future__ import annotations

import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ["backend.c", "proc.c", "fdtable.c", "tree.c", "loop.c", "loop_epoll.c", "loop_poll.c"]

HEADER = HERE / "cancelk.h"

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)
_DIRECTIVE = re.compile(r"#\s*(\w+)\s*(.*)")
_DEFINE = re.compile(r"(\w+)(?:\s+(.+))?")
_INTEGER = re.compile(r"-?[0-9]+")
# What a declarations-only header may hold besides integer constants: its
# include guard (#ifndef, a #define with no value, #endif) and #includes.
_SKIPPED = {"ifndef", "endif", "include"}


def cdef_from_header(text: str) -> str:
    """The cffi declarations for the public header's text.

    cancelk.h is the one place a C function or constant is declared; this
    drops its comments, include guard and #includes and keeps each
    ``#define NAME <integer>`` (``(-1)`` becomes ``-1``: cffi's cdef reads a
    bare integer only).  A preprocessor line it cannot pass on (#if, a macro
    with any other value) stops the build instead of being dropped quietly.
    """
    # A comment becomes the newlines it held, so each line keeps its number.
    code = _COMMENT.sub(lambda comment: "\n" * comment.group().count("\n"), text)
    kept = []
    for number, line in enumerate(code.splitlines(), 1):
        line = line.strip()
        directive = _DIRECTIVE.fullmatch(line)
        if not directive:
            if line:
                kept.append(line)
            continue
        keyword, rest = directive.groups()
        if keyword in _SKIPPED:
            continue
        define = _DEFINE.fullmatch(rest) if keyword == "define" else None
        if define is None:
            raise ValueError(f"{HEADER.name}:{number}: cffi cannot take {line!r}")
        name, value = define.groups()
        if value is None:
            continue  # the include guard
        value = value.strip()
        if value.startswith("(") and value.endswith(")"):
            value = value[1:-1].strip()
        if not _INTEGER.fullmatch(value):
            raise ValueError(
                f"{HEADER.name}:{number}: #define {name} {value}: only integer constants"
                " reach Python"
            )
        kept.append(f"#define {name} {value}")
    return "\n".join(kept) + "\n"


ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header(HEADER.read_text(encoding="utf-8")))
ffibuilder.set_source(
    "cancelk._cancelk_core",
    '#include "cancelk.h"',
    sources=[str(HERE / name) for name in SOURCES],
    include_dirs=[str(HERE)],
    extra_compile_args=["-std=gnu99", "-Wall", "-Wextra", "-O2"],
    py_limited_api=True,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
