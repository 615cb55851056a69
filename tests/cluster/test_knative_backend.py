"""The knative backend through the official kubernetes client, against the stand-in API server
(``tests/cluster/apiserver.py``: a real HTTP server that validates every body strictly; not Kubernetes)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from functions.backends.base import Outgoing
from functions.backends.knative import KnativeBackend, PermanentClusterError, TemporaryClusterError
from functions.cluster.config import ClusterConfig
from functions.errors import GatewayTimeout
from functions.registry import FunctionConfig, FunctionRecord
from functions.settings import Settings
from tests.cluster.apiserver import StandInApiServer
from tests.cluster.conftest import FakeSource, ScalerThread, wait_until


@pytest.fixture
def apiserver() -> Iterator[StandInApiServer]:
    server = StandInApiServer().start()
    yield server
    server.stop()


def record(name: str = "classify", **config: Any) -> FunctionRecord:
    now = datetime.now(UTC)
    return FunctionRecord(
        1, "acme", name, "ready", FunctionConfig(**config), "v1", Path("/nowhere"), None, None, now, now
    )


def backend_for(apiserver: StandInApiServer, **config: Any) -> KnativeBackend:
    def api_client() -> client.ApiClient:
        configuration = client.Configuration(host=apiserver.url)
        return client.ApiClient(configuration)

    return KnativeBackend(Settings(), ClusterConfig(**config), api_client_factory=api_client)


def run(backend: KnativeBackend, *steps: Callable[[KnativeBackend], Any]) -> list[Any]:
    async def scenario() -> list[Any]:
        await backend.start()
        try:
            return [await step(backend) for step in steps]
        finally:
            await backend.close()

    return asyncio.run(scenario())


def test_deploying_a_function_creates_the_tenant_namespace_then_its_knative_service(
    apiserver: StandInApiServer,
) -> None:
    run(backend_for(apiserver), lambda b: b.deployed(record()))
    assert apiserver.kinds() == [
        ("LimitRange", "t-acme", "paddlefn-defaults"),
        ("Namespace", "", "t-acme"),
        ("NetworkPolicy", "t-acme", "paddlefn-isolation"),
        ("NetworkPolicy", "t-acme", "paddlefn-prepare"),
        ("PersistentVolumeClaim", "t-acme", "models"),
        ("ResourceQuota", "t-acme", "paddlefn-quota"),
        ("Service", "t-acme", "classify"),
        ("ServiceAccount", "t-acme", "paddlefn-function"),
    ]
    assert apiserver.requests[0] == (
        "PATCH",
        "/api/v1/namespaces/t-acme",
    )  # the namespace before its contents
    assert ("PATCH", "/apis/serving.knative.dev/v1/namespaces/t-acme/services/classify") in apiserver.requests


def test_reconfiguring_updates_the_same_objects_in_place(apiserver: StandInApiServer) -> None:
    run(
        backend_for(apiserver),
        lambda b: b.deployed(record(max_scale=2)),
        lambda b: b.reconfigured(record(max_scale=9)),
    )
    service = apiserver.get("serving.knative.dev/v1", "Service", "t-acme", "classify")
    assert service["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"] == "9"
    assert len(apiserver.kinds()) == 8


def test_removing_a_function_deletes_its_objects_and_keeps_the_tenant(apiserver: StandInApiServer) -> None:
    run(
        backend_for(apiserver, mode="deployment"),
        lambda b: b.deployed(record()),
        lambda b: b.removed(record()),
    )
    kinds = {kind for kind, _, _ in apiserver.kinds()}
    assert "Deployment" not in kinds and "ScaledObject" not in kinds and "Namespace" in kinds
    assert ("DELETE", "/apis/keda.sh/v1alpha1/namespaces/t-acme/scaledobjects/classify") in apiserver.requests


def test_removing_twice_is_harmless_and_removing_a_tenant_takes_its_namespace(
    apiserver: StandInApiServer,
) -> None:
    run(
        backend_for(apiserver),
        lambda b: b.deployed(record()),
        lambda b: b.removed(record()),
        lambda b: b.removed(record()),
        lambda b: b.remove_tenant("acme"),
    )
    assert apiserver.kinds() == []


def test_api_errors_carry_their_retry_meaning(apiserver: StandInApiServer) -> None:
    apiserver.fail_next = [503]
    with pytest.raises(TemporaryClusterError, match="503"):
        run(backend_for(apiserver), lambda b: b.deployed(record()))
    apiserver.fail_next = [403]
    with pytest.raises(PermanentClusterError, match="403"):
        run(backend_for(apiserver), lambda b: b.deployed(record()))


def test_an_object_the_schemas_reject_is_a_permanent_error(apiserver: StandInApiServer) -> None:
    # "eight gigs" is no Kubernetes quantity: the stand-in answers 422 as the real server would.
    backend = backend_for(apiserver, gpu_memory="eight gigs")
    with pytest.raises(PermanentClusterError, match="422"):
        run(backend, lambda b: b.deployed(record()))


class _Replica(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b'{"outputs": []}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("x-paddlefn-device", "gpu")
        self.send_header("x-paddlefn-compute-ms", "1.5")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def outgoing(cold_start_timeout_s: float = 5.0) -> Outgoing:
    return Outgoing(
        "/v2/models/classify/infer", b"{}", {"content-type": "application/json"}, cold_start_timeout_s, 5.0
    )


def test_a_request_to_a_sleeping_function_signals_the_scaler_and_waits_for_a_replica(
    apiserver: StandInApiServer, scaler_factory: Callable[..., ScalerThread]
) -> None:
    scaler = scaler_factory(FakeSource())
    replica = ThreadingHTTPServer(("127.0.0.1", 0), _Replica)
    port = replica.server_port
    replica.server_close()  # the port is known but nothing listens yet: the function is asleep
    backend = backend_for(
        apiserver,
        function_url=f"http://127.0.0.1:{port}/{{namespace}}/{{service}}",
        scaler_wake_url=scaler.http_url,
    )
    woken: list[str] = []
    backend.on_wake(lambda fn: woken.append(fn.label))
    serving: list[ThreadingHTTPServer] = []

    def wake_replica_once_the_scaler_says_active() -> None:
        wait_until(lambda: scaler.service.board.is_active(("acme", "classify")), 5, "the wake signal")
        server = ThreadingHTTPServer(("127.0.0.1", port), _Replica)
        serving.append(server)
        server.serve_forever(poll_interval=0.05)

    thread = threading.Thread(target=wake_replica_once_the_scaler_says_active)
    thread.start()
    try:
        [forwarded] = run(backend, lambda b: b.forward(record(), outgoing()))
    finally:
        wait_until(lambda: bool(serving), 5, "the replica to start")
        serving[0].shutdown()
        serving[0].server_close()
        thread.join(5)
    assert forwarded.status == 200 and forwarded.device == "gpu" and forwarded.compute_ms == 1.5
    assert forwarded.cold_start_s is not None and woken == ["acme/classify"]


def test_a_function_that_does_not_wake_in_time_is_a_504(
    apiserver: StandInApiServer, scaler_factory: Callable[..., ScalerThread]
) -> None:
    scaler = scaler_factory(FakeSource())
    backend = backend_for(
        apiserver, function_url="http://127.0.0.1:9/{service}", scaler_wake_url=scaler.http_url
    )
    with pytest.raises(GatewayTimeout, match=r"cold-start timeout of 0\.3 s"):
        run(backend, lambda b: b.forward(record(), outgoing(cold_start_timeout_s=0.3)))
    assert scaler.service.board.is_active(("acme", "classify"))


class _ReplicaAndScaler(_Replica):
    """One server for both: a replica that answers and a scaler's wake endpoint that counts."""

    wakes: list[str] = []

    def do_POST(self) -> None:
        if self.path.startswith("/v1/wake/"):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            type(self).wakes.append(self.path)
            self.send_response(202)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        super().do_POST()


def test_a_function_that_may_be_asleep_is_woken_before_the_request_and_one_that_just_answered_is_not(
    apiserver: StandInApiServer,
) -> None:
    _ReplicaAndScaler.wakes = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ReplicaAndScaler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    backend = backend_for(apiserver, function_url=url + "/{namespace}/{service}", scaler_wake_url=url)
    fn = record(idle_timeout_s=1.5)  # long enough that a loaded CI machine does the second request in time

    async def later(b: KnativeBackend) -> Any:
        await asyncio.sleep(1.6)  # past the idle timeout: KEDA may have put it to sleep meanwhile
        return await b.forward(fn, outgoing())

    try:
        first, second, third = run(
            backend, lambda b: b.forward(fn, outgoing()), lambda b: b.forward(fn, outgoing()), later
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert _ReplicaAndScaler.wakes == ["/v1/wake/acme/classify"] * 2  # before the first and the third
    assert first.cold_start_s is not None and second.cold_start_s is None and third.cold_start_s is not None


def test_a_new_version_without_a_lite_model_removes_the_old_lite_service(apiserver: StandInApiServer) -> None:
    from runtime.spec import Manifest, ModelSpec

    def with_lite(available: bool) -> FunctionRecord:
        fn = record(fallback="cold")
        fn.manifest = Manifest("legacy", "model.pdmodel", "model.pdiparams", False, "cpu", ModelSpec((), ()), "3.3.1",
                               lite={"available": available})  # fmt: skip
        return fn

    run(backend_for(apiserver), lambda b: b.deployed(with_lite(True)))
    assert ("Service", "t-acme", "classify-lite") in apiserver.kinds()
    run(backend_for(apiserver), lambda b: b.reconfigured(with_lite(False)))
    assert ("Service", "t-acme", "classify-lite") not in apiserver.kinds()
    assert ("Service", "t-acme", "classify") in apiserver.kinds()


def test_a_tenant_whose_plan_forbids_gpus_gets_cpu_replicas_for_auto(apiserver: StandInApiServer) -> None:
    from functions.cluster.config import TenantQuota

    backend = backend_for(apiserver)
    backend._quota_of = lambda tenant: TenantQuota(gpus=0)
    run(backend, lambda b: b.deployed(record()))
    service = apiserver.get("serving.knative.dev/v1", "Service", "t-acme", "classify")
    container = service["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    quota = apiserver.get("v1", "ResourceQuota", "t-acme", "paddlefn-quota")
    assert quota["spec"]["hard"]["requests.nvidia.com/gpu"] == "0"


def test_device_lite_makes_the_primary_a_lite_service_and_fallback_none_renders_no_fallback(
    apiserver: StandInApiServer,
) -> None:
    from runtime.spec import Manifest, ModelSpec

    def converted(**config: Any) -> FunctionRecord:
        fn = record(**config)
        fn.manifest = Manifest("legacy", "model.pdmodel", "model.pdiparams", False, "cpu", ModelSpec((), ()), "3.3.1",
                               lite={"available": True})  # fmt: skip
        return fn

    run(backend_for(apiserver), lambda b: b.deployed(converted(device="lite", max_scale=3)))
    services = [name for kind, _, name in apiserver.kinds() if kind == "Service"]
    assert services == ["classify"]
    template = apiserver.get("serving.knative.dev/v1", "Service", "t-acme", "classify")["spec"]["template"]
    container = template["spec"]["containers"][0]
    assert container["args"][container["args"].index("--engine") + 1] == "lite"
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    assert template["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"] == "3"
    run(backend_for(apiserver), lambda b: b.reconfigured(converted(fallback="none")))
    assert [name for kind, _, name in apiserver.kinds() if kind == "Service"] == ["classify"]
    run(backend_for(apiserver), lambda b: b.reconfigured(converted(fallback="cold")))
    assert [name for kind, _, name in apiserver.kinds() if kind == "Service"] == ["classify", "classify-lite"]
