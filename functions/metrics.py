"""Prometheus metrics of the platform, labelled by tenant and function (one registry per platform instance)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COLD_START_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("tenant", "function")
        self.requests = Counter(
            "paddlefn_requests",
            "Inference requests answered, by HTTP status code",
            (*labels, "code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "paddlefn_request_duration_seconds",
            "Time from request arrival at the gateway to the response, cold starts included",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute = Counter(
            "paddlefn_compute_seconds",
            "Compute time the workers reported, by device class",
            (*labels, "device"),
            registry=self.registry,
        )
        self.cold_starts = Counter(
            "paddlefn_cold_starts",
            "Requests that found their function asleep and waited for it to wake",
            labels,
            registry=self.registry,
        )
        self.cold_start_duration = Histogram(
            "paddlefn_cold_start_duration_seconds",
            "How long a request waited for its sleeping function to wake",
            labels,
            buckets=COLD_START_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "paddlefn_in_flight_requests", "Requests being served or waiting", labels, registry=self.registry
        )
        self.pending = Gauge(
            "paddlefn_pending_requests",
            "Requests held at the gateway waiting for a replica",
            labels,
            registry=self.registry,
        )
        self.replicas = Gauge(
            "paddlefn_replicas", "Replicas running or starting (0: asleep)", labels, registry=self.registry
        )
        self.billed_requests = Counter(
            "paddlefn_billed_requests",
            "Requests recorded as billable in the usage ledger, by device class",
            (*labels, "device"),
            registry=self.registry,
        )
        self.billed_compute = Counter(
            "paddlefn_billed_compute_seconds",
            "Compute billed (rounded up to whole ms per request), by device class",
            (*labels, "device"),
            registry=self.registry,
        )
        self.workers = Gauge(
            "paddlefn_worker_slots", "Worker process slots, by state", ("state",), registry=self.registry
        )
        self.worker_memory = Gauge(
            "paddlefn_worker_memory_bytes",
            "Memory of warm workers (PSS): budget, used (template and workers), per_worker (mean), template",
            ("kind",),
            registry=self.registry,
        )

    def billed(self, row: dict[str, object]) -> None:
        """Count one billable ledger row, so that dashboards reconcile with invoices."""
        labels = (row["tenant"], row["function"], row["device"])
        self.billed_requests.labels(*labels).inc()
        self.billed_compute.labels(*labels).inc(int(row["billed_ms"]) / 1000)  # type: ignore[call-overload]

    def forget(self, tenant: str, function: str) -> None:
        """Drop a deleted function's series so dashboards do not show it forever."""
        for metric in (
            self.latency, self.cold_starts, self.cold_start_duration, self.in_flight, self.pending, self.replicas
        ):  # fmt: skip
            with contextlib.suppress(KeyError):
                metric.remove(tenant, function)
