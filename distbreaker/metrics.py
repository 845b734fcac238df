"""Per-process call metrics, plus the fleet-wide window read from the store."""

from __future__ import annotations

import itertools
import threading
import time
from array import array
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["HISTORY_SIZE", "CircuitBreakerMetrics", "FleetWindow", "RequestRecord"]

HISTORY_SIZE = 100
# Latency samples for the mean and p95: the last 256 calls. Rings are arrays of doubles
# and flag bytes that grow as calls come and stop at their size: a breaker with traffic
# held 50 KB of float and tuple objects in lists (1,024 samples and 100 records), 3 KB now.
_LAT_RING = 256
_FAILED, _IGNORED, _SLOW, _TIMEOUT = 1, 2, 4, 8
assert _LAT_RING >= HISTORY_SIZE  # a record's latency is read from the latency ring


@dataclass(frozen=True)
class FleetWindow:
    """The shared sliding window as the store holds it right now (every process's calls)."""

    calls: int
    failures: int
    slow: int
    consecutive_failures: int
    half_open_successes: int
    reopen_count: int
    active_probes: int
    generation: int
    config_fingerprint: str

    @property
    def failure_rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0


@dataclass(frozen=True)
class RequestRecord:
    """One finished call, in `CircuitBreakerMetrics.request_history`."""

    at: float  # wall-clock time (time.time()) when it finished
    latency_s: float
    outcome: str  # "success", "failure" or "ignored"
    slow: bool = False
    timeout: bool = False


@dataclass(frozen=True)
class CircuitBreakerMetrics:
    """What this process saw, and (`fleet`) what the whole fleet's window holds.

    The seed's names read the same counts: `total_requests`, `successful_requests`,
    `failed_requests`; `failure_rate` and `success_rate` are computed.
    """

    name: str = ""
    state: str = "closed"
    total_calls: int = 0
    successful_calls: int = 0
    failed_calls: int = 0
    rejected_calls: int = 0
    slow_calls: int = 0
    timeouts: int = 0
    ignored_calls: int = 0
    stale_outcomes: int = 0
    state_changes: int = 0
    probes: int = 0
    mean_latency_s: float = 0.0
    p95_latency_s: float = 0.0
    fleet: FleetWindow | None = field(default=None)
    store_degraded: bool = False
    #: batched mode: record calls the writer sent, outcomes recorded but not yet applied,
    #: and outcomes dropped because their call failed or was interrupted
    batches: int = 0
    pending_outcomes: int = 0
    lost_outcomes: int = 0
    #: outcomes applied only to this process's local fallback (Redis unavailable): they
    #: never reached the shared window. Outcomes whose reply came after redis_timeout are
    #: not here: they reached it, late. `lost_outcomes` counts those whose fate is unknown
    #: (sent, but no reply even within redis_background_timeout).
    unshared_outcomes: int = 0
    #: times this process failed over from Redis to the local fallback (for this breaker's
    #: Redis server), and whether Redis refuses it for a configuration reason right now
    store_failovers: int = 0
    store_misconfigured: bool = False
    #: the last HISTORY_SIZE finished calls of this process, oldest first
    request_history: tuple[RequestRecord, ...] = ()

    @property
    def total_requests(self) -> int:
        return self.total_calls

    @property
    def successful_requests(self) -> int:
        return self.successful_calls

    @property
    def failed_requests(self) -> int:
        return self.failed_calls

    @property
    def failure_rate(self) -> float:
        done = self.successful_calls + self.failed_calls
        return self.failed_calls / done if done else 0.0

    @property
    def success_rate(self) -> float:
        done = self.successful_calls + self.failed_calls
        return self.successful_calls / done if done else 1.0

    def __await__(self) -> Generator[Any, None, CircuitBreakerMetrics]:
        """Awaitable to itself: the seed's asyncio code awaits get_metrics()."""
        return self
        yield

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failure_rate"] = self.failure_rate
        d["success_rate"] = self.success_rate
        d["total_requests"] = self.total_calls
        d["successful_requests"] = self.successful_calls
        d["failed_requests"] = self.failed_calls
        return d


_SEED_NAMES = {"total_requests": "total_calls", "successful_requests": "successful_calls",
               "failed_requests": "failed_calls"}
_dataclass_init = CircuitBreakerMetrics.__init__


def _init_with_seed_names(self: CircuitBreakerMetrics, *args: Any, **kw: Any) -> None:
    """The seed built metrics with its names (total_requests=...): accept them too."""
    for seed, name in _SEED_NAMES.items():
        if seed in kw:
            if name in kw:
                raise TypeError(f"pass {seed} or {name}, not both")
            kw[name] = kw.pop(seed)
    _dataclass_init(self, *args, **kw)


CircuitBreakerMetrics.__init__ = _init_with_seed_names  # type: ignore[method-assign]


class Counters:
    """Thread-safe process-local counters with a bounded latency sample ring."""

    __slots__ = (
        "_at",
        "_flags",
        "_lat",
        "_lock",
        "_n",
        "_rejected",
        "batches",
        "failed",
        "ignored",
        "lost",
        "probes",
        "slow",
        "stale",
        "state_changes",
        "successful",
        "timeouts",
        "total",
        "unshared",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Call number c (of `_n` since the last clear) sits at c % size in each ring: the
        # latency of the last _LAT_RING calls, and for the last HISTORY_SIZE their
        # wall-clock time and outcome flags (RequestRecords are built when read).
        self._lat = array("d")
        self._at = array("d")
        self._flags = bytearray()
        self._n = 0
        self.total = self.successful = self.failed = 0
        self._rejected = itertools.count()
        self.slow = self.timeouts = self.ignored = self.stale = self.state_changes = 0
        self.probes = self.batches = self.lost = self.unshared = 0

    def after_fork(self) -> None:
        self._lock = threading.Lock()  # the parent may have held it while forking
        # a fork in the middle of `outcome` may have appended to some rings and not
        # counted the call: cut each back to what `_n` says
        n = self._n
        del self._lat[min(n, _LAT_RING):]
        del self._at[min(n, HISTORY_SIZE):]
        del self._flags[min(n, HISTORY_SIZE):]

    def reject(self) -> None:
        next(self._rejected)  # atomic without the lock: this runs on every rejected call

    def outcome(self, failed: bool | None, duration: float, slow: bool, timeout: bool) -> None:
        flags = ((_IGNORED if failed is None else _FAILED if failed else 0)
                 | (_SLOW if slow else 0) | (_TIMEOUT if timeout else 0))
        with self._lock:
            self.total += 1
            if failed is None:
                self.ignored += 1
            elif failed:
                self.failed += 1
            else:
                self.successful += 1
            self.slow += slow
            self.timeouts += timeout
            n = self._n
            if n < _LAT_RING:
                self._lat.append(duration)
            else:
                self._lat[n % _LAT_RING] = duration
            if n < HISTORY_SIZE:
                self._at.append(time.time())
                self._flags.append(flags)
            else:
                h = n % HISTORY_SIZE
                self._at[h] = time.time()
                self._flags[h] = flags
            self._n = n + 1

    @property
    def rejected(self) -> int:
        return int(repr(self._rejected)[6:-1])  # "count(N)": next() is the atomic part

    def add(self, attr: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, attr, getattr(self, attr) + n)

    def view(self, name: str, state: str, fleet: FleetWindow | None,
             store_degraded: bool = False, pending: int = 0, failovers: int = 0,
             misconfigured: bool = False) -> CircuitBreakerMetrics:
        with self._lock:
            lat = sorted(self._lat)
            mean = sum(lat) / len(lat) if lat else 0.0
            p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else 0.0
            history = self._history()
            return CircuitBreakerMetrics(
                name, state, self.total, self.successful, self.failed, self.rejected,
                self.slow, self.timeouts, self.ignored, self.stale, self.state_changes,
                self.probes, mean, p95, fleet, store_degraded, self.batches, pending,
                self.lost, self.unshared, failovers, misconfigured,
                history,
            )

    def _history(self) -> tuple[RequestRecord, ...]:
        """The last HISTORY_SIZE calls, oldest first (under the lock)."""
        m = len(self._at)
        out = []
        for c in range(self._n - m, self._n):
            f = self._flags[c % HISTORY_SIZE]
            outcome = "ignored" if f & _IGNORED else "failure" if f & _FAILED else "success"
            out.append(RequestRecord(self._at[c % HISTORY_SIZE], self._lat[c % _LAT_RING],
                                     outcome, bool(f & _SLOW), bool(f & _TIMEOUT)))
        return tuple(out)

    def clear(self) -> None:
        with self._lock:
            self._lat = array("d")
            self._at = array("d")
            self._flags = bytearray()
            self._n = 0
            self.total = self.successful = self.failed = 0
            self._rejected = itertools.count()
            self.slow = self.timeouts = self.ignored = self.stale = self.state_changes = 0
            self.probes = self.batches = self.lost = self.unshared = 0
