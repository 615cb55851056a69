"""The local backend's side of ``Backend.prepare``: runtime.prepare in its own process on this machine."""

from __future__ import annotations

import asyncio
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from functions.backends.local import LocalBackend
from functions.deploy import DeployFailed
from functions.registry import FunctionConfig, FunctionRecord
from functions.settings import Settings
from runtime.spec import Manifest


def prepare(backend: LocalBackend, fn: FunctionRecord, on_stage=lambda stage: None) -> Manifest:  # type: ignore[no-untyped-def]
    async def run() -> Manifest:
        try:
            return await backend.prepare(fn, device="cpu", batching=False, on_stage=on_stage)
        finally:
            await backend.close()  # the worker template it forked the preparation from goes too

    return asyncio.run(run())


def uploaded(data_dir: Path, model: Path) -> FunctionRecord:
    artifact_dir = data_dir / "tenants" / "acme" / "functions" / "classify" / "v1"
    shutil.copytree(model, artifact_dir / "model")
    now = datetime.now(UTC)
    return FunctionRecord(
        1, "acme", "classify", "deploying", FunctionConfig(), "v1", artifact_dir, None, None, now, now
    )


def test_the_local_backend_prepares_the_uploaded_model_into_its_serving_folder(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    fn = uploaded(tmp_path, models["mlp"])
    stages: list[str] = []
    backend = LocalBackend(Settings(data_dir=tmp_path))
    manifest = prepare(backend, fn, stages.append)
    assert manifest == Manifest.load(fn.serving_dir)
    assert stages[:3] == ["loading", "optimising", "golden check"]


def test_a_model_the_local_backend_cannot_prepare_fails_with_the_reason(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    fn = uploaded(tmp_path, models["mlp"])
    (fn.artifact_dir / "model" / "model.pdmodel").write_bytes(b"this is not a Paddle program")
    backend = LocalBackend(Settings(data_dir=tmp_path))
    with pytest.raises(DeployFailed, match=r"model\.pdmodel is not a Paddle program"):
        prepare(backend, fn)
