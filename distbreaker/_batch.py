"""Batched mode: outcomes wait in a per-breaker batch for this process's writer.

The batch is plain bookkeeping shared by the sync and asyncio shells: what is pending, what
is in flight (at most one script call per breaker), which flush() callers wait for what,
and the projection of the pending outcomes onto the shared counters last read from Redis.
The projection is what lets a process stop admitting calls the moment its own unsent
failures would trip the breaker, instead of one round trip later.

The sync shells share one writer thread per process (`ThreadWriter`); an asyncio breaker
runs one drain task while it has outcomes pending. Either sends everything pending for a
breaker (up to ``max_batch`` outcomes) in one record.lua call as soon as the previous call
for that breaker returns: there is no timer, so an idle breaker's first outcome goes out
at once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._config import CircuitBreakerConfig

if TYPE_CHECKING:
    from .breaker import CircuitBreaker

__all__ = ["OutcomeBatch", "ThreadWriter", "thread_writer"]

log = logging.getLogger("distbreaker")

Outcome = tuple[int, int, int]  # generation admitted under, Code, retry_after_ms


class OutcomeBatch:
    """Pending outcomes of one breaker, and the projection onto the shared counters.

    Every method takes the batch's lock briefly; none does I/O.
    """

    __slots__ = ("_frt", "_ft", "_lock", "_minc", "_srt", "_wn", "applied", "base", "busy",
                 "c", "cf", "f", "gen", "pending", "recorded", "s", "sent", "tripped",
                 "waiters")

    def __init__(self, cfg: CircuitBreakerConfig) -> None:
        self._lock = threading.Lock()
        self._ft = cfg.failure_threshold
        self._frt = cfg.failure_rate_threshold
        self._srt = cfg.slow_call_rate_threshold
        self._minc = cfg.minimum_calls
        self._wn = int(cfg.window_size) if cfg.window_type == "count" else 0
        self.pending: list[Outcome] = []
        self.sent = 0  # outcomes in the call in flight
        self.busy = False  # a call is in flight
        self.recorded = 0  # outcomes handed in so far
        self.applied = 0  # outcomes whose call returned (counted, stale, or lost)
        self.waiters: list[tuple[int, Callable[[], None]]] = []
        # shared counters (window calls, failures, slow; consecutive failures) at `gen`,
        # as the last reply said, and the projection: those plus every unapplied outcome
        self.gen = -1
        self.base = (0, 0, 0, 0)
        self.c = self.f = self.s = self.cf = 0
        self.tripped = False

    def reset(self) -> None:
        """Forget everything (a forked child: the parent sends its own outcomes)."""
        self._lock = threading.Lock()
        self.pending = []
        self.sent = 0
        self.busy = False
        self.recorded = self.applied = 0
        self.waiters = []
        self.gen = -1
        self.base = (0, 0, 0, 0)
        self.c = self.f = self.s = self.cf = 0
        self.tripped = False

    # -- the caller's side -----------------------------------------------------------------

    def add(self, gen: int, code: int, retry_after_ms: int) -> tuple[bool, bool]:
        """Queue one outcome. Returns (wake the writer, the projection trips now)."""
        with self._lock:
            self.pending.append((gen, code, retry_after_ms))
            self.recorded += 1
            wake = not self.busy and len(self.pending) == 1
            trips = False
            if code != 4 and gen == self.gen:
                trips = self._project(code)
            return wake, trips

    def _project(self, code: int) -> bool:
        failed = code == 1 or code == 3
        slow = code >= 2
        if self._wn and self.c >= self._wn:
            # a full count window drops its oldest slot, unknown here: assume it was a
            # success, which errs toward stopping early (a reply corrects it)
            pass
        else:
            self.c += 1
        if failed:
            self.f = min(self.f + 1, self.c)
            self.cf += 1
        else:
            self.cf = 0
        if slow:
            self.s = min(self.s + 1, self.c)
        trips = (failed and self.cf >= self._ft) or (
            self.c >= self._minc
            and ((failed and self.f >= self._frt * self.c)
                 or (slow and self.s >= self._srt * self.c))
        )
        if trips:
            self.tripped = True
        return trips

    def outstanding(self) -> int:
        """How many outcomes handed in are not applied yet."""
        return self.recorded - self.applied

    def wait(self, notify: Callable[[], None]) -> bool:
        """Call `notify` once everything recorded so far is applied; False if it already is
        (and `notify` is not called)."""
        with self._lock:
            if self.applied >= self.recorded:
                return False
            self.waiters.append((self.recorded, notify))
            return True

    # -- the writer's side -----------------------------------------------------------------

    def take(self, limit: int) -> list[Outcome] | None:
        """The outcomes for the next call, or None if a call is in flight or none wait."""
        with self._lock:
            if self.busy or not self.pending:
                return None
            out = self.pending[:limit]
            del self.pending[:limit]
            self.busy = True
            self.sent = len(out)
            return out

    def done(self, gen: int, counts: tuple[int, int, int, int] | None
             ) -> tuple[bool, bool, list[Callable[[], None]]]:
        """The call in flight returned (or was lost). `counts` are the shared counters
        right after it (None: unknown). Re-projects what is still pending. Returns (more is
        pending, the projection still trips, the flush waiters to notify once the reply
        is installed)."""
        with self._lock:
            self.applied += self.sent
            self.sent = 0
            self.busy = False
            if counts is None or min(counts) < 0:
                counts = (0, 0, 0, 0) if gen != self.gen else self.base
            self.gen, self.base = gen, counts
            self.c, self.f, self.s, self.cf = counts
            self.tripped = False
            for g, code, _ in self.pending:
                if code != 4 and g == gen:
                    self._project(code)
            fire = [n for t, n in self.waiters if t <= self.applied]
            if fire:
                self.waiters = [(t, n) for t, n in self.waiters if t > self.applied]
            return bool(self.pending), self.tripped, fire

    def adopt(self, gen: int, counts: tuple[int, int, int, int] | None) -> None:
        """A newer generation was seen: project onto its counters (a transition's new
        window is empty)."""
        with self._lock:
            if gen > self.gen:
                self.gen = gen
                self.base = counts if counts is not None and min(counts) >= 0 else (0, 0, 0, 0)
                self.c, self.f, self.s, self.cf = self.base
                self.tripped = False
                for g, code, _ in self.pending:
                    if code != 4 and g == gen:
                        self._project(code)


class ThreadWriter:
    """The sync shells' writer: one daemon thread per process, started on first use, that
    sends each woken breaker's pending outcomes, one call per breaker at a time."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: deque[CircuitBreaker] = deque()
        self._queued: set[int] = set()
        self._thread: threading.Thread | None = None

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def wake(self, breaker: CircuitBreaker) -> None:
        with self._cond:
            if id(breaker) not in self._queued:
                self._queued.add(id(breaker))
                self._ready.append(breaker)
                self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="distbreaker-writer",
                                                daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._ready:
                    self._cond.wait()
                b = self._ready.popleft()
                self._queued.discard(id(b))
            try:
                more = b._flush_once()
            except Exception:  # never let one breaker stop the writer
                log.exception("distbreaker writer failed", extra={"breaker": b.name})
                more = False
            if more:
                self.wake(b)


_writer: list[Any] = [None, -1]  # (ThreadWriter, pid it belongs to)


def thread_writer() -> ThreadWriter:
    """This process's writer (a forked child gets its own)."""
    w, pid = _writer
    if w is None or pid != os.getpid():
        w = ThreadWriter()
        _writer[0], _writer[1] = w, os.getpid()
    return w  # type: ignore[no-any-return]
