"""Config validation, names, client types: every bad input names the problem."""

from __future__ import annotations

from typing import Any

import pytest
import redis
import redis.asyncio

from distbreaker import AsyncCircuitBreaker, CircuitBreaker, CircuitBreakerConfig, CircuitState
from distbreaker._keys import validate_name


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("failure_threshold", 0, "[1,"),
        ("failure_threshold", 2.5, "integer"),
        ("failure_threshold", True, "integer"),
        ("recovery_timeout", 0, "(0,"),
        ("recovery_timeout", -1, "recovery_timeout"),
        ("recovery_timeout", float("nan"), "recovery_timeout"),
        ("success_threshold", 0, "success_threshold"),
        ("timeout_duration", 0, "timeout_duration"),
        ("failure_rate_threshold", 0, "(0, 1]"),
        ("failure_rate_threshold", 1.5, "(0, 1]"),
        ("minimum_calls", 0, "minimum_calls"),
        ("window_type", "sliding", "'time' or 'count'"),
        ("window_size", 0, "window_size"),
        ("window_buckets", 0, "window_buckets"),
        ("slow_call_duration", -1, "slow_call_duration"),
        ("slow_call_rate_threshold", 0, "slow_call_rate_threshold"),
        ("half_open_max_calls", 0, "half_open_max_calls"),
        ("max_recovery_timeout", 1, "max_recovery_timeout"),
        ("backoff_multiplier", 0.5, "backoff_multiplier"),
        ("backoff_jitter", 2, "backoff_jitter"),
        ("probe_lease", 0, "probe_lease"),
        ("max_staleness", 0, "max_staleness"),
        ("key_ttl", 10, "key_ttl"),
        ("record_exceptions", (int,), "exception classes"),
        ("ignore_exceptions", ValueError, "tuple"),
        ("is_failure_result", 3, "callable"),
        ("consistency", "eventual", "consistency"),
    ],
)
def test_bad_config_values_name_the_field(field: str, value: Any, words: str) -> None:
    with pytest.raises(ValueError) as ei:
        CircuitBreakerConfig(**{field: value})
    assert field in str(ei.value) and words in str(ei.value)


def test_count_window_size_must_be_whole_calls() -> None:
    with pytest.raises(ValueError, match="window_size"):
        CircuitBreakerConfig(window_type="count", window_size=10.5)
    assert CircuitBreakerConfig(window_type="count", window_size=100).window_size == 100


def test_config_is_frozen_and_fingerprinted() -> None:
    a, b = CircuitBreakerConfig(), CircuitBreakerConfig(failure_threshold=6)
    with pytest.raises(AttributeError):
        a.failure_threshold = 3  # type: ignore[misc]
    assert a.fingerprint == CircuitBreakerConfig().fingerprint != b.fingerprint
    assert a.lease_s == 10.0
    assert CircuitBreakerConfig(timeout_duration=2.0).lease_s == 2.0


def test_state_values() -> None:
    assert [s.value for s in CircuitState] == ["closed", "open", "half_open"]


@pytest.mark.parametrize(
    ("name", "words"),
    [("", "empty"), ("a" * 201, "at most"), ("a{b", "hash tag"), ("a}b", "hash tag"),
     ("a\nb", "control"), ("a b", "whitespace"), (5, "str")],
)
def test_bad_names(name: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        validate_name(name)
    with pytest.raises(ValueError):
        CircuitBreaker(name)


def test_wrong_client_types_say_what_to_pass() -> None:
    with pytest.raises(TypeError, match=r"redis.Redis.from_url"):
        CircuitBreaker("x", redis="redis://localhost")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="AsyncCircuitBreaker"):
        CircuitBreaker("x", redis=redis.asyncio.Redis())
    with pytest.raises(TypeError, match="CircuitBreaker"):
        AsyncCircuitBreaker("x", redis=redis.Redis())
    with pytest.raises(TypeError, match="redis-py client"):
        CircuitBreaker("x", redis=object())
    with pytest.raises(TypeError, match="CircuitBreakerConfig"):
        CircuitBreaker("x", {"failure_threshold": 3})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(window_type="count", window_size=5, minimum_calls=10), "minimum_calls"),
        (dict(timeout_duration=5.0, probe_lease=1.0), "probe_lease"),
        (dict(recovery_timeout=60, max_recovery_timeout=30), "max_recovery_timeout"),
        (dict(key_ttl=100, max_recovery_timeout=300), "key_ttl"),
        (dict(window_size=0.005, window_buckets=10), "window_size / window_buckets"),
        (dict(redis_timeout=0), "redis_timeout"),
        (dict(on_redis_error="ignore"), "on_redis_error"),
    ],
)
def test_bad_combinations_name_both_fields(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("/", r"\/")):
        CircuitBreakerConfig(**kwargs)
