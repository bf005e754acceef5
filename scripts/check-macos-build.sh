#!/usr/bin/env bash
# Compile every csrc/*.c for macOS (x86_64 and arm64) and natively, with
# warnings as errors, and stop at the first file that does not compile.
#
# The macOS wheels are built on macOS runners only; this catches a Linux-only
# header or call outside its #ifdef __linux__ on a Linux machine, before it
# reaches them. The cross-compile uses zig's clang and the macOS headers that
# the ziglang package from PyPI ships (pip install ziglang); it compiles only,
# so no macOS SDK or linker is needed.
#
# Environment:
#   PYTHON  interpreter that has ziglang installed (default: python3)
#   CC      native compiler (default: gcc)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

python="${PYTHON:-python3}"
native_cc="${CC:-gcc}"
targets=(x86_64-macos aarch64-macos)
flags=(-std=gnu99 -Wall -Wextra -Werror -Icsrc)

out="$(mktemp -d "${TMPDIR:-/tmp}/cancelk-macos-build.XXXXXX")"
trap 'rm -rf "$out"' EXIT

fail() {
    echo "check-macos-build: $*" >&2
    exit 1
}

sources=(csrc/*.c)
[ -e "${sources[0]}" ] || fail "no csrc/*.c under $repo"
"$python" -m ziglang version >/dev/null 2>&1 ||
    fail "'$python -m ziglang' does not run: install it with '$python -m pip install ziglang'"
command -v "$native_cc" >/dev/null || fail "no native compiler '$native_cc' (set CC)"

# compile LABEL COMPILER...: compile each source; the first failure ends the run.
compile() {
    local label="$1" src
    shift
    for src in "${sources[@]}"; do
        if ! "$@" "${flags[@]}" -c "$src" -o "$out/$(basename "$src" .c).o"; then
            fail "FAILED: $src does not compile for $label (warnings are errors; output above)"
        fi
        echo "ok  $label  $src"
    done
}

for target in "${targets[@]}"; do
    compile "$target" "$python" -m ziglang cc -target "$target"
done
compile "native ($native_cc)" "$native_cc"
echo "check-macos-build: all ${#sources[@]} files compile for ${targets[*]} and natively"
