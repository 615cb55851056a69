"""functions.settings: durations, and Settings from defaults, PADDLEFN_* variables and explicit overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from functions.settings import Settings, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("4s", 4.0),
        ("15m", 900.0),
        ("250ms", 0.25),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        (" 7 s ", 7.0),
        ("10", 10.0),
        ("0", 0.0),
        ("0.5", 0.5),
        (3, 3.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize("text", ["soon", "15 minutes", "4S", "-5s", "1e3", "", "s", "5s5", "1h30m", ".5s"])
def test_parse_duration_refuses_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == f"'{text}' is not a duration: use a number with ms, s, m, h or d (e.g. 15m)"


def test_parse_duration_refuses_negative_numbers() -> None:
    with pytest.raises(ValueError, match=r"^duration must not be negative, got -1$"):
        parse_duration(-1)
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration(-0.001)


def test_parse_duration_refuses_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        parse_duration(float("nan"))


def test_defaults_without_any_variable() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert s.port == 8080
    assert s.idle_timeout_s == 900.0
    assert s.data_dir == Path(".paddlefn")
    assert s.base_url == "http://127.0.0.1:8080"
    assert s.database == f"sqlite:///{(Path('.paddlefn') / 'paddlefn.db').resolve()}"


def test_from_env_reads_and_converts_every_kind_of_field() -> None:
    env = {
        "PADDLEFN_HOST": "0.0.0.0",
        "PADDLEFN_PORT": "9090",
        "PADDLEFN_DATA_DIR": "/srv/paddlefn",
        "PADDLEFN_IDLE_TIMEOUT_S": "4s",
        "PADDLEFN_COLD_START_TIMEOUT_S": "250ms",
        "PADDLEFN_SCALE_DOWN_DELAY_S": "2",
        "PADDLEFN_DEPLOY_TIMEOUT_S": "1h",
        "PADDLEFN_POOL_SIZE": "3",
        "PADDLEFN_MAX_REQUEST_BYTES": "1024",
        "PADDLEFN_DEVICE": "cpu",
        "PADDLEFN_DATABASE_URL": "postgresql+psycopg://u:p@db/paddlefn",
        "UNRELATED": "x",
    }
    s = Settings.from_env(env)
    assert s.host == "0.0.0.0"
    assert s.port == 9090
    assert s.data_dir == Path("/srv/paddlefn")
    assert isinstance(s.data_dir, Path)
    assert s.idle_timeout_s == 4.0
    assert s.cold_start_timeout_s == 0.25
    assert s.scale_down_delay_s == 2.0
    assert s.deploy_timeout_s == 3600.0
    assert s.pool_size == 3
    assert s.max_request_bytes == 1024
    assert s.device == "cpu"
    assert s.database == "postgresql+psycopg://u:p@db/paddlefn"
    # 0.0.0.0 is not an address clients can use: the base URL falls back to loopback.
    assert s.base_url == "http://127.0.0.1:9090"
    # untouched fields keep their defaults
    assert s.max_workers == Settings().max_workers
    assert s.request_timeout_s == 60.0


def test_from_env_uses_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PADDLEFN_PORT", "7070")
    monkeypatch.setenv("PADDLEFN_IDLE_TIMEOUT_S", "15m")
    s = Settings.from_env()
    assert s.port == 7070
    assert s.idle_timeout_s == 900.0


def test_overrides_win_over_variables_and_none_is_ignored() -> None:
    env = {"PADDLEFN_PORT": "9090", "PADDLEFN_IDLE_TIMEOUT_S": "4s", "PADDLEFN_POOL_SIZE": "3"}
    s = Settings.from_env(env, port=1234, idle_timeout_s=None, pool_size=None, device="gpu")
    assert s.port == 1234
    assert s.idle_timeout_s == 4.0  # None override: the variable stays
    assert s.pool_size == 3
    assert s.device == "gpu"


def test_extra_is_not_read_from_the_environment() -> None:
    s = Settings.from_env({"PADDLEFN_EXTRA": "{'a': 1}"})
    assert s.extra == {}


@pytest.mark.parametrize(
    ("variable", "value", "detail"),
    [
        ("PADDLEFN_IDLE_TIMEOUT_S", "soon", "'soon' is not a duration"),
        ("PADDLEFN_SCALER_TICK_S", "-1", "'-1' is not a duration"),
        ("PADDLEFN_PORT", "http", "invalid literal for int()"),
        ("PADDLEFN_POOL_SIZE", "2.5", "invalid literal for int()"),
        ("PADDLEFN_MAX_UPLOAD_BYTES", "2GB", "invalid literal for int()"),
    ],
)
def test_a_bad_variable_is_named_in_the_error(variable: str, value: str, detail: str) -> None:
    with pytest.raises(ValueError) as info:
        Settings.from_env({variable: value})
    message = str(info.value)
    assert message.startswith(f"{variable}={value!r}: "), message
    assert detail in message


def test_public_url_and_worker_limits() -> None:
    s = Settings.from_env({"PADDLEFN_PUBLIC_URL": "https://fn.example.com/", "PADDLEFN_MAX_WORKERS": "6"})
    assert s.base_url == "https://fn.example.com"
    assert s.max_workers == 6 and s.lite_worker_limit == 6
    # Compute (requests in flight) is bounded by cores, apart from how many workers may be warm (memory).
    assert Settings().in_flight_capacity == 8 * (os.cpu_count() or 1)
    assert Settings(max_workers=1000).in_flight_capacity == Settings().in_flight_capacity


def test_worker_start_is_fork_or_spawn() -> None:
    assert Settings().worker_start == "fork"
    assert Settings.from_env({"PADDLEFN_WORKER_START": "spawn"}).worker_start == "spawn"
    with pytest.raises(ValueError, match="worker_start must be 'fork' or 'spawn'"):
        Settings.from_env({"PADDLEFN_WORKER_START": "clone"})
