"""The cluster's metric source: ONE aggregated PromQL query per tick answers for every function at once.

Three gateway series are summed ``by (tenant, function)`` (over gateway replicas and status codes) and tagged
with a ``series`` label so that a single instant query returns all of them; ``or`` keeps every element because
the tags differ. Per-function queries would cost 10,000 round trips per tick on a big cluster; this costs one.

Only functions with something to say come back (``> 0``): requests in flight, waiting, or answered within the
activity window (``increase`` over it, which also copes with gateway restarts resetting counters). Most
functions sleep most of the time, so the answer - and the tick - scales with the busy ones, not with all.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from scaler.activity import Key, Sample

# Names as functions/metrics.py exposes them (prometheus_client adds _total to counters).
SERIES = {
    "in_flight": "paddlefn_in_flight_requests",
    "pending": "paddlefn_pending_requests",
    "recent": "paddlefn_requests_total",
}


class SourceError(Exception):
    """Prometheus did not answer (or answered nonsense): the tick is skipped and activity stays as it was."""


def build_query(selector: str = "", window_s: float = 30.0) -> str:
    """The PromQL of one tick. SELECTOR narrows the series, e.g. ``job="paddlefn-gateway"`` (no braces);
    WINDOW_S is the activity window (keep it above two scrape intervals: ``increase`` needs two samples)."""
    matcher = f"{{{selector}}}" if selector else ""
    window = f"{max(1, round(window_s * 1000))}ms"
    parts = []
    for tag, metric in SERIES.items():
        expr = f"increase({metric}{matcher}[{window}])" if tag == "recent" else f"{metric}{matcher}"
        parts.append(f'label_replace(sum by (tenant, function) ({expr}) > 0, "series", "{tag}", "", "")')
    return " or ".join(parts)


_SLOT = {tag: i for i, tag in enumerate(SERIES)}  # position of each series in Sample's fields


def parse(result: Iterable[Mapping[str, Any]]) -> dict[Key, Sample]:
    """Samples by (tenant, function) from the ``data.result`` of an instant vector query."""
    # Runs over tens of thousands of items per tick in the worst case: plain lists, no per-item dicts.
    rows: dict[Key, list[float]] = {}
    for item in result:
        labels = item.get("metric") or {}
        slot = _SLOT.get(labels.get("series", ""))
        tenant, function = labels.get("tenant"), labels.get("function")
        if slot is None or not tenant or not function:
            continue  # series from something else that happens to share the name
        try:
            value = float(item["value"][1])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise SourceError(f"unexpected sample in Prometheus' answer: {item!r}") from exc
        row = rows.get((tenant, function))
        if row is None:
            row = rows[(tenant, function)] = [0.0, 0.0, 0.0]
        row[slot] = value if value == value else 0.0  # NaN -> 0
    return {key: Sample(*row) for key, row in rows.items()}


class PrometheusSource:
    """Blocking (prometheus-api-client uses requests): the service calls ``fetch`` in a worker thread."""

    def __init__(
        self,
        url: str,
        selector: str = "",
        timeout_s: float = 5.0,
        bearer_token: str = "",
        window_s: float = 30.0,
    ) -> None:
        import requests
        from prometheus_api_client import PrometheusConnect
        from urllib3.util.retry import Retry

        headers = {"Authorization": f"Bearer {bearer_token}"} if bearer_token else None
        self._session = requests.Session()  # ours, so that close() can release its connections
        # No retries inside a tick: the next tick is the retry, and a stalled tick would delay every function.
        self._client = PrometheusConnect(url, headers=headers, retry=Retry(total=0), session=self._session)
        self.query = build_query(selector, window_s)
        self.timeout_s = timeout_s

    def fetch(self) -> dict[Key, Sample]:
        try:
            result = self._client.custom_query(self.query, timeout=self.timeout_s)
        except Exception as exc:  # requests' errors and the client's PrometheusApiClientException
            raise SourceError(f"Prometheus query failed: {exc}") from exc
        return parse(result)

    def close(self) -> None:
        self._session.close()
