"""Sleep and wake end to end through a real Prometheus: gateway metrics -> scrape -> one PromQL query -> KEDA.

The endpoint serves ``functions.metrics.Metrics`` (the gateway's own metric names and labels); Prometheus
scrapes it every 200 ms; the scaler queries Prometheus every 100 ms with its one aggregated query; the test
talks to the scaler as KEDA does, over gRPC. Timeouts are seconds here instead of 15 minutes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import pytest

from scaler.prometheus import PrometheusSource
from scaler.proto import externalscaler_pb2 as pb
from scaler.proto import externalscaler_pb2_grpc as pb_grpc
from tests.cluster.conftest import MetricsEndpoint, PrometheusProcess, ScalerThread, wait_until
from tests.conftest import ADMIN_KEY, PlatformProcess, deploy, example, make_tenant, oip_body

IDLE_TIMEOUT_S = 2.0


def ref(function: str) -> pb.ScaledObjectRef:
    metadata = {"tenant": "acme", "function": function, "target": "2", "idleTimeout": str(IDLE_TIMEOUT_S)}
    return pb.ScaledObjectRef(name=function, namespace="t-acme", scalerMetadata=metadata)


def test_the_aggregated_query_reads_every_function_from_a_real_prometheus(
    metrics_endpoint: MetricsEndpoint, prometheus_factory: Callable[..., PrometheusProcess]
) -> None:
    m = metrics_endpoint.metrics
    for tenant, fn, code in (
        ("acme", "a", "200"),
        ("acme", "a", "503"),
        ("beta", "b", "200"),
        ("beta", "c", "200"),
    ):
        m.requests.labels(tenant, fn, code)  # series exist (at 0) before any traffic, as after a first scrape
    prom = prometheus_factory(
        [{"job_name": "gateway", "static_configs": [{"targets": [metrics_endpoint.target]}]}]
    )
    source = PrometheusSource(prom.url, selector='job="gateway"', window_s=2.0)
    try:
        up = 'up{job="gateway"} == 1'
        wait_until(lambda: bool(source._client.custom_query(up)), 10, "Prometheus' first scrape")
        assert source.fetch() == {}  # nothing going on: nothing in the answer
        m.in_flight.labels("acme", "a").set(3)
        m.pending.labels("acme", "a").set(1)
        m.requests.labels("acme", "a", "200").inc(5)
        m.requests.labels("acme", "a", "503").inc(2)
        m.requests.labels("beta", "b", "200").inc(1)
        wait_until(lambda: len(source.fetch()) == 2, 10, "both busy functions in Prometheus' answer")
        samples = source.fetch()
    finally:
        source.close()
    assert samples[("acme", "a")].in_flight == 3
    assert samples[("acme", "a")].pending == 1
    assert samples[("acme", "a")].recent > 0  # summed over status codes (increase() extrapolates)
    assert samples[("beta", "b")].recent > 0
    assert ("beta", "c") not in samples  # idle: not in the answer


def test_traffic_wakes_idle_sleeps_and_a_wake_signal_is_reported_at_once(
    metrics_endpoint: MetricsEndpoint,
    prometheus_factory: Callable[..., PrometheusProcess],
    scaler_factory: Callable[..., ScalerThread],
) -> None:
    prom = prometheus_factory(
        [{"job_name": "gateway", "static_configs": [{"targets": [metrics_endpoint.target]}]}]
    )
    scaler = scaler_factory(PrometheusSource(prom.url, window_s=1.0), activity_window_s=1.0, tick_s=0.1)
    m = metrics_endpoint.metrics
    with grpc.insecure_channel(scaler.grpc_target) as channel:
        keda = pb_grpc.ExternalScalerStub(channel)
        assert keda.IsActive(ref("classify")).result is False

        # traffic -> active, and the HPA metric follows the concurrency
        m.in_flight.labels("acme", "classify").set(4)
        m.requests.labels("acme", "classify", "200").inc()
        wait_until(lambda: keda.IsActive(ref("classify")).result, 10, "traffic to make the function active")
        values = keda.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref("classify"))).metricValues
        assert values[0].metricValueFloat == 4.0

        # idle for the idle timeout -> inactive (not before)
        m.in_flight.labels("acme", "classify").set(0)
        idle_since = time.monotonic()
        wait_until(lambda: not keda.IsActive(ref("classify")).result, 15, "the idle function to go inactive")
        assert time.monotonic() - idle_since >= IDLE_TIMEOUT_S - 0.5  # scrape lag may count towards idle

        # a wake signal -> active over StreamIsActive at once, before Prometheus has seen anything
        stream = keda.StreamIsActive(ref("classify"))
        answers: list[bool] = []
        reader = threading.Thread(target=lambda: _read(stream, answers))
        reader.start()
        try:
            wait_until(lambda: answers == [False], 5, "the stream's first answer")
            with httpx.Client(base_url=scaler.http_url) as http:
                sent = time.perf_counter()
                assert http.post("/v1/wake/acme/classify").status_code == 202
                took = wait_until(lambda: answers == [False, True], 2, "the wake on the stream", every=0.001)
            assert time.perf_counter() - sent < 0.5 and took < 0.5
        finally:
            stream.cancel()
            reader.join(5)


def _read(stream: object, answers: list[bool]) -> None:
    try:
        for answer in stream:  # type: ignore[attr-defined]
            answers.append(answer.result)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.CANCELLED


@pytest.mark.slow
def test_a_real_gateways_requests_reach_keda_through_prometheus(
    platform_factory: Callable[..., PlatformProcess],
    models: dict[str, Path],
    prometheus_factory: Callable[..., PrometheusProcess],
    scaler_factory: Callable[..., ScalerThread],
) -> None:
    """The same path with `paddlefn up` itself: its /metrics (admin key as Bearer) scraped by Prometheus."""
    platform = platform_factory("--idle-timeout", "60s", "--pool-size", "1")
    tenant = make_tenant(platform, "acme")
    assert deploy(tenant, "mlp", models["mlp"])["status"] == "ready"
    job = {
        "job_name": "gateway",
        "authorization": {"type": "Bearer", "credentials": ADMIN_KEY},
        "static_configs": [{"targets": [f"127.0.0.1:{platform.port}"]}],
    }
    prom = prometheus_factory([job])
    source = PrometheusSource(prom.url, selector='job="gateway"', window_s=1.0)
    scaler = scaler_factory(source, activity_window_s=1.0)
    with grpc.insecure_channel(scaler.grpc_target) as channel:
        keda = pb_grpc.ExternalScalerStub(channel)
        inputs, _ = example(models["mlp"])
        # A new series starts at 1, which increase() cannot tell from an old one: the first request makes it,
        # the next one counts (a sleeping function is woken by the gateway's wake signal, not by this).
        assert tenant.http.post("/t/acme/v2/models/mlp/infer", json=oip_body(inputs)).status_code == 200
        series = 'paddlefn_requests_total{job="gateway", tenant="acme", function="mlp"}'
        wait_until(
            lambda: bool(source._client.custom_query(series)), 15, "the gateway's series in Prometheus"
        )
        wait_until(lambda: not keda.IsActive(ref("mlp")).result, 15, "the function to be idle")
        assert tenant.http.post("/t/acme/v2/models/mlp/infer", json=oip_body(inputs)).status_code == 200
        wait_until(lambda: keda.IsActive(ref("mlp")).result, 15, "the request to make the function active")
        wait_until(lambda: not keda.IsActive(ref("mlp")).result, 15, "the idle timeout to make it inactive")
