"""The scaler's activity board and PromQL, as plain data with a fake clock (no servers)."""

from __future__ import annotations

import asyncio

import pytest

from scaler.activity import Board, Sample
from scaler.policy import Load, Scaling, State, decide
from scaler.prometheus import SourceError, build_query, parse

FN = ("acme", "classify")


def board(idle_timeout_s: float = 10.0, window: float = 1.0, min_scale: int = 0) -> Board:
    b = Board(activity_window_s=window)
    b.configure(FN, Scaling(min_scale=min_scale, idle_timeout_s=idle_timeout_s))
    return b


@pytest.mark.parametrize("current", [0, 1])
@pytest.mark.parametrize("demand", [1, 3, 1000])
@pytest.mark.parametrize(
    "scaling",
    [
        Scaling(),
        Scaling(min_scale=2, max_scale=2),
        Scaling(max_scale=1, target=1000),
        Scaling(idle_timeout_s=0),
    ],
)
def test_demand_always_wants_a_replica(scaling: Scaling, demand: int, current: int) -> None:
    # The board relies on this to skip asking the policy about busy functions on every tick.
    for load in (Load(in_flight=demand), Load(peak=demand), Load(pending=demand, seconds_since_request=1e9)):
        assert decide(load, scaling, current, State(), now=0.0).desired >= 1


@pytest.mark.parametrize(
    "scaling",
    [Scaling(), Scaling(min_scale=2, max_scale=2), Scaling(idle_timeout_s=5), Scaling(idle_timeout_s=0.5)],
)
def test_not_yet_idle_stays_up(scaling: Scaling) -> None:
    # The board relies on this to skip running functions that are still inside their idle timeout.
    for since in (0.0, scaling.idle_timeout_s / 2, scaling.idle_timeout_s * 0.999):
        assert decide(Load(seconds_since_request=since), scaling, 1, State(), now=0.0).desired >= 1


def test_unknown_function_is_inactive_with_no_demand() -> None:
    assert not Board().is_active(FN)
    assert Board().demand(FN) == 0.0


def test_requests_in_flight_make_a_function_active_and_set_its_demand() -> None:
    b = board()
    b.observe({FN: Sample(in_flight=5, pending=2, recent=10)}, now=0.0)
    assert b.is_active(FN)
    assert b.demand(FN) == 5.0  # in flight counts the waiting ones already


def test_a_function_goes_inactive_only_after_its_idle_timeout() -> None:
    b = board(idle_timeout_s=10.0)
    b.observe({FN: Sample(in_flight=1, recent=1)}, now=0.0)
    for now in (1.0, 5.0, 9.9):
        b.observe({}, now=now)  # absent from the answer: nothing in flight, nothing answered lately
        assert b.is_active(FN), now
    b.observe({}, now=10.0)
    assert not b.is_active(FN)


def test_requests_answered_lately_count_even_with_nothing_in_flight_at_the_scrape() -> None:
    b = board(idle_timeout_s=10.0)
    b.observe({FN: Sample(in_flight=1, recent=1)}, now=0.0)
    b.observe({FN: Sample(recent=6)}, now=8.0)  # quick requests between scrapes
    b.observe({}, now=17.0)
    assert b.is_active(FN)  # 9 s after the last request seen, not 17
    b.observe({}, now=18.0)
    assert not b.is_active(FN)


def test_requests_answered_lately_make_an_inactive_function_active() -> None:
    # KEDA's cooldown may still be running with replicas up: traffic must keep them, even unseen in flight.
    b = board(idle_timeout_s=10.0)
    b.observe({}, now=0.0)
    assert not b.is_active(FN)
    b.observe({FN: Sample(recent=1)}, now=21.0)
    assert b.is_active(FN)


def test_without_its_own_idle_timeout_the_scaler_reports_activity_within_the_window() -> None:
    # The default: KEDA's cooldownPeriod carries the idle timeout, the scaler only says "traffic lately".
    b = board(idle_timeout_s=0.0, window=2.0)
    b.observe({FN: Sample(in_flight=1, recent=1)}, now=0.0)
    b.observe({}, now=1.9)
    assert b.is_active(FN)
    b.observe({}, now=2.0)
    assert not b.is_active(FN)


def test_a_sleeping_function_stays_asleep_and_costs_nothing_per_tick() -> None:
    b = board()
    for now in range(5):
        b.observe({}, now=float(now))
    assert not b.is_active(FN) and b.demand(FN) == 0.0


def test_min_scale_keeps_a_function_active_without_traffic() -> None:
    b = board(min_scale=1)
    b.observe({}, now=0.0)
    assert b.is_active(FN)


def test_a_wake_signal_makes_a_function_active_at_once_and_counts_as_a_request() -> None:
    b = board(idle_timeout_s=10.0)
    b.wake(FN, now=50.0)
    assert b.is_active(FN)
    b.observe({}, now=59.0)  # Prometheus has not seen the held request yet
    assert b.is_active(FN)
    b.observe({}, now=60.0)
    assert not b.is_active(FN)


def test_watchers_hear_every_change_of_activity() -> None:
    async def scenario() -> list[bool]:
        b = board(idle_timeout_s=1.0)
        queue = b.watch(FN)
        b.wake(FN, now=0.0)
        b.wake(FN, now=0.5)  # no change: nothing sent
        b.observe({}, now=2.0)
        b.unwatch(FN, queue)
        b.wake(FN, now=3.0)  # no longer watched
        return [queue.get_nowait() for _ in range(queue.qsize())]

    assert asyncio.run(scenario()) == [True, False]


def test_one_query_covers_every_function_and_series() -> None:
    query = build_query('job="paddlefn-gateway"', window_s=30)
    assert query.count("sum by (tenant, function)") == 3 and query.count(" > 0") == 3
    assert 'increase(paddlefn_requests_total{job="paddlefn-gateway"}[30000ms])' in query
    assert " or " in query


def test_parse_groups_series_by_function_and_ignores_foreign_series() -> None:
    result = [
        {"metric": {"tenant": "a", "function": "f", "series": "in_flight"}, "value": [1.0, "3"]},
        {"metric": {"tenant": "a", "function": "f", "series": "recent"}, "value": [1.0, "42"]},
        {"metric": {"tenant": "b", "function": "g", "series": "pending"}, "value": [1.0, "NaN"]},
        {"metric": {"series": "recent"}, "value": [1.0, "1"]},  # no tenant label: not ours
    ]
    assert parse(result) == {("a", "f"): Sample(in_flight=3, recent=42), ("b", "g"): Sample()}


def test_parse_rejects_an_answer_it_cannot_read() -> None:
    with pytest.raises(SourceError):
        parse([{"metric": {"tenant": "a", "function": "f", "series": "pending"}, "value": ["x"]}])
