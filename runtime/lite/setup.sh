#!/usr/bin/env bash
# Build the Paddle Lite environment (.venv-lite) beside the platform's own .venv, idempotently.
#
# Why a second interpreter: paddlelite==2.12 is the only Paddle Lite wheel that converts and runs conv models
# for x86 correctly, and it exists only for CPython 3.7 (see DESIGN.md, "Facts checked"). numpy stays <2 there:
# numpy 2 makes Lite's Tensor.from_numpy copy garbage without an error.
#
# Usage (from anywhere): runtime/lite/setup.sh
#   PADDLEFN_LITE_BASE_PYTHON=/path/to/python3.7  use this interpreter instead of searching for one
#   PADDLEFN_LITE_REQUIRED=1                      fail (exit 1) instead of going on without Lite
# Exit 0 when .venv-lite is ready, or when Lite cannot be had here (the platform then runs without it and
# says so); the reason is printed either way.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO/.venv-lite"
LITE_VERSION="2.12"
STAMP="$VENV/.paddlefn-lite-$LITE_VERSION"

unavailable() {
    echo "paddle lite: unavailable: $1 (the platform runs without Lite)" >&2
    if [ "${PADDLEFN_LITE_REQUIRED:-0}" = 1 ]; then exit 1; fi
    exit 0
}

# Already built and proven: nothing to do (the stamp is written only after the import check below).
if [ -f "$STAMP" ] && [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/paddle_lite_opt" ]; then
    echo "paddle lite: $VENV ready (paddlelite $LITE_VERSION)"
    exit 0
fi

find_python37() {
    if [ -n "${PADDLEFN_LITE_BASE_PYTHON:-}" ]; then echo "$PADDLEFN_LITE_BASE_PYTHON"; return; fi
    local root
    root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
    for candidate in "$root"/versions/3.7*/bin/python /root/.pyenv/versions/3.7*/bin/python "$(command -v python3.7 || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then echo "$candidate"; return; fi
    done
}

BASE="$(find_python37)"
[ -n "$BASE" ] || unavailable "no CPython 3.7 interpreter found (paddlelite $LITE_VERSION is a cp37 wheel; try 'pyenv install 3.7')"
case "$("$BASE" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" in
    3.7) ;;
    *) unavailable "$BASE is not CPython 3.7" ;;
esac

echo "paddle lite: building $VENV from $BASE"
rm -rf "$VENV"
if ! "$BASE" -m venv "$VENV" \
    || ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "paddlelite==$LITE_VERSION" "numpy<2"; then
    rm -rf "$VENV"
    unavailable "installing paddlelite==$LITE_VERSION into a CPython 3.7 venv failed (see pip's output above)"
fi
if ! "$VENV/bin/python" -c "import numpy, paddlelite.lite; assert numpy.__version__ < '2'"; then
    rm -rf "$VENV"
    unavailable "paddlelite $LITE_VERSION was installed but does not import"
fi
touch "$STAMP"
echo "paddle lite: $VENV ready (paddlelite $LITE_VERSION)"
