"""Exceptions raised to callers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._config import CircuitState

__all__ = ["CircuitBreakerError", "CircuitOpenError", "RedisMisconfiguredError",
           "StoreUnavailableError"]


class CircuitBreakerError(Exception):
    """Base class of every error distbreaker raises on purpose."""


class CircuitOpenError(CircuitBreakerError):
    """The breaker did not admit the call.

    `retry_after` is how many seconds remain until a call may be admitted, computed from
    Redis time: while OPEN, the rest of the open period; while HALF_OPEN with every probe
    permit taken, when the probes' results are due at the latest (their leases end) if
    `timeout_duration` bounds them, else 0.0 (not known: the breaker may close any
    moment); None while an operator override holds the breaker open.
    """

    # Raised on every rejected call, so it is cheap to make: the fields live in `args`
    # (set in C by the base class) and the message is built only when someone reads it.
    args: tuple[str, CircuitState, float | None]

    if TYPE_CHECKING:  # the constructor is BaseException's, in C
        def __init__(self, name: str, state: CircuitState,
                     retry_after: float | None) -> None: ...

    @property
    def name(self) -> str:
        return self.args[0]

    @property
    def state(self) -> CircuitState:
        return self.args[1]

    @property
    def retry_after(self) -> float | None:
        return self.args[2]

    def __str__(self) -> str:
        if self.retry_after is None:
            when = "held open by an operator override"
        else:
            when = f"retry after {self.retry_after:.3f}s"
        return f"circuit breaker {self.name!r} is {self.state.value}: {when}"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.name, self.state, self.retry_after))


class StoreUnavailableError(CircuitOpenError):
    """Redis is unavailable: raised to a guarded call when the breaker's `on_redis_error`
    policy is ``"deny"``, and by operator actions (force, release, reset), which must
    reach Redis whatever the policy. `detail` says what failed and which policy holds."""

    if TYPE_CHECKING:
        def __init__(self, name: str, state: CircuitState, retry_after: float | None,
                     detail: str = "") -> None: ...

    @property
    def detail(self) -> str:
        return str(self.args[3]) if len(self.args) > 3 else ""

    def __str__(self) -> str:
        detail = self.detail or "Redis is unavailable and on_redis_error is 'deny'"
        return f"circuit breaker {self.name!r}: {detail}"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.name, self.state, self.retry_after, self.detail))


class RedisMisconfiguredError(CircuitBreakerError):
    """Redis refuses distbreaker for a reason waiting will not fix: wrong credentials, a
    missing ACL permission, no such database. Raised by `check_redis()`."""
