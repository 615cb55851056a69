"""Paddle Lite: a fast-starting CPU engine for the platform and the engine of edge bundles.

Lite runs in its own interpreter (``.venv-lite``, CPython 3.7 + ``paddlelite==2.12``, built by
``runtime/lite/setup.sh``) because that is the only Lite build that handles conv models for x86 correctly
(DESIGN.md, "Facts checked"). This package is the modern side: it finds that interpreter, converts models
(``runtime.lite.convert``), talks to the engine host (``runtime.lite.engine``), and packs and serves edge
bundles (``runtime.lite.bundle``, ``runtime.lite.edge``). Nothing here imports Paddle or paddlelite.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

LITE_VERSION = "2.12"  # the Paddle Lite version setup.sh installs and conversions are checked with
ENV_PYTHON = "PADDLEFN_LITE_PYTHON"
REPO = Path(__file__).resolve().parents[2]
HOST = Path(__file__).resolve().parent / "host.py"


def lite_python() -> Path | None:
    """The Lite interpreter: ``$PADDLEFN_LITE_PYTHON``, else ``<repo>/.venv-lite/bin/python``; or None."""
    configured = os.environ.get(ENV_PYTHON)
    path = Path(configured) if configured else REPO / ".venv-lite" / "bin" / "python"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def lite_optimizer() -> Path | None:
    """``paddle_lite_opt`` beside the Lite interpreter (the wheel installs it there), or None."""
    python = lite_python()
    if python is None:
        return None
    opt = python.parent / "paddle_lite_opt"
    return opt if opt.is_file() else None


def unavailable_reason() -> str:
    """Why Lite cannot be used here, or '' when it can."""
    if lite_python() is None:
        where = os.environ.get(ENV_PYTHON) or str(REPO / ".venv-lite" / "bin" / "python")
        return f"no Paddle Lite interpreter at {where}: run runtime/lite/setup.sh (needs CPython 3.7)"
    if lite_optimizer() is None:
        return f"paddle_lite_opt is missing beside {lite_python()}: rerun runtime/lite/setup.sh"
    return ""


@functools.cache
def _version_of(python: str) -> str:
    result = subprocess.run([python, str(HOST), "--version"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{python} cannot report its Paddle Lite version: {result.stderr.strip()[-300:]}")
    return result.stdout.strip()


def installed_version() -> str | None:
    """The Paddle Lite version of the Lite interpreter (e.g. '2.12'), or None when there is none."""
    python = lite_python()
    return None if python is None else _version_of(str(python))
