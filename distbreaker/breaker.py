"""`CircuitBreaker` and `AsyncCircuitBreaker`: thin I/O shells over `BreakerCore`.

Each public method is: ask the core for a script call, run it through the store, hand the
reply back to the core, fire the callbacks it returns. The decisions are all in the core.
"""

from __future__ import annotations

import abc
import asyncio
import atexit
import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar

from ._batch import thread_writer
from ._config import CircuitBreakerConfig, CircuitState
from ._core import _LIVE, BACKGROUND, CALLER, OPERATOR, WRITER, BreakerCore, Permit, StateChangeHook
from ._dual import COMPLETED, Completed
from ._errors import RedisMisconfiguredError, StoreUnavailableError
from ._failsafe import (
    STORE_ERRORS,
    InFlight,
    classify,
    deliver,
    misconfig_hint,
    share_client,
    unshare_client,
)
from ._keys import DEFAULT_PREFIX
from ._ops import Code, ScriptCall
from ._sync import AsyncHub, MemoryHub, ThreadHub
from .metrics import CircuitBreakerMetrics, FleetWindow
from .stores import AsyncMemoryStore, AsyncRedisStore, MemoryStore, RedisStore

__all__ = [
    "AsyncCircuitBreaker",
    "AsyncCircuitBreakerInterface",
    "BaseCircuitBreaker",
    "CircuitBreaker",
    "CircuitBreakerInterface",
    "MetricsView",
]


#: How long close() and interpreter exit wait for pending outcomes (batched mode).
CLOSE_FLUSH_TIMEOUT_S = 5.0
#: Connect timeout of the connections that may wait (background, operator, writer).
SLOW_CONNECT_TIMEOUT_S = 1.0
_monotonic = time.monotonic
log = logging.getLogger("distbreaker")

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


class CircuitBreakerInterface(abc.ABC, Generic[T]):
    """What every synchronous breaker offers; `T` is the result type of guarded calls."""

    @abc.abstractmethod
    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

    @abc.abstractmethod
    def is_available(self) -> bool: ...

    @abc.abstractmethod
    def get_state(self) -> CircuitState: ...

    @abc.abstractmethod
    def get_metrics(self) -> CircuitBreakerMetrics: ...

    @abc.abstractmethod
    def reset(self) -> Completed: ...


class AsyncCircuitBreakerInterface(abc.ABC, Generic[T]):
    """The asyncio twin: `call` and `get_metrics` are coroutines; `reset` returns a task
    that has already started (an un-awaited reset still happens); `is_available` and
    `get_state` stay plain methods because they never do I/O."""

    @abc.abstractmethod
    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T: ...

    @abc.abstractmethod
    def is_available(self) -> bool: ...

    @abc.abstractmethod
    def get_state(self) -> CircuitState: ...

    @abc.abstractmethod
    def get_metrics(self) -> MetricsView: ...

    @abc.abstractmethod
    def reset(self) -> Awaitable[None]: ...


_V = TypeVar("_V", bound="MetricsView")


class MetricsView(CircuitBreakerMetrics):
    """`AsyncCircuitBreaker.get_metrics()`: this process's counts at once, and awaitable
    for the same with the fleet-wide window, so both ``b.get_metrics()`` (the seed's
    way) and ``await b.get_metrics()`` work."""

    @classmethod
    def of(cls: type[_V], m: CircuitBreakerMetrics, breaker: BreakerCore) -> _V:
        """`m`'s counts, as this class, remembering `breaker` (outside the fields)."""
        view = object.__new__(cls)
        view.__dict__.update(m.__dict__)
        view.__dict__["_breaker"] = breaker
        return view

    def __await__(self) -> Generator[Any, None, CircuitBreakerMetrics]:
        b: AsyncCircuitBreaker | None = self.__dict__.get("_breaker")
        if b is None:  # a copy (dataclasses.replace): the counts it holds
            return super().__await__()
        return b._metrics_with_fleet().__await__()

    def _fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def plain(self) -> CircuitBreakerMetrics:
        """The same counts as a plain CircuitBreakerMetrics (comparable, picklable)."""
        return CircuitBreakerMetrics(**self._fields())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CircuitBreakerMetrics):
            return bool(self.to_dict() == other.to_dict())
        return NotImplemented

    __hash__ = CircuitBreakerMetrics.__hash__

    def __reduce__(self) -> tuple[Any, ...]:
        return (_plain_metrics, (self._fields(),))

    def __deepcopy__(self, memo: dict[int, Any]) -> CircuitBreakerMetrics:
        return self.plain()


def _plain_metrics(kw: dict[str, Any]) -> CircuitBreakerMetrics:
    return CircuitBreakerMetrics(**kw)


class LocalMetrics(MetricsView):
    """`CircuitBreaker.get_metrics()`: this process's counts, read locally (no I/O);
    `fleet`, the fleet-wide window, is read from Redis when first used (one round trip,
    at most redis_timeout), so code that never looks at it never waits for it."""

    @property
    def fleet(self) -> FleetWindow | None:
        d = self.__dict__
        b: CircuitBreaker | None = d.pop("_breaker", None)
        if b is not None:  # read once, on first use
            d["fleet"] = b.fleet_window()
        return d.get("fleet")

    def __await__(self) -> Generator[Any, None, CircuitBreakerMetrics]:
        return CircuitBreakerMetrics.__await__(self)


def _is_coroutine_fn(fn: Any) -> bool:
    """A coroutine function, also behind functools.partial or a callable object."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    # an instance whose __call__ is async (a class itself returns an instance when called)
    return not isinstance(fn, type) and inspect.iscoroutinefunction(
        getattr(fn, "__call__", None))  # noqa: B004


def _is_async_client(obj: Any) -> bool:
    mod = type(obj).__module__
    return mod.startswith("redis.asyncio") or inspect.iscoroutinefunction(
        getattr(obj, "execute_command", None)
    )


def _check_client(redis: Any, want_async: bool) -> None:
    cls = "AsyncCircuitBreaker" if want_async else "CircuitBreaker"
    hint = "redis.asyncio.Redis.from_url(url)" if want_async else "redis.Redis.from_url(url)"
    if isinstance(redis, (str, bytes)):
        raise TypeError(f"redis must be a client, not a URL: pass {hint}")
    if not hasattr(redis, "register_script") or not hasattr(redis, "pubsub"):
        raise TypeError(
            f"redis must be a redis-py client (or None for an in-process store), "
            f"got {type(redis).__name__}: pass {hint}"
        )
    if _is_async_client(redis) != want_async:
        kind = "an asyncio" if not want_async else "a sync"
        other = "AsyncCircuitBreaker" if not want_async else "CircuitBreaker"
        raise TypeError(f"{cls} got {kind} client ({type(redis).__name__}); use {other}, "
                        f"or pass {hint}")


class _Protect:
    """`CircuitBreaker.protect()`: usable as ``with`` and as ``async with``.

    Under ``async with`` the Redis round trips of a sync client run in a worker thread, so
    the event loop never blocks on them; the local fast path runs inline.
    """

    __slots__ = ("_breaker", "_permit")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self._permit: Permit | None = None

    def __enter__(self) -> Permit:
        self._permit = self._breaker._admit()
        return self._permit

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._permit is not None
        self._breaker._done(self._permit, e, None)

    async def __aenter__(self) -> Permit:
        self._permit = await self._breaker.aadmit()
        return self._permit

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._permit is not None
        await self._breaker.afinish(self._permit, e, None)


class CircuitBreaker(BreakerCore, CircuitBreakerInterface[Any]):
    """A breaker shared through Redis, for threads and sync code.

    ``redis`` is a ``redis.Redis`` client, a `MemoryStore` to share in-process state, or
    None for a private in-process store. The constructor reads the shared state once so
    that `is_available()` is right from the start; afterwards no fast-path method waits on
    the network.
    """

    def __init__(
        self,
        name: str,
        config: CircuitBreakerConfig | None = None,
        *,
        redis: Any = None,
        on_state_change: StateChangeHook | None = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        super().__init__(name, config, prefix=prefix, on_state_change=on_state_change)
        self._store: MemoryStore | RedisStore
        if redis is None or isinstance(redis, MemoryStore):
            self._store = redis if redis is not None else MemoryStore()
            self._attach(MemoryHub, self._store, None)
        else:
            _check_client(redis, want_async=False)
            cfg = self.config
            self._store = RedisStore(share_client(redis, cfg.redis_timeout),
                                     share_client(redis, cfg.redis_background_timeout,
                                                  SLOW_CONNECT_TIMEOUT_S),
                                     cfg.redis_background_timeout)
            self._attach(ThreadHub, redis, redis)
        # Best effort: the listener retries, and the first call asks Redis anyway.
        with contextlib.suppress(Exception):
            self._refresh()

    # -- guarded calls ---------------------------------------------------------------------

    def call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``fn(*args, **kwargs)`` if the breaker admits it; record the outcome.

        Raises CircuitOpenError without calling `fn` when the breaker is open. Given a
        coroutine function (or a callable that returns an awaitable), it returns a
        coroutine to await: the outcome is recorded after the await, with
        `timeout_duration` applied as `asyncio.wait_for` does, and the Redis round trips
        run in the loop's executor. An outcome is never recorded for work not awaited.
        """
        if _is_coroutine_fn(fn):
            return self._acall(fn, args, kwargs)  # type: ignore[return-value]
        permit = self._fast_admit() or self._admit()
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            self._done(permit, e, None)
            raise
        if inspect.iscoroutine(result) or isinstance(result, asyncio.Future):
            # a lambda or wrapper around a coroutine: nothing has run yet. Hold no permit
            # for work that may never be awaited: give it back, admit again when awaited.
            self._release_unused(permit)
            return self._acall(None, (result,), {})  # type: ignore[return-value]
        self._done(permit, None, result)
        return result

    def _release_unused(self, permit: Permit) -> None:
        """Give back a permit without recording anything (only a lease has a cost)."""
        if permit.lease:
            call = self._call("record", "", permit.generation, int(Code.NONE), permit.lease, 0)
            with contextlib.suppress(Exception):
                self._after_record(call, self._run(call))

    async def _acall(self, fn: Callable[..., Any] | None, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
        """`fn` None: `args[0]` is the awaitable to guard, already created."""
        try:
            permit = await self.aadmit()
        except BaseException:
            if fn is None and inspect.iscoroutine(args[0]):
                args[0].close()  # rejected: it will never run
            raise
        try:
            work = args[0] if fn is None else fn(*args, **kwargs)
        except BaseException as e:
            await self.afinish(permit, e, None)
            raise
        return await self._await_and_finish(permit, work)

    async def _await_and_finish(self, permit: Permit, work: Awaitable[Any]) -> Any:
        timeout = self.config.timeout_duration
        try:
            if timeout is None:
                result = await work
            else:
                result = await asyncio.wait_for(work, timeout)
        except BaseException as e:
            await self.afinish(permit, e, None)
            raise
        await self.afinish(permit, None, result)
        return result

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Use the breaker as a decorator, of plain and of coroutine functions."""
        if _is_coroutine_fn(fn):
            @functools.wraps(fn)
            async def awrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self._acall(fn, args, kwargs)

            return awrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            return self.call(fn, *args, **kwargs)

        return wrapper

    def protect(self) -> _Protect:
        """Guard a block, with ``with`` or ``async with``: raises CircuitOpenError on entry
        if not admitted; an exception in the block is a failure (per the config),
        `permit.mark_failure()` marks one too. Under ``async with`` the Redis round trips
        run in the loop's executor, so the event loop never waits on them."""
        return _Protect(self)

    def _run(self, call: ScriptCall, mode: int = CALLER) -> Any:
        """Run a script call. A caller waits at most `redis_timeout`: without a reply by
        then its request finishes in the background (`_on_late`) and the caller goes on;
        when Redis fails, the fallback answers. An operator action (force, release,
        reset) must reach Redis: it waits longer, and raises StoreUnavailableError
        instead of falling back. See `_core.CALLER` for the other modes."""
        if not self._may_try_store(mode):
            return self._fallback_run(call)
        sent_at = _monotonic()
        try:
            if mode == CALLER:
                raw = self._store.run(call, self.config.redis_timeout, self._on_late)
            else:
                raw = self._store.run(call)
        except InFlight:
            return self._no_reply(call, sent_at)
        except STORE_ERRORS as e:
            alive = getattr(self._store, "alive", None)
            if self._stuck_writer(mode, e) and alive and alive(self.config.failover_after):
                self._store_answered(None)  # one stuck connection, not a silent Redis
                raise
            return self._store_failed(call, e, mode, sent_at)
        return self._store_answered(raw)

    def _on_late(self, call: ScriptCall, raw: Any, exc: BaseException | None) -> None:
        """A background thread: the outcome of a request whose caller went on."""
        events, give_back = self._late(call, raw, exc)
        self._fire(events)
        if give_back is not None:
            try:
                self._after_record(give_back, self._run(give_back, BACKGROUND))
            except Exception as e:  # the lease expires by itself
                log.debug("giving back a late probe lease failed: %s", e)

    def _admit(self) -> Permit:
        permit = self._fast_admit()
        if permit is None:
            call = self._acquire_call()
            permit, events = self._after_acquire(call, self._run(call))
            self._fire(events)
        return permit

    def _done(self, permit: Permit, exc: BaseException | None, result: Any) -> None:
        call = self._finish(permit, exc, result)
        if call is not None:
            self._fire(self._after_record(call, self._run(call)))

    # -- two-step use: for integrations that cannot wrap the call in a function ------------

    def admit(self) -> Permit:
        """Admit one call (or raise CircuitOpenError); finish the permit exactly once with
        `finish`. `call()` and `protect()` are thin layers over this pair."""
        return self._admit()

    def finish(self, permit: Permit, exc: BaseException | None = None,
               result: Any = None) -> None:
        """Record how an admitted call ended: the exception it raised, or its result."""
        self._done(permit, exc, result)

    async def aadmit(self) -> Permit:
        """`admit` from asyncio code: the snapshot decides inline; a Redis round trip runs
        in the loop's executor. If the caller is cancelled meanwhile, the permit is given
        back as soon as the round trip ends, so a probe lease is not held until it expires."""
        permit = self._fast_admit()
        if permit is not None:
            return permit
        if self._guard is None:  # the in-process store: no I/O to wait for
            return self._admit()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, self._admit)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(functools.partial(self._give_back, loop))
            raise

    def _give_back(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Permit]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        permit = fut.result()
        permit.mark_ignored()
        loop.run_in_executor(None, self._done, permit, None, None)

    async def afinish(self, permit: Permit, exc: BaseException | None = None,
                      result: Any = None) -> None:
        """`finish` from asyncio code; the round trip runs in the loop's executor and is
        not lost if the caller is cancelled meanwhile."""
        if self._guard is None:
            self._done(permit, exc, result)
            return
        loop = asyncio.get_running_loop()
        await asyncio.shield(loop.run_in_executor(None, self._done, permit, exc, result))

    # -- batched mode ----------------------------------------------------------------------

    def _wake(self) -> None:
        thread_writer().wake(self)

    def _flush_once(self) -> bool:
        """Send one batch of pending outcomes, if one is due and none is in flight;
        returns whether more are pending. Runs in the writer thread (or inline, see
        `flush`)."""
        call = self._batch_take()
        if call is None:
            return False
        try:
            more, events = self._batch_done(call, self._run(call, WRITER))
        except Exception as e:
            return self._batch_lost(e)
        self._fire(events)
        return more

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every outcome recorded so far is applied in Redis (batched mode;
        in strict mode there is never anything to wait for). Returns False on timeout."""
        b = self._batch
        if b is None or b.outstanding() == 0:
            return True
        w = thread_writer().thread
        if w is None or not w.is_alive() or w is threading.current_thread():
            return self._drain_inline(timeout)
        done = threading.Event()
        if not b.wait(done.set):
            return True
        b.hurry()  # after wait(): everything it waits for is sent without lingering
        self._wake()
        if done.wait(timeout):
            return True
        b.unwait(done.set)
        return False

    def _drain_inline(self, timeout: float | None) -> bool:
        """Send pending outcomes from this thread (no writer: interpreter exit, a forked
        child, or the writer itself asking)."""
        b = self._batch
        if b is None:
            return True
        target = b.recorded  # what was recorded when asked, not what keeps coming
        own = thread_writer().thread is threading.current_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b.applied < target:
            b.hurry()
            if self._flush_once():
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

    async def aflush(self, timeout: float | None = None) -> bool:
        """`flush` from asyncio code (the wait runs in the loop's executor)."""
        if self._batch is None or self._batch.outstanding() == 0:
            return True
        return await asyncio.get_running_loop().run_in_executor(None, self.flush, timeout)

    # -- state and operator actions --------------------------------------------------------

    def _refresh(self, background: bool = False) -> None:
        if background:
            seq = self._cell.seq
            self._after_snapshot(self._run(self._call("snapshot"), BACKGROUND), seq)
        else:
            self._after_snapshot(self._run(self._call("snapshot")))

    def check_redis(self) -> None:
        """Fail fast at start-up: read this breaker's state from Redis, waiting up to
        `redis_background_timeout`. Raises RedisMisconfiguredError (credentials, ACL, db
        index: with what to fix) or StoreUnavailableError (unreachable); returns None when
        Redis serves this breaker."""
        try:
            raw = self._store.run(self._call("snapshot"))
        except STORE_ERRORS as e:
            raise _check_error(self, e) from e
        self._store_answered(raw)
        self._after_snapshot(raw)

    def refresh(self) -> CircuitState:
        """Re-read the shared state now (one round trip) and return the effective state."""
        self._refresh()
        return self.get_state()

    def get_metrics(self) -> LocalMetrics:
        """This process's counts, read locally (no I/O); its `fleet` (the fleet-wide
        window) is read from Redis when first used."""
        return LocalMetrics.of(self._metrics(None), self)

    def fleet_window(self) -> FleetWindow | None:
        """The fleet-wide window alone, as Redis holds it now (one round trip, at most
        redis_timeout; None when Redis did not answer in time)."""
        return self._metrics(self._after_snapshot(self._run(self._call("snapshot")))).fleet

    def _run_op(self, op: str, *extra: str) -> None:
        call = self._call(op, *extra)
        self._fire(self._after_record(call, self._run(call, OPERATOR)))

    def reset(self) -> Completed:
        """Fleet-wide: back to CLOSED, counters and override cleared; and this process's
        metrics cleared."""
        self._run_op("reset")
        self._counters.clear()
        return COMPLETED

    def force_open(self) -> Completed:
        """Fleet-wide override: reject every call until `release()`."""
        self._run_op("force", "open")
        return COMPLETED

    def force_closed(self) -> Completed:
        """Fleet-wide override: admit every call until `release()`; outcomes are not counted."""
        self._run_op("force", "closed")
        return COMPLETED

    def release(self) -> Completed:
        """Clear the fleet-wide override; the breaker resumes from its own state."""
        self._run_op("force", "")
        return COMPLETED

    def close(self) -> None:
        """Send pending outcomes (batched mode), stop listening for this breaker and
        release its connections (the shared state in Redis stays). Idempotent."""
        if self._attached is not None and not self.flush(CLOSE_FLUSH_TIMEOUT_S):
            self._warn_unapplied("closed")
        client = self._attached[2] if self._attached is not None else None
        self._detach()
        if client is not None:
            for spare in _unshare(client, self.config):
                spare.close()

    def __enter__(self) -> CircuitBreaker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self.get_state().value}>"


class AsyncCircuitBreaker(BreakerCore, AsyncCircuitBreakerInterface[Any]):
    """The asyncio twin of `CircuitBreaker`, over a ``redis.asyncio.Redis`` client.

    A call that exceeds ``timeout_duration`` is cancelled and counts as a failure. Until the
    first call (or `refresh()`), the breaker has not read the shared state: that first call
    asks Redis before it runs, so a worker started while the fleet is OPEN never sends it.
    """

    def __init__(
        self,
        name: str,
        config: CircuitBreakerConfig | None = None,
        *,
        redis: Any = None,
        on_state_change: StateChangeHook | None = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        super().__init__(name, config, prefix=prefix, on_state_change=on_state_change)
        self._store: AsyncMemoryStore | AsyncRedisStore
        if redis is None or isinstance(redis, (MemoryStore, AsyncMemoryStore)):
            if isinstance(redis, AsyncMemoryStore):
                self._store = redis
            else:
                self._store = AsyncMemoryStore(redis)
            self._attach(MemoryHub, self._store.sync, None)
        else:
            _check_client(redis, want_async=True)
            cfg = self.config
            # one client: the caller's wait is bounded by the task it awaits, not a socket
            self._store = AsyncRedisStore(share_client(redis, cfg.redis_background_timeout,
                                                       SLOW_CONNECT_TIMEOUT_S))
            self._attach(AsyncHub, redis, redis)
        self._background: set[asyncio.Future[Any]] = set()
        self._drainer: asyncio.Task[None] | None = None
        self._urgent_evt: asyncio.Event | None = None

    async def call(
        self, fn: Callable[P, Awaitable[R]], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Await ``fn(*args, **kwargs)`` if admitted, with `timeout_duration` applied."""
        # The common cases (admitted from the snapshot, rejected, a batched outcome) run
        # inline, without awaiting helper coroutines: each costs about a microsecond.
        permit = self._fast_admit()
        if permit is None:
            permit = await self._admit()
        elif self._hub_task_missing():
            self._hub_running()
        timeout = self.config.timeout_duration
        try:
            work = fn(*args, **kwargs)
            if not inspect.isawaitable(work):  # a plain function: its result as it is
                result: Any = work
            elif timeout is None:
                result = await work
            else:
                result = await asyncio.wait_for(work, timeout)
        except asyncio.TimeoutError as e:
            await self._done(permit, e, None, timed_out=timeout is not None)
            raise
        except BaseException as e:
            await self._done(permit, e, None)
            raise
        record = self._finish(permit, None, result)
        if record is not None:
            self._fire(self._after_record(record, await self._run(record)))
        return result  # type: ignore[no-any-return]

    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        """Use the breaker as a decorator of coroutine functions (a plain function would
        have to run on the event loop: guard it with `CircuitBreaker`)."""
        if not _is_coroutine_fn(fn):
            raise TypeError(f"{getattr(fn, '__qualname__', fn)!r} is not a coroutine function: "
                            "use CircuitBreaker")

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            return await self.call(fn, *args, **kwargs)

        return wrapper

    @asynccontextmanager
    async def protect(self) -> AsyncIterator[Permit]:
        """``async with breaker.protect() as permit:``; see `CircuitBreaker.protect`."""
        permit = await self._admit()
        try:
            yield permit
        except BaseException as e:
            await self._done(permit, e, None)
            raise
        await self._done(permit, None, None)

    async def _run(self, call: ScriptCall, mode: int = CALLER) -> Any:
        """See `CircuitBreaker._run`. A caller cancelled while Redis answers does not
        cancel the request: its outcome is applied when it comes (a granted probe lease
        is given back)."""
        if not self._may_try_store(mode):
            return self._fallback_run(call)
        sent_at = _monotonic()
        try:
            if mode == CALLER:
                # The request is a task the caller stops awaiting after redis_timeout (or
                # when cancelled); a bare future and a timer cost less than asyncio.wait.
                loop = asyncio.get_running_loop()
                task = loop.create_task(self._store.run(call))
                waiter = loop.create_future()
                task.add_done_callback(functools.partial(_wake, waiter))
                timer = loop.call_later(self.config.redis_timeout, _wake, waiter, None)
                try:
                    await waiter
                except asyncio.CancelledError:
                    task.add_done_callback(self._late_callback(call))
                    raise
                finally:
                    timer.cancel()
                if not task.done():
                    task.add_done_callback(self._late_callback(call))
                    return self._no_reply(call, sent_at)
                raw = task.result()
            else:
                raw = await self._store.run(call)
        except STORE_ERRORS as e:
            alive = getattr(self._store, "alive", None)
            if (self._stuck_writer(mode, e) and alive
                    and await alive(self.config.failover_after)):
                self._store_answered(None)  # one stuck connection, not a silent Redis
                raise
            return self._store_failed(call, e, mode, sent_at)
        return self._store_answered(raw)

    def _late_callback(self, call: ScriptCall) -> Callable[[asyncio.Future[Any]], None]:
        return functools.partial(deliver, functools.partial(self._on_late, call))

    def _on_late(self, call: ScriptCall, raw: Any, exc: BaseException | None) -> None:
        """On the event loop: the outcome of a request whose caller went on."""
        events, give_back = self._late(call, raw, exc)
        self._fire(events)
        if give_back is not None:
            t = asyncio.ensure_future(self._give_back(give_back))
            self._background.add(t)  # keep a reference until it is done
            t.add_done_callback(self._background.discard)

    async def _give_back(self, call: ScriptCall) -> None:
        try:
            self._after_record(call, await self._run(call, BACKGROUND))
        except Exception as e:  # the lease expires by itself
            log.debug("giving back a late probe lease failed: %s", e)

    async def _admit(self) -> Permit:
        self._hub_running()
        permit = self._fast_admit()
        if permit is None:
            call = self._acquire_call()
            permit, events = self._after_acquire(call, await self._run(call))
            self._fire(events)
        return permit

    async def admit(self) -> Permit:
        """Admit one call (or raise CircuitOpenError); finish it exactly once with `finish`.
        Cancelling the caller while Redis answers gives a granted probe lease back."""
        return await self._admit()

    async def finish(self, permit: Permit, exc: BaseException | None = None,
                     result: Any = None) -> None:
        """Record how an admitted call ended: the exception it raised, or its result."""
        await self._done(permit, exc, result)

    def _hub_running(self) -> None:
        hub = self._hub
        if isinstance(hub, AsyncHub):
            hub.ensure_running()

    def _hub_task_missing(self) -> bool:
        """Cheap check for the fast path: is the listener task not running (not started
        yet, or ended with a previous event loop)?"""
        hub = self._hub
        if not isinstance(hub, AsyncHub):
            return False
        task = hub._task
        return task is None or task.done()

    async def _done(
        self, permit: Permit, exc: BaseException | None, result: Any, *, timed_out: bool = False
    ) -> None:
        call = self._finish(permit, exc, result, timed_out=timed_out)
        if call is not None:
            self._fire(self._after_record(call, await self._run(call)))

    # -- batched mode ----------------------------------------------------------------------

    def _wake(self) -> None:
        """Start this breaker's drain task on the running loop unless one is running
        (called from the loop's thread: no await between the check and the start)."""
        t = self._drainer
        if t is None or t.done() or t.get_loop() is not asyncio.get_running_loop():
            self._urgent_evt = None  # an Event belongs to the loop that first waits on it
            self._drainer = asyncio.get_running_loop().create_task(
                self._drain(), name=f"distbreaker-writer-{self.name}")
        elif self._urgent_evt is not None:
            self._urgent_evt.set()

    async def _drain(self) -> None:
        """Send pending outcomes, one call at a time, until none are left. Cancelled (the
        loop is shutting down), it still sends what is pending, then re-raises; the batch
        that was in flight counts as lost rather than risk counting it twice."""
        cancelled = False
        while True:
            call = self._batch_take()
            if call is None:
                due = self._batch_due()
                if due == math.inf:
                    break
                try:  # the linger: wait for more outcomes, or for flush() / a trip
                    evt = self._urgent_evt = self._urgent_evt or asyncio.Event()
                    await asyncio.wait_for(evt.wait(), max(0.0, due - time.monotonic()))
                except asyncio.TimeoutError:
                    pass
                except asyncio.CancelledError:
                    cancelled = True
                    if self._batch is not None:
                        self._batch.hurry()
                if self._urgent_evt is not None:
                    self._urgent_evt.clear()
                continue
            try:
                _, events = self._batch_done(call, await self._run(call, WRITER))
            except (Exception, asyncio.CancelledError) as e:
                cancelled = cancelled or isinstance(e, asyncio.CancelledError)
                self._batch_lost(e)
                continue
            self._fire(events)
        if cancelled:
            raise asyncio.CancelledError

    def _after_fork(self) -> None:
        super()._after_fork()
        # the parent's tasks belong to its event loop, which does not run here
        self._drainer = None
        self._urgent_evt = None
        self._background = set()

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every outcome recorded so far is applied in Redis (batched mode).
        Returns False on timeout."""
        b = self._batch
        if b is None:
            return True
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
        self._wake()
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            b.unwait(notify)
            return False
        return True

    async def _refresh(self, background: bool = False) -> None:
        if background:
            seq = self._cell.seq
            self._after_snapshot(await self._run(self._call("snapshot"), BACKGROUND), seq)
        else:
            self._after_snapshot(await self._run(self._call("snapshot")))

    async def check_redis(self) -> None:
        """See `CircuitBreaker.check_redis`."""
        self._hub_running()
        try:
            raw = await self._store.run(self._call("snapshot"))
        except STORE_ERRORS as e:
            raise _check_error(self, e) from e
        self._store_answered(raw)
        self._after_snapshot(raw)

    async def refresh(self) -> CircuitState:
        """Re-read the shared state now (one round trip) and start the listener."""
        self._hub_running()
        await self._refresh()
        return self.get_state()

    def get_metrics(self) -> MetricsView:
        """This process's counts, read locally (no I/O): a plain call, as on
        `CircuitBreaker`. ``await`` it for the same plus the fleet-wide window (one round
        trip)."""
        return MetricsView.of(self._metrics(None), self)

    async def fleet_window(self) -> FleetWindow | None:
        """The fleet-wide window alone, as Redis holds it now (one round trip)."""
        return (await self._metrics_with_fleet()).fleet

    async def _metrics_with_fleet(self) -> CircuitBreakerMetrics:
        return self._metrics(self._after_snapshot(await self._run(self._call("snapshot"))))

    async def _run_op(self, op: str, *extra: str) -> None:
        self._hub_running()
        call = self._call(op, *extra)
        self._fire(self._after_record(call, await self._run(call, OPERATOR)))

    # Operator actions start at once, as a task: one whose result is not awaited still
    # happens (a forgotten `await` must not silently drop a reset); await it for errors.

    def reset(self) -> asyncio.Task[None]:
        """Fleet-wide: back to CLOSED, counters and override cleared; and this process's
        metrics cleared. Starts now; await the returned task for its outcome."""
        return self._start(self._reset())

    async def _reset(self) -> None:
        await self._run_op("reset")
        self._counters.clear()

    def force_open(self) -> asyncio.Task[None]:
        """Fleet-wide override: reject every call until `release()`. Starts now."""
        return self._start(self._run_op("force", "open"))

    def force_closed(self) -> asyncio.Task[None]:
        """Fleet-wide override: admit every call until `release()`. Starts now."""
        return self._start(self._run_op("force", "closed"))

    def release(self) -> asyncio.Task[None]:
        """Clear the fleet-wide override. Starts now."""
        return self._start(self._run_op("force", ""))

    def _start(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if inspect.iscoroutine(coro):
                coro.close()
            raise RuntimeError(f"AsyncCircuitBreaker {self.name!r}: operator actions need a "
                               "running event loop; from sync code use CircuitBreaker (or "
                               "the distbreaker CLI)") from None
        task: asyncio.Task[None] = loop.create_task(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close(self) -> None:
        """Finish pending operator actions and send pending outcomes (batched mode), stop
        listening for this breaker and release its connections. Idempotent."""
        pending = [t for t in self._background if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_FLUSH_TIMEOUT_S)
        if self._attached is not None and not await self.flush(CLOSE_FLUSH_TIMEOUT_S):
            self._warn_unapplied("closed")
        client = self._attached[2] if self._attached is not None else None
        self._detach()
        if client is not None:
            for spare in _unshare(client, self.config, asynchronous=True):
                await spare.aclose()

    async def __aenter__(self) -> AsyncCircuitBreaker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncCircuitBreaker {self.name!r} {self.get_state().value}>"


def _wake(waiter: asyncio.Future[None], _: Any) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _unshare(client: Any, cfg: CircuitBreakerConfig, asynchronous: bool = False) -> list[Any]:
    """Give back this breaker's shared derived clients; returns those to close."""
    keys: list[tuple[float, float | None]] = [(cfg.redis_background_timeout,
                                               SLOW_CONNECT_TIMEOUT_S)]
    if not asynchronous:
        keys.append((cfg.redis_timeout, None))
    spares = [unshare_client(client, t, c) for t, c in keys]
    return [x for x in spares if x is not None]


def _check_error(b: BreakerCore, exc: BaseException) -> Exception:
    """The error check_redis() raises for `exc`, telling misconfiguration apart."""
    label = b._guard.label if b._guard is not None else "Redis"
    if classify(exc) == "misconfig":
        return RedisMisconfiguredError(f"breaker {b.name!r}: {misconfig_hint(exc, label)}")
    return StoreUnavailableError(b.name, b.get_state(), None,
                                 f"Redis at {label} did not serve this breaker: {exc}")


#: The seed's name for the breaker: `CircuitBreaker` itself, which guards plain functions
#: and coroutine functions alike (``await b.call(coro_fn)``, ``async with b.protect()``),
#: on the in-process store or, with ``redis=``, shared through Redis.
BaseCircuitBreaker = CircuitBreaker


def _flush_at_exit() -> None:
    """Interpreter exit: send what sync breakers still hold (batched mode). An asyncio
    breaker's loop is gone by now; its drain task sent what it could when the loop
    cancelled it, and anything left is reported."""
    for b in list(_LIVE):
        batch = b._batch
        if batch is None or batch.outstanding() == 0:
            continue
        if isinstance(b, CircuitBreaker):
            with contextlib.suppress(Exception):
                b._drain_inline(CLOSE_FLUSH_TIMEOUT_S)
        if batch.outstanding():
            b._warn_unapplied("at exit (close() the breaker or flush() it before the event "
                              "loop ends)")


atexit.register(_flush_at_exit)
