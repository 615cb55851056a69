"""Settings of the scaler service: one object, built once from ``PADDLEFN_SCALER_*`` variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class ScalerSettings:
    grpc_address: str = "0.0.0.0:8090"
    """Where KEDA reaches the external scaler (host:port); the ScaledObjects' scalerAddress points here."""
    http_host: str = "0.0.0.0"
    """Address of the HTTP side (wake signals from the gateway, /healthz)."""
    http_port: int = 8091
    """Port of the HTTP side."""
    wake_token: str = ""
    """Bearer token the gateway must send with wake signals; empty: none (rely on the NetworkPolicy)."""
    prometheus_url: str = "http://prometheus.paddlefn-system.svc:9090"
    """Prometheus that scrapes the gateways."""
    prometheus_selector: str = ""
    """Label matchers that narrow the gateway series, e.g. job="paddlefn-gateway" (no braces)."""
    prometheus_token: str = ""
    """Bearer token for Prometheus, when it sits behind an authenticating proxy."""
    tick_s: float = 2.0
    """Seconds between two queries to Prometheus (wake signals do not wait for a tick)."""
    query_timeout_s: float = 5.0
    """Longest a tick's query may take; a slower answer skips the tick and activity stays as it was."""
    activity_window_s: float = 30.0
    """A function counts as active this long after its last request (keep it over 2 scrape intervals)."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> ScalerSettings:
        """Defaults, then PADDLEFN_SCALER_<FIELD> variables, then explicit overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"PADDLEFN_SCALER_{f.name.upper()}")
            if raw is None:
                continue
            kind = str(f.type)
            try:
                values[f.name] = int(raw) if kind == "int" else float(raw) if kind == "float" else raw
            except ValueError:
                raise ValueError(f"PADDLEFN_SCALER_{f.name.upper()}={raw!r} is not a {kind}") from None
        values.update(overrides)
        return replace(cls(), **values)
