"""What a finished call says about the provider: the permit it ran under, and `judge()`.

Classification is pure: it reads the config, the permit and how the call ended, and says
failed / succeeded / says nothing, slow or not, timed out or not. Counting it and telling
Redis are the core's business (`_core.BreakerCore.finish`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from ._config import CircuitBreakerConfig

__all__ = ["Permit", "Verdict", "judge", "retry_after_of"]

log = logging.getLogger("distbreaker")
_perf = time.perf_counter


class Permit:
    """An admitted call. Finish it exactly once; `mark_failure` lets a `protect()` body
    report a failure that raised nothing (an HTTP 503, say)."""

    __slots__ = ("failed", "generation", "ignored", "lease", "record", "retry_after", "started")

    def __init__(self, generation: int, lease: str, record: bool) -> None:
        self.generation = generation
        self.lease = lease
        self.record = record
        self.failed = False
        self.ignored = False
        self.retry_after: float | None = None
        self.started = _perf()

    @property
    def is_probe(self) -> bool:
        return bool(self.lease)

    def mark_failure(self, retry_after: float | None = None) -> None:
        """Record this call as failed even if it returns normally.

        `retry_after` (seconds), e.g. from a provider's Retry-After header, sets the open
        period if this failure trips the breaker.
        """
        self.failed = True
        self.retry_after = retry_after

    def mark_ignored(self) -> None:
        """Count this call as neither success nor failure (it says nothing about the
        provider: a request this process got wrong, a cancellation). A probe's lease goes
        back to the fleet at once."""
        self.ignored = True


#: How one call ended: (failed, slow, timeout, duration, retry_after). `failed` None: it
#: says nothing (ignored, cancelled, excluded). A plain tuple: it is built once per call.
Verdict = tuple[bool | None, bool, bool, float, float | None]


def judge(cfg: CircuitBreakerConfig, permit: Permit, exc: BaseException | None, result: Any,
          timed_out: bool = False, name: str = "") -> Verdict:
    """Classify a finished call by the config: timeouts and recorded exceptions fail,
    ignored exceptions and cancellations say nothing, `is_failure_result` may fail a
    result, and `mark_failure` / `mark_ignored` win over all of these."""
    duration = _perf() - permit.started
    timeout = not permit.ignored and (timed_out or (
        cfg.timeout_duration is not None and duration > cfg.timeout_duration))
    slow = cfg.slow_call_duration is not None and duration > cfg.slow_call_duration
    retry_after = permit.retry_after
    failed: bool | None
    if permit.ignored:
        failed = None
    elif timeout:
        failed = True
    elif exc is not None:
        if not isinstance(exc, Exception) or isinstance(exc, cfg.ignore_exceptions):
            failed = None  # cancellation, interpreter exit, or excluded by config
        else:
            failed = isinstance(exc, cfg.record_exceptions)
            if failed and retry_after is None:
                retry_after = retry_after_of(exc)
    else:
        failed = permit.failed
        if not failed and cfg.is_failure_result is not None:
            try:
                failed = bool(cfg.is_failure_result(result))
            except Exception:
                log.exception("is_failure_result raised; counting the call as failed",
                              extra={"breaker": name})
                failed = True
    return failed, slow, timeout, duration, retry_after


def retry_after_of(exc: BaseException) -> float | None:
    """A `retry_after` attribute (seconds) on the exception, if it carries a usable one."""
    v = getattr(exc, "retry_after", None)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v):
        return float(v)
    return None
