"""Setting up Paddle Lite: runtime/lite/setup.sh is idempotent and goes on without Lite where it cannot be had;
the platform finds the Lite interpreter through PADDLEFN_LITE_PYTHON."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from runtime.lite import lite_python, unavailable_reason
from tests.lite_support import REPO, needs_lite

SETUP = REPO / "runtime" / "lite" / "setup.sh"


def run_setup(script: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script)], capture_output=True, text=True, env={**os.environ, **env}, timeout=600
    )


def copy_of_setup(tmp_path: Path) -> Path:
    """setup.sh builds <its repo>/.venv-lite: run a copy in a scratch tree so the real one is untouched."""
    target = tmp_path / "runtime" / "lite" / "setup.sh"
    target.parent.mkdir(parents=True)
    shutil.copy2(SETUP, target)
    return target


def test_without_a_python_3_7_setup_goes_on_without_lite_and_says_why(tmp_path):
    script = copy_of_setup(tmp_path)
    result = run_setup(
        script, PADDLEFN_LITE_BASE_PYTHON=sys.executable
    )  # 3.11: not what paddlelite 2.12 needs
    assert result.returncode == 0
    assert "unavailable" in result.stderr and "is not CPython 3.7" in result.stderr
    assert not (tmp_path / ".venv-lite").exists()
    required = run_setup(script, PADDLEFN_LITE_BASE_PYTHON=sys.executable, PADDLEFN_LITE_REQUIRED="1")
    assert required.returncode == 1


@needs_lite
def test_setup_is_idempotent_when_lite_is_ready():
    result = run_setup(SETUP)
    assert result.returncode == 0 and "ready (paddlelite 2.12)" in result.stdout
    assert "building" not in result.stdout + result.stderr


def test_the_lite_interpreter_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PADDLEFN_LITE_PYTHON", str(tmp_path / "missing" / "python"))
    assert lite_python() is None
    assert "no Paddle Lite interpreter at" in unavailable_reason() and "setup.sh" in unavailable_reason()
    monkeypatch.setenv("PADDLEFN_LITE_PYTHON", sys.executable)
    assert lite_python() == Path(sys.executable)
