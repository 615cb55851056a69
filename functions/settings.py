"""Platform settings: one object, built once (by the CLI or a test) and passed down.

Every field has a default that a single machine can run with; ``PADDLEFN_*`` environment variables override
them (see ``Settings.from_env``), and ``paddlefn up`` options override those.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``"4s"``, ``"15m"``, ``"1h"``, ``"250ms"`` or a plain number of seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        match = _DURATION.match(text)
        if not match:
            raise ValueError(f"'{text}' is not a duration: use a number with ms, s, m, h or d (e.g. 15m)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if math.isnan(seconds):
        raise ValueError("duration must be a number of seconds, got NaN")
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {text}")
    return seconds


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    """Address the platform listens on."""
    port: int = 8080
    """Port of the control plane, the data plane and /metrics."""
    public_url: str = ""
    """Base URL that clients use to reach this platform; derived from host and port when empty."""
    domain: str = "fn.localhost"
    """Functions also answer at http://{function}.{tenant}.{domain}, as Knative names services."""
    data_dir: Path = Path(".paddlefn")
    """Where state lives: the SQLite database, model artifacts, worker sockets and logs."""
    database_url: str = ""
    """SQLAlchemy URL; empty means SQLite in data_dir. PostgreSQL: postgresql+psycopg://user:pw@host/db."""
    admin_key: str = ""
    """Admin API key; when empty one is generated on first start and printed once."""
    backend: str = "local"
    """Where replicas run: "local" (worker processes on this machine) or "knative" (Knative Services on
    Kubernetes, scaled by KEDA through our external scaler; see docs/cluster.md)."""

    idle_timeout_s: float = 900.0
    """A function with no request for this long sleeps: its workers exit and free their memory."""
    pool_size: int = 2
    """Pre-warmed workers (Paddle imported, device up) kept ready, so a cold start is model load + first run."""
    max_workers: int = 0
    """Most worker processes at once, pool included; 0 means as many as memory_budget_mb holds at the measured
    memory (PSS) of a worker (functions/backends/memory.py)."""
    memory_budget_mb: int = 0
    """Memory warm workers (and their template) may take, in MiB; 0 means 70% of the machine's memory (of the
    platform's cgroup limit when that is lower). An idle warm function costs only this memory; compute is
    bounded apart, by max_in_flight."""
    worker_start: str = "fork"
    """How workers start: "fork" (from a template process that has imported Paddle once: milliseconds, and
    pages shared; runtime/zygote.py) or "spawn" (a Python process of their own, ~2 s and ~130 MB each)."""
    lite_workers: int = 0
    """Most Paddle Lite worker processes at once (device=lite and fallback replicas; CPU only, no Paddle import,
    counted apart from max_workers so that Lite can answer when those are all taken); 0 means max_workers, or
    2 per CPU core (at least 4) when that is 0 too."""
    lite_pool_size: int = 1
    """Pre-warmed Lite workers kept ready once some function uses Lite (device=lite or a fallback)."""
    device: str = "auto"
    """Device for workers: "auto" (GPU when Paddle has CUDA and a device), "gpu" or "cpu"."""
    cpu_threads: int = 1
    """Math threads per CPU predictor; functions scale out with replicas, not threads."""
    worker_isolation: str = "auto"
    """Confine each worker to its tenant's files as the tenant's own user (runtime/isolation.py): "auto" (when the
    platform runs as root on Linux), "required" (refuse to serve otherwise) or "off"."""
    tenant_uid_base: int = 200_000
    """Tenant N's workers run as user id tenant_uid_base + N (no /etc/passwd entry needed)."""
    worker_memory_mb: int = 0
    """Address-space limit per worker in MiB (0: none); a model over it fails alone, with a clear error."""

    max_in_flight: int = 0
    """Requests forwarded to replicas at once across all tenants (the compute limit, apart from how many functions
    may be warm); beyond it they wait in a weighted fair queue (each tenant's share in proportion to its plan's
    weight). 0 means 8 per CPU core."""

    max_connections: int = 0
    """Most client connections held open at once; a new one beyond it closes the longest-idle connection (one
    with no request in progress), or is answered 503 when every one has a request in progress. 0 means 10,000;
    always at most half the open-file limit (raised to its hard limit at start), so descriptors remain for
    worker sockets, the database and the journal."""
    header_timeout_s: float = 10.0
    """A client must send a whole request head (request line and headers) within this time of connecting, or of
    starting its next request on a kept-alive connection, or it is disconnected (stops slowloris and clients
    that connect and send nothing)."""
    keep_alive_timeout_s: float = 5.0
    """A kept-alive client connection idle this long between requests is closed."""

    cold_start_timeout_s: float = 60.0
    """Default time a request waits for a sleeping function to wake before a 504."""
    request_timeout_s: float = 60.0
    """Default time a replica may take to answer one request before a 504."""
    max_request_bytes: int = 64 * 1024 * 1024
    """Largest inference request body; bigger ones get a 413."""
    max_json_bytes: int = 1024 * 1024
    """Largest request body of a control-plane endpoint (JSON: tenants, keys, PATCH, plans, ...); a bigger one
    gets a 413 as soon as its Content-Length or its first bytes over the limit arrive, before it is parsed.
    Model uploads (max_upload_bytes) and edge usage uploads have limits of their own."""
    max_upload_bytes: int = 2 * 1024 * 1024 * 1024
    """Largest model archive upload; bigger ones get a 413."""
    max_unpacked_bytes: int = 4 * 1024 * 1024 * 1024
    """Largest total size of an archive's files once unpacked (stops zip bombs)."""
    max_archive_files: int = 10_000
    """Most files an archive may hold."""
    max_pending_per_function: int = 256
    """Requests held waiting for a replica of one function; more get a 503 with Retry-After."""
    max_pending_per_tenant: int = 1024
    """Requests held across all functions of one tenant; more get a 503 with Retry-After."""
    deploy_timeout_s: float = 600.0
    """Time the deploy pipeline (optimisation, golden check) may take per model."""
    max_concurrent_deploys: int = 2
    """Deploys prepared at once; each needs a Paddle process and the model's memory."""
    max_concurrent_deploys_per_tenant: int = 1
    """Deploys of one tenant prepared at once; waiting tenants take turns (round-robin), so one tenant's burst
    of deploys never holds every deploy slot."""
    max_concurrent_unpacks: int = 4
    """Uploaded archives unpacked and checked at once (in threads of their own, before the deploy queue); each
    tenant unpacks one at a time and tenants take turns, so one tenant's burst of uploads never holds another's."""
    tenant_max_processes: int = 256
    """Processes and threads that one tenant's confined workers and deploys may run at once (RLIMIT_NPROC of
    its user): a fork bomb stops there."""

    usage_flush_interval_s: float = 0.1
    """How often the usage journal is moved into the database (records are durable before that)."""
    invoice_grace_s: float = 3600.0
    """A month's invoice closes (freezes) this long after the month ends, for records still in flight."""

    scaler_tick_s: float = 1.0
    """How often the autoscaler looks at load (wake-ups do not wait for it)."""
    scale_down_delay_s: float = 30.0
    """Extra replicas stay this long after demand falls, so bursts do not thrash."""
    min_residency_s: float = 10.0
    """A replica is never evicted for another function's start (nor shed when worker capacity shrinks) within
    this long of becoming ready, so functions cannot evict each other in a loop; meanwhile a start that finds
    no slot waits (up to its cold-start timeout, then 503 + Retry-After)."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Settings of optional parts (e.g. the Kubernetes backend), by name."""

    def __post_init__(self) -> None:
        if self.worker_start not in ("fork", "spawn"):
            raise ValueError(f"worker_start must be 'fork' or 'spawn', not {self.worker_start!r}")

    @property
    def in_flight_capacity(self) -> int:
        return self.max_in_flight or 8 * (os.cpu_count() or 1)

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def lite_worker_limit(self) -> int:
        return self.lite_workers or self.max_workers or max(4, 2 * (os.cpu_count() or 1))

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'paddlefn.db').resolve()}"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then PADDLEFN_<FIELD> variables, then explicit overrides (None values are ignored)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"PADDLEFN_{f.name.upper()}")
            if raw is None or f.name == "extra":
                continue
            values[f.name] = _convert(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)


def _convert(name: str, kind: Any, raw: str) -> Any:
    kind = str(kind)
    try:
        if name.endswith("_s"):
            return parse_duration(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
    except ValueError as exc:
        raise ValueError(f"PADDLEFN_{name.upper()}={raw!r}: {exc}") from None
    return raw
