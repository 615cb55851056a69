"""scaler.policy.decide: the scaling rules as tables, with the clock passed in as ``now``."""

from __future__ import annotations

import pytest

from scaler.policy import Decision, Load, Scaling, State, decide

SCALING = Scaling(min_scale=0, max_scale=4, target=2, idle_timeout_s=900.0, scale_down_delay_s=30.0)


def test_wake_from_zero_gives_one_replica() -> None:
    # A request held by the activator for a sleeping function: pending 1, nothing running.
    d = decide(
        Load(pending=1, peak=1, seconds_since_request=0.0), SCALING, current=0, state=State(), now=100.0
    )
    assert d.desired == 1
    assert d.state == State(last_wanted_more_at=100.0)
    assert "1 concurrent / target 2" in d.reason


@pytest.mark.parametrize(
    ("demand", "current", "desired"),
    [
        (1, 0, 1),  # ceil(1/2) = 1
        (2, 1, 1),  # ceil(2/2) = 1
        (3, 1, 2),  # ceil(3/2) = 2
        (5, 1, 3),  # ceil(5/2) = 3
        (8, 2, 4),  # ceil(8/2) = 4 = max
        (100, 1, 4),  # capped at max_scale
    ],
)
def test_desired_is_ceil_of_concurrency_over_target_within_max(
    demand: int, current: int, desired: int
) -> None:
    d = decide(
        Load(in_flight=demand, peak=demand, seconds_since_request=0.0), SCALING, current, State(), now=0.0
    )
    assert d.desired == desired
    assert d.state.last_wanted_more_at == 0.0


def test_demand_is_the_peak_or_in_flight_plus_pending_whichever_is_larger() -> None:
    # Peak since the last tick was 7 although only 1 is in flight now: scale for the peak.
    assert decide(Load(in_flight=1, peak=7, seconds_since_request=0), SCALING, 1, State(), 0).desired == 4
    # Peak not reported (0) but 3 in flight and 2 waiting: 5 concurrent -> 3 replicas.
    assert decide(Load(in_flight=3, pending=2, seconds_since_request=0), SCALING, 1, State(), 0).desired == 3


def test_min_scale_is_the_floor_under_demand() -> None:
    scaling = Scaling(min_scale=3, max_scale=5, target=2)
    d = decide(Load(in_flight=1, peak=1, seconds_since_request=0.0), scaling, current=3, state=State(), now=0)
    assert d.desired == 3


def test_max_scale_wins_over_target() -> None:
    scaling = Scaling(min_scale=0, max_scale=2, target=1)
    assert decide(Load(in_flight=50, seconds_since_request=0), scaling, 1, State(), 0).desired == 2


def test_no_demand_before_idle_timeout_keeps_one_replica() -> None:
    d = decide(Load(seconds_since_request=899.0), SCALING, current=1, state=State(10.0), now=909.0)
    assert d.desired == 1
    assert "idle timeout" in d.reason


def test_no_demand_before_idle_timeout_keeps_a_sleeping_function_asleep() -> None:
    d = decide(Load(seconds_since_request=5.0), SCALING, current=0, state=State(), now=5.0)
    assert d.desired == 0


def test_idle_timeout_puts_the_function_to_sleep_at_once() -> None:
    # Even though demand was seen 1 s ago (within the scale-down delay), idle means sleep now.
    state = State(last_wanted_more_at=999.0)
    d = decide(Load(seconds_since_request=900.0), SCALING, current=2, state=state, now=1000.0)
    assert d == Decision(0, State(None), "idle for 900 s")


def test_idle_with_min_scale_keeps_min_scale_replicas() -> None:
    scaling = Scaling(min_scale=1, max_scale=4, target=2, idle_timeout_s=60.0)
    d = decide(Load(seconds_since_request=61.0), scaling, current=3, state=State(0.0), now=61.0)
    assert d.desired == 1
    assert d.reason == "idle, min_scale 1 for 60 s"
    # and stays there on later idle ticks
    again = decide(Load(seconds_since_request=120.0), scaling, current=1, state=d.state, now=120.0)
    assert again.desired == 1


def test_min_scale_replicas_are_started_without_any_request() -> None:
    # No request since the platform started (None) and min_scale 2: run 2.
    scaling = Scaling(min_scale=2, max_scale=4)
    d = decide(Load(seconds_since_request=None), scaling, current=0, state=State(), now=0.0)
    assert d.desired == 2


def test_no_request_ever_and_min_scale_zero_stays_asleep() -> None:
    d = decide(Load(seconds_since_request=None), SCALING, current=0, state=State(), now=0.0)
    assert d.desired == 0


def test_scale_down_waits_for_the_delay_then_happens() -> None:
    # t=0: 8 concurrent -> 4 replicas.
    d = decide(Load(in_flight=8, peak=8, seconds_since_request=0), SCALING, current=0, state=State(), now=0.0)
    assert d.desired == 4
    state = d.state
    # t=10 and t=29: demand fell to 2 (-> 1 replica), but the delay (30 s) has not passed: hold 4.
    for now in (10.0, 29.0):
        d = decide(Load(in_flight=2, peak=2, seconds_since_request=0), SCALING, 4, state, now)
        assert d.desired == 4, now
        assert "holding 4 for the scale-down delay" in d.reason
        assert d.state == state  # holding does not restart the delay
    # t=30: demand has stayed lower for 30 s -> scale down.
    d = decide(Load(in_flight=2, peak=2, seconds_since_request=0), SCALING, 4, state, 30.0)
    assert d.desired == 1
    assert d.state == State(30.0)


def test_a_burst_during_the_delay_restarts_it() -> None:
    state = State(0.0)
    d = decide(Load(in_flight=8, seconds_since_request=0), SCALING, 4, state, now=20.0)
    assert d.desired == 4
    assert d.state == State(20.0)
    # 30 s after the first peak but only 15 s after the second: still holding.
    d = decide(Load(in_flight=1, seconds_since_request=0), SCALING, 4, d.state, now=35.0)
    assert d.desired == 4
    d = decide(Load(in_flight=1, seconds_since_request=0), SCALING, 4, d.state, now=50.0)
    assert d.desired == 1


def test_scale_down_with_no_history_is_immediate() -> None:
    d = decide(Load(in_flight=1, seconds_since_request=0), SCALING, 3, State(None), now=5.0)
    assert d.desired == 1


def test_scale_up_is_immediate_even_inside_the_delay() -> None:
    d = decide(
        Load(in_flight=6, seconds_since_request=0), SCALING, 1, State(last_wanted_more_at=99.0), now=100.0
    )
    assert d.desired == 3
    assert d.state == State(100.0)


def test_max_scale_below_current_scales_down_after_the_delay() -> None:
    # max_scale lowered from 4 to 2 while 4 run with constant demand.
    scaling = Scaling(max_scale=2, target=1, scale_down_delay_s=30.0)
    held = decide(Load(in_flight=4, seconds_since_request=0), scaling, 4, State(0.0), now=10.0)
    assert held.desired == 4
    done = decide(Load(in_flight=4, seconds_since_request=0), scaling, 4, State(0.0), now=40.0)
    assert done.desired == 2
