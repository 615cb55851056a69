"""KEDA's side of the conversation: a real gRPC client over a real socket against the scaler service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from scaler.activity import Sample
from scaler.proto import externalscaler_pb2 as pb
from scaler.proto import externalscaler_pb2_grpc as pb_grpc
from tests.cluster.conftest import FakeSource, ScalerThread, wait_until
from tests.conftest import free_port

FN = ("acme", "classify")
METADATA = {"scalerAddress": "ignored", "tenant": "acme", "function": "classify", "target": "4"}


def ref(**metadata: str) -> pb.ScaledObjectRef:
    return pb.ScaledObjectRef(name="classify", namespace="t-acme", scalerMetadata=metadata or METADATA)


@pytest.fixture
def scaler(scaler_factory: Callable[..., ScalerThread]) -> tuple[ScalerThread, FakeSource]:
    source = FakeSource()
    return scaler_factory(source, activity_window_s=60.0), source


@pytest.fixture
def stub(scaler: tuple[ScalerThread, FakeSource]) -> Iterator[pb_grpc.ExternalScalerStub]:
    with grpc.insecure_channel(scaler[0].grpc_target) as channel:
        yield pb_grpc.ExternalScalerStub(channel)


def test_is_active_follows_traffic_seen_by_the_metric_source(
    scaler: tuple[ScalerThread, FakeSource], stub: pb_grpc.ExternalScalerStub
) -> None:
    _, source = scaler
    assert stub.IsActive(ref()).result is False
    source.samples[FN] = Sample(in_flight=6, recent=3)
    wait_until(lambda: stub.IsActive(ref()).result, 5, "IsActive after traffic")
    # KEDA strips its "s0-" prefix before asking (external_scaler.go: RemoveIndexFromMetricName).
    metrics = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(), metricName="paddlefn-concurrency"))
    assert [(v.metricName, v.metricValue, v.metricValueFloat) for v in metrics.metricValues] == [
        ("paddlefn-concurrency", 6, 6.0)
    ]


def test_metric_spec_carries_the_functions_target_concurrency(stub: pb_grpc.ExternalScalerStub) -> None:
    spec = stub.GetMetricSpec(ref()).metricSpecs
    assert [(s.metricName, s.targetSize, s.targetSizeFloat) for s in spec] == [
        ("paddlefn-concurrency", 4, 4.0)
    ]


def test_a_ref_without_tenant_and_function_is_an_invalid_argument(stub: pb_grpc.ExternalScalerStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.IsActive(ref(scalerAddress="x"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'tenant'" in caught.value.details()


def test_a_wake_signal_reaches_stream_is_active_at_once(
    scaler: tuple[ScalerThread, FakeSource], stub: pb_grpc.ExternalScalerStub
) -> None:
    service, _ = scaler
    stream = stub.StreamIsActive(ref())
    received: list[tuple[bool, float]] = []

    def read() -> None:
        try:
            for answer in stream:
                received.append((answer.result, time.perf_counter()))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.CANCELLED

    reader = threading.Thread(target=read)
    reader.start()
    try:
        wait_until(lambda: len(received) == 1, 5, "the stream's first answer")
        assert received[0][0] is False
        with httpx.Client(base_url=service.http_url) as http:
            sent = time.perf_counter()
            answer = http.post("/v1/wake/acme/classify")
        assert answer.status_code == 202, answer.text
        wait_until(lambda: len(received) == 2, 2, "the stream to report the wake", every=0.001)
        active, at = received[1]
        assert active is True
        assert at - sent < 0.5  # no tick or polling interval in between (measured in bench/, ~1 ms)
        assert stub.IsActive(ref()).result is True
    finally:
        stream.cancel()
        reader.join(5)


def test_the_wake_endpoint_checks_its_token_and_the_names(
    scaler_factory: Callable[..., ScalerThread],
) -> None:
    service = scaler_factory(FakeSource(), wake_token="s3cret")
    with httpx.Client(base_url=service.http_url) as http:
        assert http.post("/v1/wake/acme/classify").status_code == 401
        bearer = {"authorization": "Bearer s3cret"}
        assert http.post("/v1/wake/Acme/classify", headers=bearer).status_code == 400
        assert http.post("/v1/wake/acme%0A/classify", headers=bearer).status_code == 400  # "$" let it by
        assert http.post("/v1/wake/acme/classify%0A", headers=bearer).status_code == 400
        assert http.post("/v1/wake/acme/classify", headers=bearer).status_code == 202
        assert http.get("/healthz").json() == {"status": "ok"}


def test_a_failing_metric_source_does_not_stop_the_scaler(
    scaler_factory: Callable[..., ScalerThread],
) -> None:
    class Broken(FakeSource):
        def fetch(self):  # type: ignore[no-untyped-def]
            self.fetches += 1
            raise ConnectionError("prometheus is down")

    source = Broken()
    service = scaler_factory(source)
    wait_until(lambda: source.fetches >= 3, 5, "ticks to go on after failures")
    with grpc.insecure_channel(service.grpc_target) as channel:
        assert pb_grpc.ExternalScalerStub(channel).IsActive(ref()).result is False


def test_python_m_scaler_serves_keda_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "PADDLEFN_SCALER_GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
        "PADDLEFN_SCALER_HTTP_HOST": "127.0.0.1",
        "PADDLEFN_SCALER_HTTP_PORT": str(http_port),
        "PADDLEFN_SCALER_PROMETHEUS_URL": f"http://127.0.0.1:{free_port()}",  # nobody there: ticks fail, logged
        "PADDLEFN_SCALER_TICK_S": "0.2",
    }
    log = tmp_path / "scaler.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "scaler"], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:

        def healthy() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, 30, "python -m scaler to listen")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            assert pb_grpc.ExternalScalerStub(channel).IsActive(ref()).result is False
        assert httpx.post(f"http://127.0.0.1:{http_port}/v1/wake/acme/classify").status_code == 202
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            assert pb_grpc.ExternalScalerStub(channel).IsActive(ref()).result is True
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, log.read_text()
    assert "scaler tick failed" in log.read_text()  # an unreachable Prometheus is logged, not fatal


def test_methods_of_newer_keda_that_we_leave_out_are_unimplemented(
    scaler: tuple[ScalerThread, FakeSource],
) -> None:
    # KEDA >= 2.17 tries StreamMetricSpec and falls back to GetMetricSpec on UNIMPLEMENTED.
    with grpc.insecure_channel(scaler[0].grpc_target) as channel:
        call = channel.unary_stream(
            "/externalscaler.ExternalScaler/StreamMetricSpec",
            request_serializer=pb.ScaledObjectRef.SerializeToString,
            response_deserializer=pb.GetMetricSpecResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(call(ref()))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
