"""What can be checked of the Dockerfiles without a container engine: their bases, that every path they copy
exists in the repository (and passes their .dockerignore), and that they run as a numeric non-root user."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "runtime" / "docker"
FILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_there_are_the_three_images() -> None:
    assert [p.name for p in FILES] == ["Dockerfile.gpu", "Dockerfile.lite", "Dockerfile.platform"]


def test_the_gpu_image_is_based_on_paddles_official_gpu_image() -> None:
    args = dict(
        arg.split("=", 1) for op, arg in instructions(DOCKER / "Dockerfile.gpu") if op == "ARG" and "=" in arg
    )
    assert args["PADDLE_IMAGE"].startswith("paddlepaddle/paddle:") and "-gpu-" in args["PADDLE_IMAGE"]
    assert ("FROM", "${PADDLE_IMAGE}") in instructions(DOCKER / "Dockerfile.gpu")


@pytest.mark.parametrize("dockerfile", FILES, ids=[p.name for p in FILES])
def test_copied_paths_exist_and_pass_the_ignore_file(dockerfile: Path) -> None:
    ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for op, arg in instructions(dockerfile):
        if op != "COPY" or arg.startswith("--from"):
            continue
        *sources, _ = arg.split()
        for source in sources:
            assert (ROOT / source).exists(), (
                f"{dockerfile.name} copies {source}, which is not in the repository"
            )
            assert source.rstrip("/") in allowed, f"{dockerfile.name}'s .dockerignore leaves out {source}"


@pytest.mark.parametrize("dockerfile", FILES, ids=[p.name for p in FILES])
def test_images_run_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    users = [arg for op, arg in instructions(dockerfile) if op == "USER"]
    assert users and users[-1].isdigit() and users[-1] != "0"
