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

import heapq
import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._config import CircuitBreakerConfig

if TYPE_CHECKING:
    from .breaker import CircuitBreaker

__all__ = ["OutcomeBatch", "ThreadWriter", "thread_writer"]

log = logging.getLogger("distbreaker")

Run = list[int]  # [generation admitted under, Code, retry_after_ms, count]


class _Seg:
    """What a stretch of outcomes adds to the shared counters: window calls, failures and
    slow calls, the failures since its last non-failure, and whether it has one (which
    resets the consecutive count)."""

    __slots__ = ("c", "f", "reset", "s", "tail")

    def __init__(self) -> None:
        self.c = self.f = self.s = self.tail = 0
        self.reset = False

    def add(self, failed: bool, slow: bool, n: int = 1) -> None:
        """Add `n` equal outcomes."""
        self.c += n
        if failed:
            self.f += n
            self.tail += n
        else:
            self.tail = 0
            self.reset = True
        if slow:
            self.s += n


class OutcomeBatch:
    """Pending outcomes of one breaker, and the projection onto the shared counters.

    Outcomes are kept as runs of equal ones (a burst of successes is one run), and the
    projection from running sums, so that recording an outcome and answering a reply cost
    the same however far the writer is behind. Every method takes the batch's lock
    briefly; none does I/O.
    """

    __slots__ = ("_frt", "_ft", "_limit", "_linger", "_lock", "_minc", "_srt", "_wn", "applied",
                 "base",
                 "first_at", "gen", "pend", "pending", "recorded", "sent",
                 "sent_seg", "tripped", "urgent", "waiters")

    def __init__(self, cfg: CircuitBreakerConfig) -> None:
        self._ft = cfg.failure_threshold
        self._frt = cfg.failure_rate_threshold
        self._srt = cfg.slow_call_rate_threshold
        self._minc = cfg.effective_minimum_calls
        self._wn = int(cfg.window_size) if cfg.window_type == "count" else 0
        self._linger = cfg.batch_linger
        self._limit = cfg.max_batch
        self.reset()

    def reset(self) -> None:
        """Start empty (also in a forked child: the parent sends its own outcomes)."""
        self._lock = threading.Lock()
        self.pending: deque[Run] = deque()
        self.sent = 0  # outcomes in the call in flight (0: none in flight)
        self.recorded = 0  # outcomes handed in so far
        self.applied = 0  # outcomes whose call returned (counted, stale, or lost)
        self.waiters: list[tuple[int, Callable[[], None]]] = []
        # the shared counters at `gen` as the last reply said (window calls, failures,
        # slow, consecutive failures); what the call in flight and the pending outcomes add
        self.gen = -1
        self.base = (0, 0, 0, 0)
        self.sent_seg = _Seg()
        self.pend = _Seg()
        self.tripped = False
        self.first_at = math.inf  # when the oldest pending outcome was handed in
        self.urgent = False  # send without waiting for the linger: flush() or a trip

    @property
    def busy(self) -> bool:
        """A call is in flight (every call carries at least one outcome)."""
        return self.sent > 0

    # -- the projection --------------------------------------------------------------------

    def projected(self) -> tuple[int, int, int, int]:
        """Window calls, failures, slow calls and consecutive failures once every outcome
        handed in is applied (a full count window is assumed to drop successes, which
        errs toward stopping early; the next reply corrects it)."""
        c0, f0, s0, cf = self.base
        a, b = self.sent_seg, self.pend
        c, f, s = c0 + a.c + b.c, f0 + a.f + b.f, s0 + a.s + b.s
        if self._wn and c > self._wn:
            c = self._wn
            f, s = min(f, c), min(s, c)
        for seg in (a, b):
            cf = seg.tail if seg.reset else cf + seg.tail
        return c, f, s, cf

    def _trips(self, failed: bool, slow: bool) -> bool:
        c, f, s, cf = self.projected()
        return (failed and cf >= self._ft) or (
            c >= self._minc
            and ((failed and f >= self._frt * c) or (slow and s >= self._srt * c)))

    # -- the caller's side -----------------------------------------------------------------

    def add(self, gen: int, code: int, retry_after_ms: int) -> tuple[bool, bool]:
        """Queue one outcome. Returns (wake the writer, the projection trips now)."""
        with self._lock:
            p = self.pending
            if not p:
                self.first_at = time.monotonic() if self._linger else 0.0
            if p and p[-1][0] == gen and p[-1][1] == code and p[-1][2] == retry_after_ms:
                p[-1][3] += 1
            else:
                p.append([gen, code, retry_after_ms, 1])
            self.recorded += 1
            n = self.recorded - self.applied
            # the first outcome of an idle breaker, or (lingering) a full batch
            wake = (not self.busy and n == 1) or (self._linger > 0 and n == self._limit)
            if code == 4 or gen != self.gen:
                return wake, False
            failed, slow = code == 1 or code == 3, code >= 2
            self.pend.add(failed, slow)
            trips = (failed or slow) and self._trips(failed, slow)
            if trips:
                self.tripped = self.urgent = True
            return wake, trips

    def hurry(self) -> None:
        """Send what is pending without waiting for the linger (flush())."""
        with self._lock:
            if self.pending:
                self.urgent = True

    def due(self) -> float:
        """When (monotonic) the pending outcomes are to be sent; inf: nothing to send
        (none pending, or a call in flight whose return sends the rest)."""
        with self._lock:
            if self.busy or not self.pending:
                return math.inf
            if self.urgent or self.recorded - self.applied >= self._limit:
                return 0.0
            return self.first_at + self._linger

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

    def unwait(self, notify: Callable[[], None]) -> None:
        """Forget a waiter (its flush() timed out)."""
        with self._lock:
            self.waiters = [(t, n) for t, n in self.waiters if n != notify]

    # -- the writer's side -----------------------------------------------------------------

    def take(self, limit: int) -> list[Run] | None:
        """Runs of at most `limit` outcomes for the next call, or None if a call is in
        flight, none wait, or they wait for the linger (see `due`)."""
        with self._lock:
            if self.busy or not self.pending:
                return None
            if (self._linger and not self.urgent
                    and self.recorded - self.applied < limit
                    and time.monotonic() < self.first_at + self._linger):
                return None
            out: list[Run] = []
            n = 0
            p = self.pending
            while p and n < limit:
                run = p[0]
                if n + run[3] <= limit:
                    out.append(p.popleft())
                    n += run[3]
                else:
                    k = limit - n
                    out.append([run[0], run[1], run[2], k])
                    run[3] -= k
                    n = limit
            self.sent = n
            if not p:
                self.first_at, self.urgent = math.inf, False
                self.sent_seg, self.pend = self.pend, _Seg()
            else:
                # part stays pending: split the sums in O(batch), not O(backlog). The rest
                # keeps the pending tail (it is the newest part) and loses what was sent.
                sent = self._segs(out, self.gen)
                rest = self.pend
                rest.c, rest.f, rest.s = (max(0, rest.c - sent.c), max(0, rest.f - sent.f),
                                          max(0, rest.s - sent.s))
                rest.tail = min(rest.tail, rest.c)
                self.sent_seg, self.pend = sent, rest
            return out

    @staticmethod
    def _segs(runs: Iterable[Run], at_gen: int) -> _Seg:
        """What the runs admitted under `at_gen` add (older ones are stale in Redis)."""
        seg = _Seg()
        for gen, code, _, count in runs:
            if code != 4 and gen == at_gen:
                seg.add(code == 1 or code == 3, code >= 2, count)
        return seg

    def done(self, gen: int, counts: tuple[int, int, int, int] | None
             ) -> tuple[bool, bool, list[Callable[[], None]]]:
        """The call in flight returned (or was lost). `counts` are the shared counters
        right after it (None: unknown). Returns (more is pending, the projection of what
        is still pending trips, the flush waiters to notify once the reply is
        installed)."""
        with self._lock:
            self.applied += self.sent
            self.sent = 0
            if gen >= self.gen:  # a reply overtaken by a newer generation's push: no base
                if counts is None or min(counts) < 0:
                    counts = (0, 0, 0, 0) if gen != self.gen else self.base
                if gen != self.gen:
                    self.pend = self._segs(self.pending, gen)
                self.gen, self.base = gen, counts
            self.sent_seg = _Seg()
            pend = self.pend
            self.tripped = (pend.f > 0 or pend.s > 0) and self._trips(pend.f > 0, pend.s > 0)
            if self.tripped and self.pending:
                self.urgent = True  # what is still pending trips: send it without lingering
            fire = [n for t, n in self.waiters if t <= self.applied]
            if fire:
                self.waiters = [(t, n) for t, n in self.waiters if t > self.applied]
            return bool(self.pending), self.tripped, fire

    def adopt(self, gen: int, counts: tuple[int, int, int, int] | None) -> None:
        """A newer generation was seen: project onto its counters (a transition's new
        window is empty)."""
        with self._lock:
            if gen > self.gen:
                self.pend = self._segs(self.pending, gen)
                self.sent_seg = _Seg()
                self.gen = gen
                self.base = counts if counts is not None and min(counts) >= 0 else (0, 0, 0, 0)
                self.tripped = False


class ThreadWriter:
    """The sync shells' writer: one daemon thread per process, started on first use, that
    sends each woken breaker's pending outcomes, one call per breaker at a time."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: deque[CircuitBreaker] = deque()
        self._queued: set[int] = set()
        self._timed: list[tuple[float, int, CircuitBreaker]] = []  # (due, seq, breaker)
        self._seq = itertools.count()
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
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="distbreaker-writer",
                                                daemon=True)
                self._thread.start()

    def wake_at(self, breaker: CircuitBreaker, due: float) -> None:
        """Wake `breaker` at monotonic time `due` (batched mode's linger)."""
        with self._cond:
            heapq.heappush(self._timed, (due, next(self._seq), breaker))
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    while self._timed and self._timed[0][0] <= now:
                        b = heapq.heappop(self._timed)[2]
                        if id(b) not in self._queued:
                            self._queued.add(id(b))
                            self._ready.append(b)
                    if self._ready:
                        break
                    self._cond.wait(self._timed[0][0] - now if self._timed else None)
                b = self._ready.popleft()
                self._queued.discard(id(b))
            try:
                b._flush_once()
            except BaseException:  # never let one breaker (or a hook) stop the writer
                log.exception("distbreaker writer failed", extra={"breaker": b.name})
            try:
                due = b._batch_due()
            except Exception:
                continue
            if due <= time.monotonic():
                self.wake(b)
            elif due < math.inf:
                self.wake_at(b, due)


_writer: list[Any] = [None, -1]  # (ThreadWriter, pid it belongs to)


def thread_writer() -> ThreadWriter:
    """This process's writer (a forked child gets its own)."""
    w, pid = _writer
    if w is None or pid != os.getpid():
        w = ThreadWriter()
        _writer[0], _writer[1] = w, os.getpid()
    return w  # type: ignore[no-any-return]
