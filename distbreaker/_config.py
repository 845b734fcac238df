"""Breaker configuration and states.

The config is frozen and validated once, at construction, so a mistake shows up where the
breaker is defined and not in the middle of an outage. The part the Lua scripts need is
encoded once into a compact string (`script_arg`) and fingerprinted, so every script call
passes a single argument and processes whose configs differ can be detected.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal

__all__ = ["DEFAULT_PROBE_LEASE_S", "CircuitBreakerConfig", "CircuitState"]

#: Lease of a half-open probe when `timeout_duration` is not set: a crashed prober
#: frees its permit after this long.
DEFAULT_PROBE_LEASE_S = 10.0


class CircuitState(str, enum.Enum):
    """The three breaker states; the values are what Redis stores in the `state` field."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __str__(self) -> str:
        return self.value


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")


def _check_float(
    name: str, value: object, lo: float, hi: float, *, lo_open: bool = False
) -> None:
    rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in {rng}, got {value!r}")
    v = float(value)
    if math.isnan(v) or v > hi or v < lo or (lo_open and v == lo):
        raise ValueError(f"{name} must be in {rng}, got {value!r}")


def _check_exc_tuple(name: str, value: object) -> None:
    ok = isinstance(value, tuple) and all(
        isinstance(e, type) and issubclass(e, BaseException) for e in value
    )
    if not ok:
        raise ValueError(f"{name} must be a tuple of exception classes, got {value!r}")


_DAY_S = 86400.0
DEFAULT_MAX_RECOVERY_S = 300.0
DEFAULT_MINIMUM_CALLS = 10


@dataclass(frozen=True, eq=False)
class CircuitBreakerConfig:
    """How one breaker decides. Every field is checked in `__post_init__`.

    Times are in seconds. A call is recorded as a failure when it raises one of
    `record_exceptions` (and none of `ignore_exceptions`, which count as neither outcome),
    when `is_failure_result(result)` is true, or when it runs longer than
    `timeout_duration`. It is slow when it runs longer than `slow_call_duration`.
    """

    failure_threshold: int = 5
    recovery_timeout: float = 30.0
    success_threshold: int = 2
    timeout_duration: float | None = None
    failure_rate_threshold: float = 0.5
    minimum_calls: int | None = None
    window_type: Literal["time", "count"] = "time"
    window_size: float = 60.0
    window_buckets: int = 10
    slow_call_duration: float | None = None
    slow_call_rate_threshold: float = 1.0
    half_open_max_calls: int = 1
    max_recovery_timeout: float | None = None
    backoff_multiplier: float = 2.0
    backoff_jitter: float = 0.1
    probe_lease: float | None = None
    max_staleness: float = 2.0
    key_ttl: float | None = None
    record_exceptions: tuple[type[BaseException], ...] = (Exception,)
    ignore_exceptions: tuple[type[BaseException], ...] = ()
    is_failure_result: Callable[[Any], bool] | None = field(default=None, compare=False)
    consistency: Literal["strict", "batched"] = "strict"
    max_batch: int = 1024
    batch_linger: float = 0.0
    redis_timeout: float = 0.05
    on_redis_error: Literal["local", "allow", "deny"] = "local"
    failover_after: float = 0.5
    redis_background_timeout: float = 5.0

    def __post_init__(self) -> None:
        _check_int("failure_threshold", self.failure_threshold, 1, 1_000_000)
        _check_float("recovery_timeout", self.recovery_timeout, 0.0, _DAY_S, lo_open=True)
        _check_int("success_threshold", self.success_threshold, 1, 10_000)
        if self.timeout_duration is not None:
            _check_float("timeout_duration", self.timeout_duration, 0.0, _DAY_S, lo_open=True)
        _check_float("failure_rate_threshold", self.failure_rate_threshold, 0.0, 1.0, lo_open=True)
        if self.minimum_calls is not None:
            _check_int("minimum_calls", self.minimum_calls, 1, 1_000_000)
        if self.window_type not in ("time", "count"):
            raise ValueError(f"window_type must be 'time' or 'count', got {self.window_type!r}")
        if self.window_type == "count":
            _check_int("window_size", self.window_size, 1, 10_000)
        else:
            _check_float("window_size", self.window_size, 0.0, _DAY_S, lo_open=True)
            _check_int("window_buckets", self.window_buckets, 1, 120)
            if self.window_size * 1000 / self.window_buckets < 1:
                raise ValueError(
                    "window_size / window_buckets must be at least 1 ms, got "
                    f"{self.window_size!r} s over {self.window_buckets!r} buckets"
                )
        if self.slow_call_duration is not None:
            _check_float("slow_call_duration", self.slow_call_duration, 0.0, _DAY_S, lo_open=True)
        _check_float(
            "slow_call_rate_threshold", self.slow_call_rate_threshold, 0.0, 1.0, lo_open=True
        )
        _check_int("half_open_max_calls", self.half_open_max_calls, 1, 10_000)
        if self.max_recovery_timeout is not None:
            _check_float("max_recovery_timeout", self.max_recovery_timeout, 0.0, 7 * _DAY_S,
                         lo_open=True)
        if self.max_recovery_timeout is not None and (
                self.max_recovery_timeout < self.recovery_timeout):
            raise ValueError(
                f"max_recovery_timeout ({self.max_recovery_timeout!r}) must be >= "
                f"recovery_timeout ({self.recovery_timeout!r})"
            )
        _check_float("backoff_multiplier", self.backoff_multiplier, 1.0, 100.0)
        _check_float("backoff_jitter", self.backoff_jitter, 0.0, 1.0)
        if self.probe_lease is not None:
            _check_float("probe_lease", self.probe_lease, 0.0, _DAY_S, lo_open=True)
        _check_float("max_staleness", self.max_staleness, 0.0, 3600.0, lo_open=True)
        if self.key_ttl is not None:
            _check_float("key_ttl", self.key_ttl, 1.0, 365 * _DAY_S)
        if (self.window_type == "count" and self.minimum_calls is not None
                and self.minimum_calls > self.window_size):
            raise ValueError(
                f"minimum_calls ({self.minimum_calls!r}) must be <= window_size "
                f"({self.window_size!r}) for a count window, or the rate rules never apply"
            )
        if (self.probe_lease is not None and self.timeout_duration is not None
                and self.probe_lease < self.timeout_duration):
            raise ValueError(
                f"probe_lease ({self.probe_lease!r}) must be >= timeout_duration "
                f"({self.timeout_duration!r}), or a probe's permit expires while it runs"
            )
        if self.key_ttl is not None and self.key_ttl < self.effective_max_recovery_timeout:
            raise ValueError(
                f"key_ttl ({self.key_ttl!r}) must be >= max_recovery_timeout "
                f"({self.effective_max_recovery_timeout!r}), or an open breaker could expire"
            )
        _check_exc_tuple("record_exceptions", self.record_exceptions)
        _check_exc_tuple("ignore_exceptions", self.ignore_exceptions)
        if self.is_failure_result is not None and not callable(self.is_failure_result):
            raise ValueError(
                f"is_failure_result must be a callable or None, got {self.is_failure_result!r}"
            )
        _check_float("redis_timeout", self.redis_timeout, 0.0, 60.0, lo_open=True)
        _check_float("failover_after", self.failover_after, 0.0, 60.0, lo_open=True)
        _check_float("redis_background_timeout", self.redis_background_timeout, 0.0, 300.0,
                     lo_open=True)
        if self.redis_background_timeout < self.redis_timeout:
            raise ValueError(
                f"redis_background_timeout ({self.redis_background_timeout!r}) must be >= "
                f"redis_timeout ({self.redis_timeout!r}): it is how long a request whose "
                "caller went on may still take"
            )
        if self.on_redis_error not in ("local", "allow", "deny"):
            raise ValueError(
                f"on_redis_error must be 'local', 'allow' or 'deny', got {self.on_redis_error!r}"
            )
        if self.consistency not in ("strict", "batched"):
            raise ValueError(
                f"consistency must be 'strict' or 'batched', got {self.consistency!r}"
            )
        _check_int("max_batch", self.max_batch, 1, 10_000)
        _check_float("batch_linger", self.batch_linger, 0.0, 1.0)
        arg = self._encode()
        object.__setattr__(self, "_script_arg", arg)
        object.__setattr__(self, "_fingerprint", hashlib.sha1(arg.encode()).hexdigest()[:12])

    # -- equality: by the values in force --------------------------------------------------

    def _key(self) -> tuple[Any, ...]:
        eff = {"max_recovery_timeout": self.effective_max_recovery_timeout,
               "key_ttl": self.effective_key_ttl,
               "minimum_calls": self.effective_minimum_calls}
        return tuple(eff.get(f.name, getattr(self, f.name)) for f in fields(self) if f.compare)

    def __eq__(self, other: object) -> bool:
        """Configs that decide alike are equal: a default that follows another field
        equals the value it stands for."""
        if not isinstance(other, CircuitBreakerConfig):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # -- derived values -----------------------------------------------------------------
    # Fields left at None take a default that never conflicts with the others' values.

    @property
    def effective_max_recovery_timeout(self) -> float:
        """`max_recovery_timeout`, or by default 300 s (longer if recovery_timeout is)."""
        if self.max_recovery_timeout is not None:
            return self.max_recovery_timeout
        return max(DEFAULT_MAX_RECOVERY_S, self.recovery_timeout)

    @property
    def effective_key_ttl(self) -> float:
        """`key_ttl`, or by default a day (longer if the longest open period is)."""
        if self.key_ttl is not None:
            return self.key_ttl
        return max(_DAY_S, self.effective_max_recovery_timeout)

    @property
    def effective_minimum_calls(self) -> int:
        """`minimum_calls`, or by default 10 (fewer for a smaller count window)."""
        if self.minimum_calls is not None:
            return self.minimum_calls
        if self.window_type == "count":
            return min(DEFAULT_MINIMUM_CALLS, int(self.window_size))
        return DEFAULT_MINIMUM_CALLS

    @property
    def lease_s(self) -> float:
        """TTL of a half-open probe lease: how long a crashed prober can hold a permit."""
        if self.probe_lease is not None:
            return self.probe_lease
        if self.timeout_duration is not None:
            return self.timeout_duration
        return DEFAULT_PROBE_LEASE_S

    @property
    def script_arg(self) -> str:
        """The rule parameters as one comma-separated string, the scripts' ARGV[1]."""
        return self._script_arg  # type: ignore[attr-defined, no-any-return]

    @property
    def fingerprint(self) -> str:
        """Short hash of `script_arg`; stored in Redis to detect config drift."""
        return self._fingerprint  # type: ignore[attr-defined, no-any-return]

    def _encode(self) -> str:
        # Order is the contract with lua/*.lua (see the header of record.lua).
        count = self.window_type == "count"
        parts: list[int | float] = [
            self.failure_threshold,
            _ms(self.recovery_timeout),
            self.success_threshold,
            self.failure_rate_threshold,
            self.effective_minimum_calls,
            1 if count else 0,
            int(self.window_size) if count else self.window_buckets,
            0 if count else max(1, _ms(self.window_size) // self.window_buckets),
            self.slow_call_rate_threshold,
            self.half_open_max_calls,
            _ms(self.effective_max_recovery_timeout),
            self.backoff_multiplier,
            self.backoff_jitter,
            _ms(self.lease_s),
            _ms(self.effective_key_ttl),
        ]
        return ",".join(repr(p) if isinstance(p, float) else str(p) for p in parts)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
