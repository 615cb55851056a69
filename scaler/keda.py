"""KEDA's external scaler protocol, served over gRPC (KEDA is the client; ``scaler/proto`` has the stubs).

Each ScaledObject names its function in the trigger's metadata, which KEDA passes in every call::

    triggers:
      - type: external-push            # or external: then KEDA only polls IsActive
        metadata:
          scalerAddress: paddlefn-scaler.paddlefn-system.svc:9090
          tenant: acme
          function: classify
          target: "2"                  # concurrent requests per replica (HPA target)
          minScale: "0"
          idleTimeout: "0"             # optional: seconds the scaler waits (0: KEDA's cooldownPeriod does)

``IsActive``/``StreamIsActive`` answer 0 <-> 1 from ``scaler.activity``; ``GetMetricSpec``/``GetMetrics``
give KEDA's HPA the function's concurrency and the per-replica target for 1 <-> N.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping

import grpc

from scaler.activity import Board, Key
from scaler.policy import Scaling
from scaler.proto import externalscaler_pb2 as pb
from scaler.proto import externalscaler_pb2_grpc as pb_grpc

log = logging.getLogger("paddlefn.scaler.keda")

METRIC = "paddlefn-concurrency"


class BadMetadata(ValueError):
    """The ScaledObject's trigger metadata cannot name a function (answered as INVALID_ARGUMENT)."""


def _number(metadata: Mapping[str, str], name: str, default: float, low: float) -> float:
    raw = metadata.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadMetadata(f"trigger metadata {name}={raw!r} is not a number") from None
    if value < low:
        raise BadMetadata(f"trigger metadata {name}={raw!r} must be at least {low:g}")
    return value


def read_ref(ref: pb.ScaledObjectRef) -> tuple[Key, Scaling]:
    """The function and its scaling settings from a ScaledObjectRef's metadata."""
    metadata = dict(ref.scalerMetadata)
    tenant, function = metadata.get("tenant", ""), metadata.get("function", "")
    if not tenant or not function:
        raise BadMetadata(
            f"ScaledObject {ref.namespace}/{ref.name}: the external trigger's metadata must set 'tenant' and "
            "'function' (the manifests that paddlefn renders do)"
        )
    scaling = Scaling(
        min_scale=int(_number(metadata, "minScale", 0, 0)),
        max_scale=int(_number(metadata, "maxScale", 1_000_000, 1)),
        target=int(_number(metadata, "target", 2, 1)),
        idle_timeout_s=_number(metadata, "idleTimeout", 0.0, 0),
    )
    return (tenant, function), scaling


class ExternalScaler(pb_grpc.ExternalScalerServicer):
    def __init__(self, board: Board) -> None:
        self.board = board

    async def _read(self, ref: pb.ScaledObjectRef, context: grpc.aio.ServicerContext) -> tuple[Key, Scaling]:
        try:
            key, scaling = read_ref(ref)
        except BadMetadata as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # abort raises; this only tells type checkers that nothing follows
        self.board.configure(key, scaling)  # settings follow the ScaledObject: every call carries them
        return key, scaling

    async def _key(self, ref: pb.ScaledObjectRef, context: grpc.aio.ServicerContext) -> Key:
        return (await self._read(ref, context))[0]

    async def IsActive(
        self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext
    ) -> pb.IsActiveResponse:
        key = await self._key(request, context)
        return pb.IsActiveResponse(result=self.board.is_active(key))

    async def StreamIsActive(
        self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.IsActiveResponse]:
        key = await self._key(request, context)
        queue = self.board.watch(key)
        try:
            # The current state first (KEDA may have missed changes while it was not connected), then changes.
            yield pb.IsActiveResponse(result=self.board.is_active(key))
            while True:
                yield pb.IsActiveResponse(result=await queue.get())
        finally:
            self.board.unwatch(key, queue)

    async def GetMetricSpec(
        self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext
    ) -> pb.GetMetricSpecResponse:
        _, scaling = await self._read(request, context)
        target = scaling.target
        spec = pb.MetricSpec(metricName=METRIC, targetSize=target, targetSizeFloat=float(target))
        return pb.GetMetricSpecResponse(metricSpecs=[spec])

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetMetricsResponse:
        key = await self._key(request.scaledObjectRef, context)
        value = self.board.demand(key)
        name = request.metricName or METRIC  # KEDA sends back the name it got from GetMetricSpec (prefixed)
        return pb.GetMetricsResponse(
            metricValues=[pb.MetricValue(metricName=name, metricValue=round(value), metricValueFloat=value)]
        )


def add_to_server(board: Board, server: grpc.aio.Server) -> ExternalScaler:
    servicer = ExternalScaler(board)
    pb_grpc.add_ExternalScalerServicer_to_server(servicer, server)
    return servicer
