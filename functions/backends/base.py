"""The seam between the platform and wherever replicas run (worker processes here, Knative on Kubernetes)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from functions.registry import FunctionRecord
from runtime.spec import Manifest


@contextlib.asynccontextmanager
async def _no_limit() -> AsyncIterator[None]:
    yield


# Headers a replica's answer keeps on its way back to the client.
PASSED_RESPONSE_HEADERS = ("content-type", "inference-header-content-length")


@dataclass
class Outgoing:
    """One inference request on its way to a replica."""

    path: str  # below the replica's root, e.g. "/v2/models/classify/infer"
    body: bytes
    headers: dict[str, str]
    cold_start_timeout_s: float
    timeout_s: float
    # The compute limit (the gateway's weighted fair queue): held while the request computes, not while it waits
    # for its function to wake. A request that held it through a cold start kept warm functions' requests
    # queued behind waking ones (bench/RESULTS.md, density at 1,000 functions).
    compute_slot: Callable[[], contextlib.AbstractAsyncContextManager[None]] = field(default=_no_limit)


@dataclass
class Forwarded:
    status: int
    body: bytes
    headers: dict[str, str]
    engine: str = ""  # which engine answered ("paddle-inference", "paddle-lite")
    device: str = ""  # device class billed: gpu, cpu, lite
    compute_ms: float = 0.0  # what the worker spent computing (billed); excludes queueing and cold start
    cold_start_s: float | None = None  # set when this request waited for its function to wake
    extra: dict[str, str] = field(default_factory=dict)


WakeListener = Callable[[FunctionRecord], None]


class Backend(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def prepare(
        self, fn: FunctionRecord, *, device: str, batching: bool, on_stage: Callable[[str], None]
    ) -> Manifest:
        """Optimise and golden-check FN's uploaded model (``runtime.prepare``) where the tenant's code runs
        (confined as the tenant), never in the platform's own process; ON_STAGE hears each stage. Raises
        functions.deploy.DeployFailed with the reason; a cancelled deploy leaves nothing running."""
        ...

    async def deployed(self, fn: FunctionRecord) -> None:
        """A deploy succeeded: start the function's first replica and return once it is ready (or its start
        ended), since the platform says READY only after this returns."""

    async def removed(self, fn: FunctionRecord) -> None:
        """A function was deleted: its replicas go away."""

    async def reconfigured(self, fn: FunctionRecord) -> None:
        """A function's configuration changed: replicas pick it up (restarting when they must)."""

    def replicas(self, fn: FunctionRecord) -> int:
        """Replicas running or starting."""

    def replica_info(self, fn: FunctionRecord) -> list[dict[str, Any]]:
        """What an operator may want to see of each ready replica (process id, load)."""

    def pending(self, fn: FunctionRecord) -> int:
        """Requests held waiting for a replica (bounded by the activator)."""

    async def set_replicas(self, fn: FunctionRecord, count: int) -> None: ...

    async def forward(self, fn: FunctionRecord, request: Outgoing) -> Forwarded:
        """Send the request to a replica, waking the function first if it sleeps."""

    def on_wake(self, listener: WakeListener) -> None:
        """Call LISTENER at once whenever a request finds its function asleep."""

    def capacity(self) -> dict[str, int]:
        """Worker slots: total, in use, idle pre-warmed."""
