"""The I/O of an asyncio breaker: the twin of `_sync_engine.SyncEngine`.

The same steps on the running event loop. A caller waits at most redis_timeout for its
request, written at once and read in the caller's own task (`_exchanged`; a task of its
own where that cannot be, `_run`): cancelling the caller does not cancel the request,
whose outcome is applied when it comes, once (a granted probe lease is given back).
Batched outcomes are sent by the loop's writer task instead of the writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from ._batching import Batching
from ._clients import STORE_ERRORS, deliver, mark_sent
from ._core import BreakerCore
from ._engine import CLOSE_FLUSH_TIMEOUT_S, Engine
from ._fallback import BACKGROUND, CALLER, OPERATOR, WRITER
from ._listener import AsyncHub, Hub
from ._loop_writer import loop_writer
from ._outcome import Permit
from ._protocol import Reply, ScriptCall
from .stores import AsyncMemoryStore, AsyncRedisStore
from .stores.redis import Exchange

__all__ = ["AsyncEngine"]

_monotonic = time.monotonic
_INF = math.inf
log = logging.getLogger("distbreaker")


class AsyncEngine(Engine):
    """Runs one asyncio breaker's calls; see the module docstring."""

    def __init__(self, core: BreakerCore, store: AsyncMemoryStore | AsyncRedisStore,
                 hub_kind: type[Hub], backend: Any, client: Any) -> None:
        super().__init__(core, store, hub_kind, backend, client)
        self.store: AsyncMemoryStore | AsyncRedisStore = store
        self.background: set[asyncio.Future[Any]] = set()
        #: late finishes of task-free requests (`_finish_late`), with their calls
        self._late: dict[asyncio.Future[Any], ScriptCall] = {}
        self.writer: AsyncWriter | None = None
        if core.batching is not None:
            self.writer = AsyncWriter(self, core.batching)
            core.wake = self.writer.wake
        self._join()

    # -- the process and the listener -------------------------------------------------

    def after_fork(self) -> None:
        # the parent's tasks belong to its event loop, which does not run here
        if self.writer is not None:
            self.writer.after_fork()
        self.background = set()
        super().after_fork()

    def at_exit(self) -> None:
        """The loop is gone by now: its writer task sent what it could when the loop
        cancelled it; anything left is reported."""
        _orphans_lost(self._late, self.background, self.core)
        b = self.core.batching
        if b is not None and b.batch.outstanding():
            b.warn_unapplied("at exit (close() the breaker or flush() it before the event "
                             "loop ends)")

    async def refresh_background(self) -> None:
        await self.refresh(background=True)

    def hub_running(self) -> None:
        if self._late:
            _orphans_lost(self._late, self.background, self.core)
        hub = self._hub
        if isinstance(hub, AsyncHub):
            hub.ensure_running()

    def hub_task_missing(self) -> bool:
        """Cheap check for the fast path: is the listener task not running (not started
        yet, or ended with a previous event loop)?"""
        hub = self._hub
        if not isinstance(hub, AsyncHub):
            return False
        task = hub.task
        return task is None or task.done()

    # -- running a call -----------------------------------------------------------------

    async def run(self, call: ScriptCall, mode: int = CALLER) -> Any:
        """See `SyncEngine.run`. A caller cancelled while Redis answers does not cancel the
        request: its outcome is applied when it comes."""
        fb = self.core.fallback
        if not fb.may_try(mode):
            return fb.run(call)
        sent_at = _monotonic()
        store = self.store
        if mode == CALLER and isinstance(store, AsyncRedisStore):
            exchange = store.send_now(call)
            if exchange is not None:
                return await self._exchanged(call, exchange, sent_at)
        return await self._run(call, mode, sent_at)

    async def _run(self, call: ScriptCall, mode: int, sent_at: float,
                   wait: float | None = None) -> Any:
        """`run` through the store's awaitable path; a caller waits `wait` (default:
        redis_timeout)."""
        fb = self.core.fallback
        try:
            if mode == CALLER:
                # The request is a task the caller stops awaiting after redis_timeout (or
                # when cancelled); a bare future and a timer cost less than asyncio.wait.
                # The task wakes the caller as it ends, not from a done callback: one turn
                # of the loop less per call.
                loop = asyncio.get_running_loop()
                waiter = loop.create_future()
                task = loop.create_task(_signalling(self.store.run(call), waiter))
                timer = loop.call_later(self.config.redis_timeout if wait is None else wait,
                                        _wake, waiter, None)
                try:
                    await waiter
                except asyncio.CancelledError:
                    task.add_done_callback(self._late_callback(call))
                    raise
                finally:
                    timer.cancel()
                if not task.done():
                    task.add_done_callback(self._late_callback(call))
                    return fb.no_reply(call, sent_at)
                raw = task.result()
            else:
                raw = await self.store.run(call)
        except STORE_ERRORS as e:
            return await self.failed(call, e, mode, sent_at)
        return fb.answered(raw, sent_at)

    async def failed(self, call: ScriptCall, e: BaseException, mode: int,
                     sent_at: float) -> Any:
        """`run()`'s failure path (see `SyncEngine._failed`): for a writer's timeout, one
        PING per exception decides between a stuck connection (raised: the batch is lost)
        and a silent Redis (the fallback answers)."""
        fb = self.core.fallback
        alive = getattr(self.store, "alive", None)
        if (fb.stuck_writer(mode, e) and alive
                and await _alive_once(e, alive, self.config.failover_after)):
            fb.answered(None)  # one stuck connection, not a silent Redis
            raise e
        return fb.failed(call, e, mode, sent_at)

    async def _exchanged(self, call: ScriptCall, exchange: Exchange, sent_at: float) -> Any:
        """`run` for a request written at once (`AsyncRedisStore.send_now`): its reply read
        in the caller's task for at most redis_timeout. A caller that stops waiting or is
        cancelled leaves the rest to a background task, whose outcome `on_late` applies."""
        fb = self.core.fallback
        try:
            raw = await exchange.reply(self.config.redis_timeout)
        except TimeoutError:
            self._finish_late(call, exchange)
            return fb.no_reply(call, sent_at)
        except asyncio.CancelledError:
            self._finish_late(call, exchange)
            raise
        except STORE_ERRORS as e:
            if exchange.needs_load(e, call.op):  # not run: load it and send it again
                left = self.config.redis_timeout - (_monotonic() - sent_at)
                return await self._run(call, CALLER, sent_at, max(left, 0.0))
            return fb.failed(call, e, CALLER, sent_at)
        return fb.answered(raw, sent_at)

    def _finish_late(self, call: ScriptCall, exchange: Exchange) -> None:
        deadline = _monotonic() + self.config.redis_background_timeout
        task = asyncio.ensure_future(self._finish(call, exchange, deadline))
        self.keep(task)
        self._late[task] = call
        task.add_done_callback(self._late_callback(call))
        task.add_done_callback(self._unlate)

    def _unlate(self, task: asyncio.Future[Any]) -> None:
        self._late.pop(task, None)

    async def _finish(self, call: ScriptCall, exchange: Exchange, deadline: float) -> Any:
        """The rest of a request's reply, in the background; a late reply that says the
        server had not loaded our code (it did not run) loads it and sends it again, as
        the task path does."""
        try:
            return await exchange.finish(deadline)
        except redis.ResponseError as e:
            if exchange.needs_load(e, call.op) and isinstance(self.store, AsyncRedisStore):
                return await self.store.run(call)
            raise

    def _late_callback(self, call: ScriptCall) -> Callable[[asyncio.Future[Any]], None]:
        return functools.partial(deliver, functools.partial(self.on_late, call))

    def on_late(self, call: ScriptCall, raw: Any, exc: BaseException | None) -> None:
        """On the event loop: the outcome of a request whose caller went on."""
        core = self.core
        events, give_back = core.replies.late(call, raw, exc)
        core.announcer.fire(events)
        if give_back is not None:
            self.keep(asyncio.ensure_future(self._give_back(give_back)))

    async def _give_back(self, call: ScriptCall) -> None:
        try:
            self.core.replies.record(call, await self.run(call, BACKGROUND))
        except Exception as e:  # the lease expires by itself
            log.debug("giving back a late probe lease failed: %s", e)

    def keep(self, t: asyncio.Future[Any]) -> None:
        """Hold a reference to a background task until it is done."""
        self.background.add(t)
        t.add_done_callback(self.background.discard)

    async def admit(self) -> Permit:
        self.hub_running()
        core = self.core
        permit = core.fast_admit()
        if permit is None:
            call = core.calls.acquire()
            permit, events = core.after_acquire(call, await self.run(call))
            core.announcer.fire(events)
        return permit

    async def done(self, permit: Permit, exc: BaseException | None, result: Any, *,
                   timed_out: bool = False) -> None:
        core = self.core
        call = core.finish(permit, exc, result, timed_out=timed_out)
        if call is not None:
            core.announcer.fire(core.replies.record(call, await self.run(call)))

    async def refresh(self, background: bool = False) -> Reply | None:
        core = self.core
        seq = core.cell.seq if background else None
        mode = BACKGROUND if background else CALLER
        return core.replies.snapshot(await self.run(core.calls.build("snapshot"), mode), seq)

    async def check(self) -> None:
        """See `SyncEngine.check`."""
        self.hub_running()
        core = self.core
        raw = await self.store.run(core.calls.build("snapshot"))
        core.fallback.answered(raw)
        core.replies.snapshot(raw)

    async def op(self, op: str, *extra: str) -> None:
        self.hub_running()
        core = self.core
        call = core.calls.build(op, *extra)
        core.announcer.fire(core.replies.record(call, await self.run(call, OPERATOR)))

    def start(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        """Run an operator action as a task that starts now (see the shell)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if asyncio.iscoroutine(coro):
                coro.close()
            raise RuntimeError(f"AsyncCircuitBreaker {self.name!r}: operator actions need a "
                               "running event loop; from sync code use CircuitBreaker (or "
                               "the distbreaker CLI)") from None
        task: asyncio.Task[None] = loop.create_task(coro)  # type: ignore[arg-type]
        self.keep(task)
        return task

    async def close(self) -> Any:
        """Finish pending operator actions and send pending outcomes, stop listening;
        returns the client to give back."""
        pending = [t for t in self.background if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_FLUSH_TIMEOUT_S)
        w = self.writer
        if self.attached is not None and w is not None and not await w.flush(
                CLOSE_FLUSH_TIMEOUT_S):
            w.batching.warn_unapplied("closed")
        client = self.attached[2] if self.attached is not None else None
        self.detach()
        return client


class AsyncWriter:
    """Batched mode on the loop: this breaker's member of the loop's writer
    (`_loop_writer.LoopWriter`, the twin of the writer thread), which sends its pending
    outcomes with every other due breaker's, one record call per breaker at a time."""

    def __init__(self, engine: AsyncEngine, batching: Batching) -> None:
        # weakly: the engine holds its writer, and a dropped breaker is freed once the
        # outcomes it holds are sent (held strongly only meanwhile, as the writer thread
        # holds a sync one)
        self._engine = weakref.ref(engine)
        self._held: AsyncEngine | None = None
        self.batching = batching
        self.name = engine.name

    def after_fork(self) -> None:
        """The child's loops get writers of their own (`PROCESS`)."""
        self._held = None

    def abandoned(self) -> None:
        """The loop this breaker's batches waited on was closed with them unsent."""
        self._held = None
        if self.batching.batch.outstanding():
            self.batching.warn_unapplied("(its event loop was closed)")

    def wake(self) -> None:
        """Hand this breaker to the running loop's writer (from the loop's thread)."""
        self._held = self._engine()
        loop_writer().wake(self)

    # -- what the loop's writer calls (`LoopMember`) -------------------------------------

    def batch_due(self) -> float:
        due = self.batching.due() if self._engine() is not None else _INF
        if due == _INF and not self.batching.batch.busy:
            self._held = None  # nothing left to send: the breaker may go
        return due

    def hurry(self) -> None:
        self.batching.batch.hurry()

    def pipe_store(self) -> AsyncRedisStore | None:
        """The store this breaker's batches may share a pipeline on (see
        `SyncEngine.pipe_store`), or None: they go alone (`flush_once`)."""
        e = self._engine()
        s = e.store if e is not None else None
        return s if isinstance(s, AsyncRedisStore) and s.pipelines else None

    def take_for_pipe(self) -> ScriptCall | None:
        """See `BreakerCore.take_for_pipe` (`flush_once` is the lone path)."""
        e = self._engine()
        return None if e is None else e.core.take_for_pipe()

    async def pipe_done(self, call: ScriptCall, result: Any, sent_at: float) -> None:
        """Apply the pipeline's result for `call` as `flush_once` applies its own (a
        cancelled pipeline's batches are lost, and the cancel goes on to the writer)."""
        b = self.batching
        e = self._engine()
        try:
            if e is None:
                raise RuntimeError("the breaker is gone")
            if isinstance(result, STORE_ERRORS):
                raw = await e.failed(call, result, WRITER, sent_at)
            elif isinstance(result, BaseException):
                raise result
            else:
                raw = e.core.fallback.answered(result, sent_at)
            _, events = b.done(call, raw)
        except Exception as exc:
            b.lost(exc)
            return
        except asyncio.CancelledError as exc:
            b.lost(exc)
            raise  # the writer hurries the rest and sends it
        e.core.announcer.fire(events)

    async def flush_once(self) -> None:
        """Send one batch alone, if one is due (interrupted, it is lost and the cancel goes
        on to the writer)."""
        b = self.batching
        e = self._engine()
        call = b.take() if e is not None else None
        if e is None or call is None:
            return  # a gone breaker's outcomes are reported by nobody
        try:
            _, events = b.done(call, await e.run(call, WRITER))
        except Exception as exc:
            b.lost(exc)
            return
        except asyncio.CancelledError as exc:
            b.lost(exc)
            raise
        e.core.announcer.fire(events)

    async def flush(self, timeout: float | None) -> bool:
        b = self.batching.batch
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not fut.done():
                fut.set_result(None)

        def notify() -> None:
            loop.call_soon_threadsafe(settle)

        if not b.wait(notify):
            return True
        b.hurry()
        self.wake()
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            b.unwait(notify)
            return False
        return True


def _orphans_lost(late: dict[asyncio.Future[Any], ScriptCall],
                  background: set[asyncio.Future[Any]], core: BreakerCore) -> None:
    """Late finishes whose event loop closed before they ended (the loop's shutdown
    cancelled their caller after listing the tasks it cancels and waits for, so nothing
    ran them to the end): each outcome is reported lost, once. Their connections went
    with their loop."""
    for t, call in list(late.items()):
        if t.done() or not t.get_loop().is_closed():
            continue
        del late[t]
        background.discard(t)
        err = redis.ConnectionError("the event loop closed before the reply came")
        mark_sent(err, True)
        events, _ = core.replies.late(call, None, err)  # a lease expires by itself
        core.announcer.fire(events)


def _wake(waiter: asyncio.Future[None], _: Any) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _signalling(aw: Awaitable[Any], waiter: asyncio.Future[None]) -> Any:
    """Await `aw` and, as it ends (in the same step of its task, which is done by the time
    the waiter's awaiter runs), wake whoever awaits `waiter`."""
    try:
        return await aw
    finally:
        if not waiter.done():
            waiter.set_result(None)


async def _alive_once(e: BaseException, alive: Callable[[float], Awaitable[bool]],
                      timeout: float) -> bool:
    """`alive(timeout)`, asked once per exception: every batch of one pipeline meets the
    same one, and one PING decides for all of them (not one per breaker)."""
    fut: asyncio.Future[bool] | None = getattr(e, "distbreaker_alive", None)
    if fut is None:
        fut = asyncio.ensure_future(alive(timeout))
        with contextlib.suppress(Exception):
            e.distbreaker_alive = fut  # type: ignore[attr-defined]
    return await asyncio.shield(fut)
