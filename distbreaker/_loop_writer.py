"""asyncio's batched writer: one task per event loop, the twin of `_batch.ThreadWriter`.

Before, every asyncio breaker ran its own drain task while it had outcomes pending: a task
created per outcome once a process held thousands of breakers (each one called less often
than its previous batch took to come back), a timer per lingering breaker, and a future per
call to meet the other breakers' batches in a shared pipeline. Now one task per loop takes
every woken breaker in turn, as the sync shells' writer thread does: the due batches of the
breakers that share a client go in one pipeline (up to PIPELINE_MAX per round trip), the
rest (Cluster clients, an in-process store, a breaker whose guard is down) alone; a
lingering breaker waits in one heap.

Cancelled (the loop shuts down), the task still sends what is pending, lingering or not,
then re-raises; a batch that was in flight when the cancel came counts as lost rather than
risk counting it twice.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from ._batch import PIPELINE_MAX
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
    """See the module docstring. Runs on one event loop; every method is called from it."""

    def __init__(self) -> None:
        self._ready: deque[LoopMember] = deque()
        self._queued: set[int] = set()
        self._timed: list[tuple[float, int, LoopMember]] = []  # (due, seq, member)
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly
        self._kick: asyncio.Future[None] | None = None  # set while the task lingers

    def wake(self, m: LoopMember) -> None:
        if id(m) not in self._queued:
            self._queued.add(id(m))
            self._ready.append(m)
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
        self._ready.clear()
        self._queued.clear()
        self._timed.clear()
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
        elif due < math.inf:
            heapq.heappush(self._timed, (due, next(self._seq), m))

    async def _run(self) -> None:
        cancelled = False
        try:
            while True:
                now = time.monotonic()
                timed = self._timed
                while timed and (cancelled or timed[0][0] <= now):
                    m = heapq.heappop(timed)[2]
                    if cancelled:
                        m.hurry()  # the loop ends: nothing waits for its linger
                    self._requeue(m, now)
                if not self._ready:
                    if not timed:
                        break
                    cancelled = await self._linger(timed[0][0] - now) or cancelled
                    continue
                woken: list[LoopMember] = []
                while self._ready and len(woken) < PIPELINE_MAX:
                    m = self._ready.popleft()
                    self._queued.discard(id(m))
                    woken.append(m)
                try:
                    await self._send(woken)
                except asyncio.CancelledError:
                    cancelled = True  # the batches in flight were counted lost
                now = time.monotonic()
                for m in woken:
                    if cancelled:
                        m.hurry()
                    self._requeue(m, now)
        finally:
            self._task = None  # a done task would keep its loop alive from the registry
        if cancelled:
            raise asyncio.CancelledError

    async def _linger(self, delay: float) -> bool:
        """Wait until the earliest lingering batch is due or a breaker is woken; True if
        cancelled meanwhile."""
        loop = asyncio.get_running_loop()
        kick = self._kick = loop.create_future()
        timer = loop.call_later(max(0.0, delay), _settle, kick)
        try:
            await kick
        except asyncio.CancelledError:
            return True
        finally:
            timer.cancel()
            self._kick = None
        return False

    async def _send(self, woken: list[LoopMember]) -> None:
        """One pipeline per store for the breakers that share one; the rest alone, side by
        side (each waits only for its own reply)."""
        groups: dict[int, tuple[Any, list[LoopMember]]] = {}
        alone: list[LoopMember] = []
        for m in woken:
            store = _guarded(m, m.pipe_store)
            if store is None:
                alone.append(m)
            else:
                groups.setdefault(id(store.client), (store, []))[1].append(m)
        jobs = []
        for store, members in groups.values():
            if len(members) == 1:
                alone.append(members[0])
            else:
                jobs.append(_pipe(store, members))
        jobs += [_flush_once(m) for m in alone]
        if len(jobs) == 1:
            await jobs[0]
        elif jobs:
            await _all(jobs)


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
