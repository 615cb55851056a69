"""Functions as the platform sees them: their configuration, and the in-memory table the gateway reads.

The table is the only thing the request path consults (no database round trip per request); the control plane
writes the store first and then the table, so a restart rebuilds the same table from the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from runtime.spec import Manifest

DEPLOYING, READY, FAILED = "deploying", "ready", "failed"


class Batching(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(32, ge=2, le=1024, description="largest batch the worker runs at once")
    max_queue_delay_ms: float = Field(
        2.0, ge=0, le=1000, description="how long a batch waits for more requests after its first"
    )


class FunctionConfig(BaseModel):
    """What a tenant may set per function (multipart field ``config`` on deploy, or PATCH)."""

    model_config = ConfigDict(extra="forbid")

    idle_timeout_s: float | None = Field(None, gt=0, description="sleep after this many idle seconds")
    min_scale: int = Field(0, ge=0, le=64, description="replicas kept even when idle (0: may sleep)")
    max_scale: int = Field(4, ge=1, le=256, description="most replicas at once")
    target_concurrency: int = Field(2, ge=1, le=1000, description="in-flight requests per replica to aim for")
    container_concurrency: int = Field(
        0, ge=0, le=1000, description="hard limit of in-flight requests per replica (0: twice the target)"
    )
    device: Literal["auto", "gpu", "cpu", "lite"] = Field(
        "auto", description="where replicas run; lite: always Paddle Lite on CPU (needs a Lite conversion)"
    )
    fallback: Literal["none", "cold", "capacity"] = Field(
        "none",
        description="answer from a Paddle Lite replica while the primary one cold-starts (cold) or when no "
        "primary replica can be had (capacity); none: never (needs a Lite conversion unless none)",
    )
    public: bool = Field(False, description="anyone may invoke it without a key (only invoke)")
    batching: Batching | None = Field(None, description="dynamic batching; true for the defaults")
    cold_start_timeout_s: float | None = Field(
        None, gt=0, le=3600, description="wait this long for a wake-up"
    )
    timeout_s: float | None = Field(None, gt=0, le=3600, description="time limit for one request")

    @model_validator(mode="before")
    @classmethod
    def _batching_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("batching") is True:
            return {**data, "batching": {}}
        if isinstance(data, dict) and data.get("batching") is False:
            return {**data, "batching": None}
        return data

    @model_validator(mode="after")
    def _scale_bounds(self) -> FunctionConfig:
        if self.min_scale > self.max_scale:
            raise ValueError(f"min_scale ({self.min_scale}) is above max_scale ({self.max_scale})")
        if self.device == "lite" and self.fallback != "none":
            raise ValueError(
                f"fallback={self.fallback} falls back to Paddle Lite, but device=lite already serves with Lite "
                "only: use fallback none with device lite"
            )
        if self.device == "lite" and self.batching is not None:
            raise ValueError(
                "dynamic batching is for Paddle Inference replicas; device=lite serves unbatched"
            )
        return self

    @property
    def uses_lite(self) -> bool:
        """Whether some replica of the function may be a Paddle Lite one (it then needs a Lite conversion)."""
        return self.device == "lite" or self.fallback != "none"

    @property
    def slots_per_replica(self) -> int:
        """Requests a replica takes at once; the rest wait at the gateway (where fairness is enforced)."""
        if self.container_concurrency:
            return self.container_concurrency
        if self.batching:
            return 2 * self.batching.max_batch_size
        return 2 * self.target_concurrency

    @property
    def scaling_target(self) -> int:
        return self.batching.max_batch_size if self.batching else self.target_concurrency


@dataclass
class FunctionRecord:
    id: int
    tenant: str
    name: str
    status: str
    config: FunctionConfig
    version: str
    artifact_dir: Path  # absolute: holds model/ (as uploaded) and serving/ (prepared)
    manifest: Manifest | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    last_request_at: datetime | None = None
    tenant_id: int = 0
    stage: str | None = (
        None  # while deploying: queued, loading, optimising, golden check, converting for Paddle Lite
    )

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant, self.name)

    @property
    def serving_dir(self) -> Path:
        return self.artifact_dir / "serving"

    @property
    def label(self) -> str:
        return f"{self.tenant}/{self.name}"


class Registry:
    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], FunctionRecord] = {}

    def put(self, record: FunctionRecord) -> None:
        self._by_key[record.key] = record

    def get(self, tenant: str, name: str) -> FunctionRecord | None:
        return self._by_key.get((tenant, name))

    def remove(self, tenant: str, name: str) -> FunctionRecord | None:
        return self._by_key.pop((tenant, name), None)

    def of_tenant(self, tenant: str) -> list[FunctionRecord]:
        return sorted((r for r in self._by_key.values() if r.tenant == tenant), key=lambda r: r.name)

    def all(self) -> list[FunctionRecord]:
        return list(self._by_key.values())

    def ready(self) -> list[FunctionRecord]:
        return [r for r in self._by_key.values() if r.status == READY]
