"""How the platform picks the Kubernetes backend, and the gauges the KEDA scaler reads from its /metrics."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from functions.platform import Platform
from functions.settings import Settings
from tests.conftest import deploy, example, make_tenant, oip_body


def test_the_backend_setting_picks_knative_and_refuses_unknown_ones(tmp_path):
    async def build(backend: str) -> str:
        platform = Platform(Settings(backend=backend, data_dir=tmp_path / backend))
        try:
            return platform.backend.name
        finally:
            platform.store.close()

    assert asyncio.run(build("knative")) == "knative"
    assert asyncio.run(build("local")) == "local"
    with pytest.raises(ValueError, match="use local or knative"):
        asyncio.run(build("nomad"))


def test_in_flight_and_pending_gauges_are_exported_per_function(platform, models):
    acme = make_tenant(platform, "acme")
    deploy(acme, "classify", models["mlp"])
    assert acme.http.post(
        "/t/acme/v2/models/classify/infer", json=oip_body(example(models["mlp"])[0])
    ).is_success
    with platform.admin() as admin:
        families = {f.name: f for f in text_string_to_metric_families(admin.get("/metrics").text)}
    for name in ("paddlefn_in_flight_requests", "paddlefn_pending_requests"):
        samples = [
            s for s in families[name].samples if s.labels == {"tenant": "acme", "function": "classify"}
        ]
        assert [s.value for s in samples] == [0.0], name  # present, and back to 0 once answered
