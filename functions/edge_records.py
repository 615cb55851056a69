"""What an edge usage upload may contain: every value checked against a documented range before it is billed.

A device key proves which bundle is uploading, nothing more: the records are whatever the device (or whoever
holds its key) sends, so each one is checked here and an upload holding one that cannot be a real request is
refused whole with a 400 naming the record, the field and what to change (the edge keeps its spool and retries).

    body         JSON, at most MAX_BODY_BYTES, nested at most 1024 levels (orjson's limit)
    records      a list of at most MAX_RECORDS
    request_id   32 lowercase hex characters
    started_at   ISO 8601 (no zone: UTC), in [EARLIEST, now + MAX_AHEAD - duration_ms]: the request must have
                 ended by the platform's clock, give or take MAX_AHEAD of clock skew. An earlier start than the
                 open month is accepted and billed in the open month (a closed invoice never changes).
    duration_ms  0 to MAX_MS (a day), arrival to response
    compute_ms   0 to duration_ms: a request cannot compute for longer than it took
    status       100 to 599; billed iff 2xx
    bytes_in     0 to MAX_BYTES (1 TiB), and bytes_out the same
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from functions.errors import BadRequest, PayloadTooLarge

MAX_RECORDS = 500  # runtime.lite.edge.UPLOAD_BATCH
MAX_BODY_BYTES = 4 * 1024 * 1024  # 500 records are ~200 KB
MAX_MS = 86_400_000
MAX_BYTES = 2**40  # far above any request, far below what the ledger's 64-bit sums can hold
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)  # an edge stamps records from time.time(), which starts here
MAX_AHEAD = timedelta(minutes=5)


class EdgeRecord(BaseModel):
    """One request an edge server answered (fields it sends that are not listed here are ignored)."""

    model_config = ConfigDict(extra="ignore")

    request_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="32 lowercase hex characters, unique")
    started_at: datetime
    duration_ms: float = Field(ge=0, le=MAX_MS)
    compute_ms: float = Field(ge=0, le=MAX_MS)
    status: int = Field(ge=100, le=599)
    bytes_in: int = Field(0, ge=0, le=MAX_BYTES)
    bytes_out: int = Field(0, ge=0, le=MAX_BYTES)
    bundle_id: str | None = None

    @field_validator("started_at")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        try:
            value = value.astimezone(UTC)
        except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is in year 0 in UTC
            raise ValueError(
                "is outside years 1 to 9999 once its zone offset is applied; send the time in UTC"
            ) from None
        if value < EARLIEST:
            raise ValueError(
                f"{value.isoformat()} is before {EARLIEST.isoformat()}, earlier than an edge's clock can read; "
                "set the device's clock"
            )
        return value

    @model_validator(mode="after")
    def _possible(self, info: ValidationInfo) -> EdgeRecord:
        if self.compute_ms > self.duration_ms:
            raise ValueError(
                f"compute_ms ({self.compute_ms}) is more than duration_ms ({self.duration_ms}): a request "
                "cannot compute for longer than it took"
            )
        now: datetime = (info.context or {})["now"]
        # now + MAX_AHEAD cannot overflow, where started_at + duration_ms could (a start in 9999-12-31).
        latest = now + MAX_AHEAD - timedelta(milliseconds=self.duration_ms)
        if self.started_at > latest:
            raise ValueError(
                f"started_at ({self.started_at.isoformat()}) plus duration_ms ends more than "
                f"{MAX_AHEAD.total_seconds() / 60:g} minutes after the platform's clock ({now.isoformat()}); "
                "set the device's clock"
            )
        return self


_RECORDS = TypeAdapter(list[EdgeRecord])


def parse(body: bytes) -> Any:
    """The upload's JSON. orjson, not json: it stops at 1024 levels of nesting with a JSONDecodeError, where
    json.loads overflows the stack (RecursionError) on a body nested 100,000 deep."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"the body is not JSON as this platform reads it (numbers within a double's range, nesting at most "
            f"1024 deep): {exc}"
        ) from None


def records_of(body: Any, bundle_id: str, now: datetime) -> list[EdgeRecord]:
    """The records of an upload BODY by bundle BUNDLE_ID, each checked as the module docstring says."""
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object {"bundle_id": "...", "records": [...]}')
    if body.get("bundle_id") != bundle_id:
        raise BadRequest(f"bundle_id: {_shown(body.get('bundle_id'))} is not the bundle of this device key "
                         f"({bundle_id})")  # fmt: skip
    raw = body.get("records")
    if not isinstance(raw, list):
        raise BadRequest("records: must be a list of usage records")
    if len(raw) > MAX_RECORDS:
        raise PayloadTooLarge(
            f"records: {len(raw)} records in one upload; send at most {MAX_RECORDS} at a time"
        )
    try:
        records = _RECORDS.validate_python(raw, context={"now": now})
    except ValidationError as exc:
        raise BadRequest("; ".join(_problem(e) for e in exc.errors()[:5])) from None
    for i, record in enumerate(records):
        if record.bundle_id is not None and record.bundle_id != bundle_id:
            raise BadRequest(f"records[{i}].bundle_id: {_shown(record.bundle_id)} is not {bundle_id!r}")
    return records


def _shown(value: object) -> str:
    """VALUE for an error message: a string, cut short; anything else by its type (a repr of a value nested a
    thousand deep would overflow the stack, and one of a 4 MB string would fill the log)."""
    if isinstance(value, str):
        return repr(value[:40] + ("..." if len(value) > 40 else ""))
    kinds = {dict: "an object", list: "an array", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), "a value")


def _problem(error: Any) -> str:
    where = "records" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
    return f"{where}: {str(error['msg']).removeprefix('Value error, ')}"
