"""Batched mode: outcomes wait in a per-breaker batch for this process's writer.

The batch is plain bookkeeping shared by the sync and asyncio shells: what is pending, what
is in flight (at most one script call per breaker), which flush() callers wait for what,
and the projection of the pending outcomes onto the shared counters last read from Redis.
The projection is what lets a process stop admitting calls the moment its own unsent
failures would trip the breaker, instead of one round trip later.

The sync shells share one writer thread per process (`ThreadWriter`); asyncio breakers
share one writer task per event loop (`_loop_writer.LoopWriter`). Either sends everything
pending for a breaker (up to ``max_batch`` outcomes) in one record.lua call as soon as the
previous call for that breaker returns (or, with ``batch_linger``, once it has waited that
long), so an idle breaker's first outcome goes out at once.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from ._config import CircuitBreakerConfig
from ._model import ModelConfig, trips
from ._process import PROCESS
from ._protocol import NONE, is_failure, is_slow

if TYPE_CHECKING:
    from ._protocol import ScriptCall

__all__ = ["OutcomeBatch", "ThreadWriter", "WriterMember", "thread_writer"]

log = logging.getLogger("distbreaker")

Run = list[int]  # [generation admitted under, Code, retry_after_ms, count]


class _Seg:
    """What a stretch of outcomes adds to the shared counters: window calls, failures and
    slow calls, the failures since its last non-failure, and whether it has one (which
    resets the consecutive count)."""

    __slots__ = ("calls", "failures", "reset", "slow", "tail")

    def __init__(self) -> None:
        self.calls = self.failures = self.slow = self.tail = 0
        self.reset = False

    def add(self, failed: bool, slow: bool, n: int = 1) -> None:
        """Add `n` equal outcomes."""
        self.calls += n
        if failed:
            self.failures += n
            self.tail += n
        else:
            self.tail = 0
            self.reset = True
        if slow:
            self.slow += n


class OutcomeBatch:
    """Pending outcomes of one breaker, and the projection onto the shared counters.

    Outcomes are kept as runs of equal ones (a burst of successes is one run), and the
    projection from running sums, so that recording an outcome and answering a reply cost
    the same however far the writer is behind. Every method takes the batch's lock
    briefly; none does I/O.
    """

    __slots__ = ("_limit", "_linger", "_lock", "_rule", "_wn", "applied", "base", "first_at",
                 "gen", "pend", "pending", "recorded", "sent", "sent_seg", "tripped", "urgent",
                 "waiters")

    def __init__(self, cfg: CircuitBreakerConfig) -> None:
        self._rule = ModelConfig.parse(cfg.script_arg)  # the scripts' own numbers
        self._wn = self._rule.window_n if self._rule.count_window else 0
        self._linger = cfg.batch_linger
        self._limit = cfg.max_batch
        self.reset()

    def reset(self) -> None:
        """Start empty (also in a forked child: the parent sends its own outcomes)."""
        self._lock = threading.Lock()
        # a list, not a deque: an empty deque is 624 bytes, a list 56, for each breaker
        self.pending: list[Run] = []
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
        c, f, s = c0 + a.calls + b.calls, f0 + a.failures + b.failures, s0 + a.slow + b.slow
        if self._wn and c > self._wn:
            c = self._wn
            f, s = min(f, c), min(s, c)
        for seg in (a, b):
            cf = seg.tail if seg.reset else cf + seg.tail
        return c, f, s, cf

    def _trips(self, failed: bool, slow: bool) -> bool:
        c, f, s, cf = self.projected()
        return trips(self._rule, c, f, s, cf, failed, slow)

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
            if code == NONE or gen != self.gen:
                return wake, False
            failed, slow = is_failure(code), is_slow(code)
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
            n = i = 0
            p = self.pending
            while i < len(p) and n < limit:
                run = p[i]
                if n + run[3] <= limit:
                    out.append(run)
                    n += run[3]
                    i += 1
                else:
                    k = limit - n
                    out.append([run[0], run[1], run[2], k])
                    run[3] -= k
                    n = limit
            del p[:i]
            self.sent = n
            if not p:
                self.first_at, self.urgent = math.inf, False
                self.sent_seg, self.pend = self.pend, _Seg()
            else:
                # part stays pending: split the sums in O(batch), not O(backlog). The rest
                # keeps the pending tail (it is the newest part) and loses what was sent.
                sent = self._segs(out, self.gen)
                rest = self.pend
                rest.calls = max(0, rest.calls - sent.calls)
                rest.failures = max(0, rest.failures - sent.failures)
                rest.slow = max(0, rest.slow - sent.slow)
                rest.tail = min(rest.tail, rest.calls)
                self.sent_seg, self.pend = sent, rest
            return out

    @staticmethod
    def _segs(runs: Iterable[Run], at_gen: int) -> _Seg:
        """What the runs admitted under `at_gen` add (older ones are stale in Redis)."""
        seg = _Seg()
        for gen, code, _, count in runs:
            if code != NONE and gen == at_gen:
                seg.add(is_failure(code), is_slow(code), count)
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
            failed, slow = pend.failures > 0, pend.slow > 0
            self.tripped = (failed or slow) and self._trips(failed, slow)
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


class WriterMember(Protocol):
    """What the writer thread calls on a breaker's engine (the only calls it makes)."""

    name: str

    def flush_once(self) -> bool: ...
    def batch_due(self) -> float: ...
    def pipe_store(self) -> Any: ...  # a RedisStore that pipelines, or None
    def take_for_pipe(self) -> ScriptCall | None: ...
    def pipe_done(self, call: ScriptCall, result: Any, sent_at: float,
                  memo: dict[str, bool]) -> bool: ...


PIPELINE_MAX = 1000  # batches in one pipeline


class ThreadWriter:
    """The sync shells' writer: one daemon thread per process, started on first use, that
    sends the woken breakers' pending outcomes, at most one call per breaker at a time:
    every due breaker of one store in one pipeline (one round trip for all of them)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: deque[WriterMember] = deque()
        self._queued: set[int] = set()
        self._timed: list[tuple[float, int, WriterMember]] = []  # (due, seq, breaker)
        self._sched: dict[int, float] = {}  # breaker -> the due of its live entry in _timed
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def wake(self, breaker: WriterMember) -> None:
        with self._cond:
            if id(breaker) not in self._queued:
                self._queued.add(id(breaker))
                self._ready.append(breaker)
                self._cond.notify()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="distbreaker-writer",
                                                daemon=True)
                self._thread.start()

    def wake_at(self, breaker: WriterMember, due: float) -> None:
        """Wake `breaker` at monotonic time `due` (batched mode's linger)."""
        with self._cond:
            if schedule_wake(self._sched, breaker, due):
                heapq.heappush(self._timed, (due, next(self._seq), breaker))
                self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    while self._timed and self._timed[0][0] <= now:
                        due, _, b = heapq.heappop(self._timed)
                        if not live_wake(self._sched, b, due):
                            continue  # replaced by an earlier wake, which ran
                        if id(b) not in self._queued:
                            self._queued.add(id(b))
                            self._ready.append(b)
                    if self._ready:
                        break
                    self._cond.wait(self._timed[0][0] - now if self._timed else None)
                woken: list[WriterMember] = []
                while self._ready and len(woken) < PIPELINE_MAX:
                    b = self._ready.popleft()
                    self._queued.discard(id(b))
                    woken.append(b)
            self._send(woken)
            for b in woken:
                try:
                    due = b.batch_due()
                except Exception:
                    continue
                if due <= time.monotonic():
                    self.wake(b)
                elif due < math.inf:
                    self.wake_at(b, due)

    def _send(self, woken: list[WriterMember]) -> None:
        """One pipeline per store for the breakers that share one; the rest alone."""
        groups: dict[int, tuple[Any, list[WriterMember]]] = {}
        alone: list[WriterMember] = []
        for b in woken:
            try:
                store = b.pipe_store()
            except Exception:
                store = None
            if store is None:
                alone.append(b)
            else:
                # stores of one client share its connections (and its packer)
                groups.setdefault(id(store.slow), (store, []))[1].append(b)
        for store, members in groups.values():
            if len(members) == 1:
                alone.append(members[0])
                continue
            calls: list[tuple[WriterMember, ScriptCall]] = []
            for b in members:
                call = _guarded(b, b.take_for_pipe)
                if call is None:
                    alone.append(b)  # nothing due, or Redis is down: flush_once decides
                else:
                    calls.append((b, call))
            if not calls:
                continue
            sent_at = time.monotonic()
            try:
                results = store.run_many([c for _, c in calls])
            except BaseException as e:  # never raised by design; keep the writer alive
                results = [e] * len(calls)
            memo: dict[str, bool] = {}  # shared by the group: one PING decides for all
            for (b, call), res in zip(calls, results, strict=True):
                _guarded(b, functools.partial(b.pipe_done, call, res, sent_at, memo))
        for b in alone:
            _guarded(b, b.flush_once)


def schedule_wake(sched: dict[int, float], m: object, due: float) -> bool:
    """Record a timed wake of `m` at `due`; False if one at or before `due` is pending
    already (that one re-examines `m`, and schedules it again if it must wait)."""
    have = sched.get(id(m))
    if have is not None and have <= due:
        return False
    sched[id(m)] = due
    return True


def live_wake(sched: dict[int, float], m: object, due: float) -> bool:
    """A timed wake of `m` at `due` came up: True if it is the live one (an entry that an
    earlier wake replaced is stale, and skipped)."""
    if sched.get(id(m)) != due:
        return False
    del sched[id(m)]
    return True


def _guarded(b: WriterMember, fn: Callable[[], Any]) -> Any:
    """Never let one breaker (or a hook) stop the writer."""
    try:
        return fn()
    except BaseException:
        log.exception("distbreaker writer failed", extra={"breaker": b.name})
        return None


def thread_writer() -> ThreadWriter:
    """This process's writer (a forked child gets its own)."""
    w = PROCESS.writer
    if w is None:
        with PROCESS.lock:
            w = PROCESS.writer
            if w is None:
                w = PROCESS.writer = ThreadWriter()
    return w  # type: ignore[no-any-return]
