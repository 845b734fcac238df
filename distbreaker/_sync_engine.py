"""The I/O of a sync breaker: runs the core's script calls through a store.

`SyncEngine` is what `CircuitBreaker` holds. Each step is: ask the core for a script call,
run it (`run`: a caller waits at most redis_timeout, the fallback answers when Redis
fails), hand the reply to the core's owners, fire the transitions they return. It is
also the listener hub's member (`apply_push`, `is_stale`, `refresh_background`), the
writer thread's (`flush_once`, `batch_due`) and a resident of the process (`after_fork`,
`at_exit`). `_async_engine.AsyncEngine` is its asyncio twin.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from ._batch import thread_writer
from ._clients import STORE_ERRORS, InFlight
from ._core import BreakerCore
from ._engine import CLOSE_FLUSH_TIMEOUT_S, Engine
from ._fallback import BACKGROUND, CALLER, OPERATOR, WRITER
from ._listener import Hub
from ._outcome import Permit
from ._protocol import Reply, ScriptCall
from .stores import MemoryStore, RedisStore

__all__ = ["CLOSE_FLUSH_TIMEOUT_S", "SyncEngine"]

_monotonic = time.monotonic
_INF = float("inf")
log = logging.getLogger("distbreaker")


class SyncEngine(Engine):
    """Runs one sync breaker's calls; see the module docstring."""

    def __init__(self, core: BreakerCore, store: MemoryStore | RedisStore,
                 hub_kind: type[Hub], backend: Any, client: Any) -> None:
        super().__init__(core, store, hub_kind, backend, client)
        self.store: MemoryStore | RedisStore = store
        if core.batching is not None:
            core.wake = _weak_wake(weakref.ref(self))
        self._join()

    # -- the process and the listener -------------------------------------------------

    def at_exit(self) -> None:
        """Interpreter exit: send what the batch still holds."""
        b = self.core.batching
        if b is None or b.batch.outstanding() == 0:
            return
        with contextlib.suppress(Exception):
            self.drain_inline(CLOSE_FLUSH_TIMEOUT_S)
        if b.batch.outstanding():
            b.warn_unapplied("at exit (close() the breaker or flush() it before the event "
                             "loop ends)")

    def refresh_background(self) -> None:
        self.refresh(background=True)

    # -- running a call -----------------------------------------------------------------

    def run(self, call: ScriptCall, mode: int = CALLER) -> Any:
        """Run a script call. A caller waits at most `redis_timeout`: without a reply by
        then its request finishes in the background (`on_late`) and the caller goes on;
        when Redis fails, the fallback answers. An operator action (force, release,
        reset) must reach Redis: it waits longer, and raises StoreUnavailableError
        instead of falling back. See `_fallback.CALLER` for the other modes."""
        fb = self.core.fallback
        if not fb.may_try(mode):
            return fb.run(call)
        sent_at = _monotonic()
        try:
            if mode == CALLER:
                raw = self.store.run(call, self.config.redis_timeout, self.on_late)
            else:
                raw = self.store.run(call)
        except InFlight:
            return fb.no_reply(call, sent_at)
        except STORE_ERRORS as e:
            return self._failed(call, e, mode, sent_at)
        return fb.answered(raw, sent_at)

    def _failed(self, call: ScriptCall, e: BaseException, mode: int, sent_at: float,
                memo: dict[str, bool] | None = None) -> Any:
        """`run()`'s failure path. `memo` carries the answer of the one PING that decides
        for every batch of a pipeline whether a stuck connection or a silent Redis
        timed them out (one PING per pipeline, not one per breaker)."""
        fb = self.core.fallback
        alive = getattr(self.store, "alive", None)
        if fb.stuck_writer(mode, e) and alive:
            ok = None if memo is None else memo.get("alive")
            if ok is None:
                ok = alive(self.config.failover_after)
                if memo is not None:
                    memo["alive"] = ok
            if ok:
                fb.answered(None)  # one stuck connection, not a silent Redis
                raise e
        return fb.failed(call, e, mode, sent_at)

    def on_late(self, call: ScriptCall, raw: Any, exc: BaseException | None) -> None:
        """A background thread: the outcome of a request whose caller went on."""
        core = self.core
        events, give_back = core.replies.late(call, raw, exc)
        core.announcer.fire(events)
        if give_back is not None:
            try:
                core.replies.record(give_back, self.run(give_back, BACKGROUND))
            except Exception as e:  # the lease expires by itself
                log.debug("giving back a late probe lease failed: %s", e)

    def admit(self) -> Permit:
        core = self.core
        permit = core.fast_admit()
        if permit is None:
            call = core.calls.acquire()
            permit, events = core.after_acquire(call, self.run(call))
            core.announcer.fire(events)
        return permit

    def done(self, permit: Permit, exc: BaseException | None, result: Any) -> None:
        core = self.core
        call = core.finish(permit, exc, result)
        if call is not None:
            core.announcer.fire(core.replies.record(call, self.run(call)))

    def release_unused(self, permit: Permit) -> None:
        """Give back a permit without recording anything (only a lease has a cost)."""
        if permit.lease:
            call = self.core.calls.give_back(permit.generation, permit.lease)
            with contextlib.suppress(Exception):
                self.core.replies.record(call, self.run(call))

    def refresh(self, background: bool = False) -> Reply | None:
        core = self.core
        seq = core.cell.seq if background else None
        mode = BACKGROUND if background else CALLER
        return core.replies.snapshot(self.run(core.calls.build("snapshot"), mode), seq)

    def check(self) -> None:
        """Read the state waiting up to redis_background_timeout; raises the store's error."""
        core = self.core
        raw = self.store.run(core.calls.build("snapshot"))
        core.fallback.answered(raw)
        core.replies.snapshot(raw)

    def op(self, op: str, *extra: str) -> None:
        core = self.core
        call = core.calls.build(op, *extra)
        core.announcer.fire(core.replies.record(call, self.run(call, OPERATOR)))

    # -- batched mode ----------------------------------------------------------------------

    def wake(self) -> None:
        thread_writer().wake(self)

    def batch_due(self) -> float:
        b = self.core.batching
        return b.due() if b is not None else _INF

    def flush_once(self) -> bool:
        """Send one batch of pending outcomes, if one is due and none is in flight;
        returns whether more are pending. Runs in the writer thread (or inline, see
        `flush`)."""
        b = self.core.batching
        call = b.take() if b is not None else None
        if b is None or call is None:
            return False
        try:
            more, events = b.done(call, self.run(call, WRITER))
        except Exception as e:
            return b.lost(e)
        self.core.announcer.fire(events)
        return more

    def pipe_store(self) -> RedisStore | None:
        """The store this breaker's batches may share a pipeline on with other breakers'
        (the writer groups by it), or None: they go one at a time (`flush_once`)."""
        s = self.store
        return s if isinstance(s, RedisStore) and s.pipelines else None

    def take_for_pipe(self) -> ScriptCall | None:
        """See `BreakerCore.take_for_pipe` (`flush_once` is the lone path)."""
        return self.core.take_for_pipe()

    def pipe_done(self, call: ScriptCall, result: Any, sent_at: float,
                  memo: dict[str, bool]) -> bool:
        """The pipeline's result for `call` (from `take_for_pipe`), applied as
        `flush_once` applies its own; returns whether more are pending. `memo` is shared
        by the pipeline's breakers (see `_failed`)."""
        b = self.core.batching
        assert b is not None
        try:
            if isinstance(result, STORE_ERRORS):
                raw = self._failed(call, result, WRITER, sent_at, memo)
            elif isinstance(result, BaseException):
                raise result
            else:
                raw = self.core.fallback.answered(result, sent_at)
            more, events = b.done(call, raw)
        except Exception as e:
            return b.lost(e)
        self.core.announcer.fire(events)
        return more

    def flush(self, timeout: float | None) -> bool:
        b = self.core.batch
        if b is None or b.outstanding() == 0:
            return True
        w = thread_writer().thread
        if w is None or not w.is_alive() or w is threading.current_thread():
            return self.drain_inline(timeout)
        done = threading.Event()
        if not b.wait(done.set):
            return True
        b.hurry()  # after wait(): everything it waits for is sent without lingering
        self.wake()
        if done.wait(timeout):
            return True
        b.unwait(done.set)
        return False

    def drain_inline(self, timeout: float | None) -> bool:
        """Send pending outcomes from this thread (no writer: interpreter exit, a forked
        child, or the writer itself asking)."""
        b = self.core.batch
        if b is None:
            return True
        target = b.recorded  # what was recorded when asked, not what keeps coming
        own = thread_writer().thread is threading.current_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b.applied < target:
            b.hurry()
            if self.flush_once():
                continue
            if b.applied >= target:
                break
            if own and b.busy:
                # asked from inside the writer's own call (a listener of this breaker):
                # that call cannot finish while we wait for it
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.001)  # a call is in flight from the writer thread
        return True

    def close(self) -> Any:
        """Send pending outcomes, stop listening; returns the client to give back."""
        b = self.core.batching
        if self.attached is not None and not self.flush(CLOSE_FLUSH_TIMEOUT_S):
            assert b is not None
            b.warn_unapplied("closed")
        client = self.attached[2] if self.attached is not None else None
        self.detach()
        return client


def _weak_wake(ref: weakref.ref[SyncEngine]) -> Callable[[], None]:
    """The core's wake, holding its engine weakly: a dropped breaker is freed at once
    (a strong reference back would make a cycle only the GC collects, and meanwhile the
    dead engine would stay a member of its hub and guard)."""
    def wake() -> None:
        engine = ref()
        if engine is not None:
            engine.wake()
    return wake
