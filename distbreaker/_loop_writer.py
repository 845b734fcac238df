"""asyncio's batched writer: one task per event loop, the twin of `_batch.ThreadWriter`.

Before, every asyncio breaker ran its own drain task while it had outcomes pending: a task
created per outcome once a process held thousands of breakers (each one called less often
than its previous batch took to come back), a timer per lingering breaker, and a future per
call to meet the other breakers' batches in a shared pipeline. Now one task per loop takes
every woken breaker in turn, as the sync shells' writer thread does: the due batches of the
breakers that share a client go in one pipeline (up to PIPELINE_MAX per round trip), the
rest (Cluster clients, an in-process store, a breaker whose guard is down) alone; a
lingering breaker waits in one heap. Each round trip runs in a lane (a task) of its own,
one in flight per client, so a stalled Redis delays only the breakers on it (the writer
thread, which waits for each pipeline in turn, does not have this yet).

Cancelled (the loop shuts down), the task still sends what is pending, lingering or not,
then re-raises; a batch that was in flight when the cancel came counts as lost rather than
risk counting it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import math
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from ._batch import PIPELINE_MAX, live_wake, schedule_wake
from ._process import PROCESS

if TYPE_CHECKING:
    from ._protocol import ScriptCall

__all__ = ["LoopMember", "LoopWriter", "loop_writer"]

log = logging.getLogger("distbreaker")


class LoopMember(Protocol):
    """What the loop's writer calls on a breaker (the only calls it makes)."""

    name: str

    def batch_due(self) -> float: ...
    def hurry(self) -> None: ...
    def pipe_store(self) -> Any: ...  # an AsyncRedisStore that pipelines, or None
    def take_for_pipe(self) -> ScriptCall | None: ...
    async def pipe_done(self, call: ScriptCall, result: Any, sent_at: float) -> None: ...
    async def flush_once(self) -> None: ...
    def abandoned(self) -> None: ...


class LoopWriter:
    """See the module docstring. Runs on one event loop; every method is called from it.

    The writer's task dispatches; each round trip runs in a lane of its own (a task), one
    in flight per client (its breakers woken meanwhile wait for it, then go in the next
    pipeline) and one per breaker that goes alone, so a stalled Redis delays only its own
    breakers. Once cancelled (the loop ends: lanes started from then on would not be
    awaited), the task sends inline instead."""

    def __init__(self) -> None:
        self._ready: deque[LoopMember] = deque()
        self._queued: set[int] = set()
        self._timed: list[tuple[float, int, LoopMember]] = []  # (due, seq, member)
        self._sched: dict[int, float] = {}  # member -> the due of its live entry in _timed
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly
        self._kick: asyncio.Future[None] | None = None  # set while the task waits
        self._lanes: dict[Any, asyncio.Task[None]] = {}  # in flight, by client
        self._waiting: dict[Any, list[LoopMember]] = {}  # woken while their lane is busy

    def wake(self, m: LoopMember) -> None:
        if id(m) not in self._queued:
            self._queued.add(id(m))
            self._ready.append(m)
        self._poke()

    def _poke(self) -> None:
        t = self._task
        if t is None or t.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="distbreaker-writer")
        elif self._kick is not None and not self._kick.done():
            self._kick.set_result(None)

    def abandon(self) -> None:
        """Its loop was closed without ending the task: let go of every breaker it held
        (each one reports what it had not sent)."""
        members = {id(m): m for m in self._ready}
        members.update((id(m), m) for _, _, m in self._timed)
        for ms in self._waiting.values():
            members.update((id(m), m) for m in ms)
        self._ready.clear()
        self._queued.clear()
        self._timed.clear()
        self._sched.clear()
        self._waiting.clear()
        self._lanes.clear()
        self._task = self._kick = None
        for m in members.values():
            _guarded(m, m.abandoned)

    def _requeue(self, m: LoopMember, now: float) -> None:
        try:
            due = m.batch_due()
        except Exception:
            log.exception("distbreaker writer failed", extra={"breaker": m.name})
            return
        if due <= now:
            if id(m) not in self._queued:
                self._queued.add(id(m))
                self._ready.append(m)
        elif due < math.inf and schedule_wake(self._sched, m, due):
            heapq.heappush(self._timed, (due, next(self._seq), m))

    async def _run(self) -> None:
        cancelled = False
        try:
            while True:
                now = time.monotonic()
                timed = self._timed
                while timed and (cancelled or timed[0][0] <= now):
                    due, _, m = heapq.heappop(timed)
                    if not live_wake(self._sched, m, due):
                        continue  # replaced by an earlier wake, which ran
                    if cancelled:
                        m.hurry()  # the loop ends: nothing waits for its linger
                    self._requeue(m, now)
                if not self._ready:
                    if cancelled and self._lanes:
                        await asyncio.wait(list(self._lanes.values()))  # they requeue
                        continue
                    if not timed and not self._lanes:
                        break
                    delay = timed[0][0] - now if timed else None
                    cancelled = await self._wait(delay) or cancelled
                    continue
                woken: list[LoopMember] = []
                while self._ready and len(woken) < PIPELINE_MAX:
                    m = self._ready.popleft()
                    self._queued.discard(id(m))
                    if cancelled:
                        m.hurry()
                    woken.append(m)
                jobs = self._dispatch(woken, inline=cancelled)
                if jobs:
                    with contextlib.suppress(asyncio.CancelledError):
                        await _all(jobs)  # what was in flight when cancelled is lost
                    now = time.monotonic()
                    for m in woken:
                        m.hurry()
                        self._requeue(m, now)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            self._task = None  # a done task would keep its loop alive from the registry
        if cancelled:
            raise asyncio.CancelledError

    async def _wait(self, delay: float | None) -> bool:
        """Wait until the earliest lingering batch is due, a breaker is woken or a lane is
        back; True if cancelled meanwhile."""
        loop = asyncio.get_running_loop()
        kick = self._kick = loop.create_future()
        timer = loop.call_later(max(0.0, delay), _settle, kick) if delay is not None else None
        try:
            await kick
        except asyncio.CancelledError:
            return True
        finally:
            if timer is not None:
                timer.cancel()
            self._kick = None
        return False

    def _dispatch(self, woken: list[LoopMember], inline: bool) -> list[Any]:
        """Start a lane per client (one pipeline for the breakers that share one) and per
        breaker that goes alone; a client whose lane is busy keeps its breakers waiting.
        `inline`: return the jobs for the caller to await instead."""
        groups: dict[Any, tuple[Any, list[LoopMember]]] = {}
        for m in woken:
            store = _guarded(m, m.pipe_store)
            key = ("alone", id(m)) if store is None else id(store.client)
            groups.setdefault(key, (store, []))[1].append(m)
        jobs = []
        loop = asyncio.get_running_loop()
        for key, (store, members) in groups.items():
            if key in self._lanes:
                self._waiting.setdefault(key, []).extend(members)
                continue
            job = _flush_once(members[0]) if len(members) == 1 else _pipe(store, members)
            if inline:
                jobs.append(job)
            else:
                lane = self._lanes[key] = loop.create_task(job, name="distbreaker-writer-lane")
                # a callback, not a finally: it runs for a lane cancelled before it started
                lane.add_done_callback(functools.partial(self._lane_done, key, members))
        return jobs

    def _lane_done(self, key: Any, members: list[LoopMember], lane: asyncio.Task[None]) -> None:
        if self._lanes.get(key) is lane:
            del self._lanes[key]
        now = time.monotonic()
        for m in members + self._waiting.pop(key, []):
            self._requeue(m, now)
        if not lane.cancelled() and lane.exception() is not None:
            log.error("distbreaker writer failed", exc_info=lane.exception())
        self._poke()


async def _all(jobs: list[Any]) -> None:
    """Run `jobs` side by side; cancelled, wait until every one has settled what it took
    (a job takes its batches only once it runs: one cancelled before it started took
    none), then re-raise."""
    tasks = [asyncio.ensure_future(j) for j in jobs]
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
        raise
    for t in tasks:
        exc = None if t.cancelled() else t.exception()
        if exc is not None:
            raise exc
    if any(t.cancelled() for t in tasks):
        raise asyncio.CancelledError


async def _pipe(store: Any, members: list[LoopMember]) -> None:
    """One pipeline for the due batches of `members` (who share `store`); a member with
    none due, or whose guard is down, goes alone after it. Each batch taken is applied or
    counted lost, cancelled or not."""
    calls: list[tuple[LoopMember, ScriptCall]] = []
    rest: list[LoopMember] = []
    for m in members:
        call = _guarded(m, m.take_for_pipe)
        if call is None:
            rest.append(m)  # nothing due, or Redis is down: flush_once decides
        else:
            calls.append((m, call))
    cancelled: asyncio.CancelledError | None = None
    if calls:
        sent_at = time.monotonic()
        try:
            results = await store.run_many([c for _, c in calls])
        except asyncio.CancelledError as e:
            cancelled, results = e, [e] * len(calls)
        except Exception as e:  # never raised by design; keep the writer alive
            results = [e] * len(calls)
        for (m, call), res in zip(calls, results, strict=True):
            if cancelled is not None:
                res = cancelled  # the rest is lost too: nothing more may wait
            try:
                await m.pipe_done(call, res, sent_at)
            except asyncio.CancelledError as e:
                cancelled = e
            except Exception:
                log.exception("distbreaker writer failed", extra={"breaker": m.name})
    if cancelled is not None:
        raise cancelled
    for m in rest:
        await _flush_once(m)


async def _flush_once(m: LoopMember) -> None:
    try:
        await m.flush_once()
    except Exception:
        log.exception("distbreaker writer failed", extra={"breaker": m.name})


def _guarded(m: LoopMember, fn: Any) -> Any:
    try:
        return fn()
    except Exception:
        log.exception("distbreaker writer failed", extra={"breaker": m.name})
        return None


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def loop_writer() -> LoopWriter:
    """The writer of the running event loop (a forked child starts without its parent's)."""
    loop = asyncio.get_running_loop()
    writers: weakref.WeakKeyDictionary[Any, LoopWriter] = PROCESS.loop_writers
    w = writers.get(loop)
    closed: list[tuple[Any, LoopWriter]] = []
    if w is None:
        with PROCESS.lock:
            w = writers.get(loop)
            if w is None:
                closed = [(k, v) for k, v in writers.items() if k.is_closed()]
                for k, _ in closed:  # closed with batches pending: their writer never ends
                    del writers[k]
                w = writers[loop] = LoopWriter()
        for _, v in closed:
            v.abandon()
    return w
