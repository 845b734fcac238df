"""`CircuitBreaker` and `AsyncCircuitBreaker`: the public shells.

Each holds a `BreakerCore` (the decisions, no I/O) and an engine that runs the core's
script calls through a store (`_sync_engine.SyncEngine`, `_async_engine.AsyncEngine`).
The methods here only check arguments and pass on to one of the two: the local reads
(`is_available`, `get_state`, listeners) are the same code for both, in `_Shell`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import functools
import inspect
import math
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar

from ._announce import StateChangeHook
from ._async_engine import AsyncEngine
from ._clients import STORE_ERRORS, share_client, unshare_client
from ._config import CircuitBreakerConfig, CircuitState
from ._core import BreakerCore
from ._dual import COMPLETED, Completed
from ._errors import RedisMisconfiguredError, StoreUnavailableError
from ._guard import classify, misconfig_hint
from ._keys import DEFAULT_PREFIX
from ._listener import AsyncHub, MemoryHub, ThreadHub
from ._outcome import Permit
from ._snapshot import LocalSnapshot, SnapshotCell
from ._sync_engine import SyncEngine
from .events import Listener
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


#: Connect timeout of the connections that may wait (background, operator, writer).
SLOW_CONNECT_TIMEOUT_S = 1.0
_monotonic = time.monotonic
_sleep = time.sleep
_YIELD_EVERY_S = 0.0005
_INF = math.inf

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
    def of(cls: type[_V], m: CircuitBreakerMetrics, breaker: Any) -> _V:
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


_CO_COROUTINE = inspect.CO_COROUTINE
_FUNCTION, _METHOD = types.FunctionType, types.MethodType


def _is_coroutine_fn(fn: Any) -> bool:
    """A coroutine function, also behind functools.partial or a callable object."""
    t = type(fn)
    if t is _METHOD:
        fn, t = fn.__func__, type(fn.__func__)
    if t is _FUNCTION and not hasattr(fn, "_is_coroutine_marker"):
        # the common case, in a tenth of inspect's time (on every call)
        return bool(fn.__code__.co_flags & _CO_COROUTINE)
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
        self._permit = self._breaker._engine.admit()
        return self._permit

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._permit is not None
        self._breaker._engine.done(self._permit, e, None)

    async def __aenter__(self) -> Permit:
        self._permit = await self._breaker.aadmit()
        return self._permit

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._permit is not None
        await self._breaker.afinish(self._permit, e, None)


class _Shell:
    """What both breakers offer without I/O, read from the core they hold."""

    _core: BreakerCore
    _cell: SnapshotCell
    #: When is_available() next lets the listener thread have the GIL: -inf for a
    #: threaded listener (at once, then every half millisecond), +inf without one.
    _yield_at: float

    def _hold(self, name: str, config: CircuitBreakerConfig | None, prefix: str,
              on_state_change: StateChangeHook | None) -> BreakerCore:
        core = self._core = BreakerCore(name, config, prefix=prefix,
                                        on_state_change=on_state_change)
        self._cell = core.cell
        self._yield_at = _INF
        self.name = core.name
        self.config = core.config
        self.prefix = core.prefix
        self.keys = core.keys
        self.channel = core.channel
        return core

    def is_available(self) -> bool:
        """Whether a call would be admitted now, from the local snapshot: no I/O.

        False while OPEN (until the open period ends), while forced open, and while
        HALF_OPEN once this process knows every probe permit is taken.

        At most every half millisecond it also lets go of the GIL for a moment, so that the
        listener thread can apply a trip that has arrived even when the caller polls in a
        loop that never releases the GIL (otherwise it would wait for the interpreter's
        5 ms switch interval, several times over on a busy machine).
        """
        now = _monotonic()
        if now >= self._yield_at:
            self._yield_at = now + _YIELD_EVERY_S
            _sleep(0)
        return now >= self._cell.admit_from

    def get_state(self) -> CircuitState:
        """The effective state (override included) as this process last saw it. An OPEN
        breaker stays OPEN after its open period until a call asks Redis (which moves it
        to HALF_OPEN and makes that call the probe); `is_available()` is True then."""
        return self._cell.snap.state

    @property
    def state(self) -> CircuitState:
        """`get_state()`, as an attribute (the seed's way)."""
        return self._cell.snap.state

    @property
    def snapshot(self) -> LocalSnapshot:
        """The local view: state, override, generation, and when Redis last said so."""
        return self._cell.snap

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(event)` for transitions (made here or learned over pub/sub),
        rejections and Redis outages; see `distbreaker.events`."""
        self._core.announcer.add(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling `listener`."""
        self._core.announcer.remove(listener)

    @property
    def store_degraded(self) -> bool:
        """True while Redis is unavailable and this breaker runs on its fallback."""
        return self._core.fallback.degraded

    @property
    def store_problem(self) -> str | None:
        """While Redis refuses this process for a configuration reason (credentials, ACL,
        db index): what to fix. None otherwise."""
        return self._core.fallback.problem

    @property
    def config_drift(self) -> bool:
        """True when the config fingerprint in Redis is another config's (processes
        sharing a breaker should share its config)."""
        return self._core.replies.config_drift

    @property
    def test_clock(self) -> int | None:
        """The clock set by `set_test_clock` (milliseconds), or None: Redis time."""
        return self._core.calls.clock_ms

    def set_test_clock(self, ms: int | None) -> None:
        """For tests: replace Redis TIME in this breaker's scripts with `ms` (milliseconds
        since the epoch), or go back to Redis time with None. Open periods, windows and
        probe leases then move only when the test moves the clock, so time-dependent
        behaviour is tested without sleeping. Every breaker sharing the name must use the
        same clock; never set it in production."""
        if ms is not None and (isinstance(ms, bool) or not isinstance(ms, int) or ms < 0):
            raise ValueError(f"the test clock is a non-negative int of milliseconds, "
                             f"got {ms!r}")
        self._core.calls.clock_ms = ms


class CircuitBreaker(_Shell, CircuitBreakerInterface[Any]):
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
        core = self._hold(name, config, prefix, on_state_change)
        store: MemoryStore | RedisStore
        if redis is None or isinstance(redis, MemoryStore):
            store = redis if redis is not None else MemoryStore()
            self._engine = SyncEngine(core, store, MemoryHub, store, None)
        else:
            _check_client(redis, want_async=False)
            cfg = core.config
            store = RedisStore(share_client(redis, cfg.redis_timeout),
                               share_client(redis, cfg.redis_background_timeout,
                                            SLOW_CONNECT_TIMEOUT_S),
                               cfg.redis_background_timeout)
            self._engine = SyncEngine(core, store, ThreadHub, redis, redis)
            self._yield_at = -_INF  # a listener thread: let it have the GIL now and then
        self._store = store
        # Best effort: the listener retries, and the first call asks Redis anyway.
        with contextlib.suppress(Exception):
            self._engine.refresh()

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
        engine = self._engine
        permit = self._core.fast_admit() or engine.admit()
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            engine.done(permit, e, None)
            raise
        if inspect.iscoroutine(result) or isinstance(result, asyncio.Future):
            # a lambda or wrapper around a coroutine: nothing has run yet. Hold no permit
            # for work that may never be awaited: give it back, admit again when awaited.
            engine.release_unused(permit)
            return self._acall(None, (result,), {})  # type: ignore[return-value]
        engine.done(permit, None, result)
        return result

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

    # -- two-step use: for integrations that cannot wrap the call in a function ------------

    def admit(self) -> Permit:
        """Admit one call (or raise CircuitOpenError); finish the permit exactly once with
        `finish`. `call()` and `protect()` are thin layers over this pair."""
        return self._engine.admit()

    def finish(self, permit: Permit, exc: BaseException | None = None,
               result: Any = None) -> None:
        """Record how an admitted call ended: the exception it raised, or its result."""
        self._engine.done(permit, exc, result)

    async def aadmit(self) -> Permit:
        """`admit` from asyncio code: the snapshot decides inline; a Redis round trip runs
        in the loop's executor. If the caller is cancelled meanwhile, the permit is given
        back as soon as the round trip ends, so a probe lease is not held until it expires."""
        permit = self._core.fast_admit()
        if permit is not None:
            return permit
        engine = self._engine
        if self._core.fallback.guard is None:  # the in-process store: no I/O to wait for
            return engine.admit()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, engine.admit)
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
        loop.run_in_executor(None, self._engine.done, permit, None, None)

    async def afinish(self, permit: Permit, exc: BaseException | None = None,
                      result: Any = None) -> None:
        """`finish` from asyncio code; the round trip runs in the loop's executor and is
        not lost if the caller is cancelled meanwhile."""
        engine = self._engine
        if self._core.fallback.guard is None:
            engine.done(permit, exc, result)
            return
        loop = asyncio.get_running_loop()
        await asyncio.shield(loop.run_in_executor(None, engine.done, permit, exc, result))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every outcome recorded so far is applied in Redis (batched mode;
        in strict mode there is never anything to wait for). Returns False on timeout."""
        return self._engine.flush(timeout)

    async def aflush(self, timeout: float | None = None) -> bool:
        """`flush` from asyncio code (the wait runs in the loop's executor)."""
        b = self._core.batch
        if b is None or b.outstanding() == 0:
            return True
        return await asyncio.get_running_loop().run_in_executor(None, self.flush, timeout)

    # -- state and operator actions --------------------------------------------------------

    def check_redis(self) -> None:
        """Fail fast at start-up: read this breaker's state from Redis, waiting up to
        `redis_background_timeout`. Raises RedisMisconfiguredError (credentials, ACL, db
        index: with what to fix) or StoreUnavailableError (unreachable); returns None when
        Redis serves this breaker."""
        try:
            self._engine.check()
        except STORE_ERRORS as e:
            raise _check_error(self, e) from e

    def refresh(self) -> CircuitState:
        """Re-read the shared state now (one round trip) and return the effective state."""
        self._engine.refresh()
        return self.get_state()

    def get_metrics(self) -> LocalMetrics:
        """This process's counts, read locally (no I/O); its `fleet` (the fleet-wide
        window) is read from Redis when first used."""
        return LocalMetrics.of(self._core.metrics(None), self)

    def fleet_window(self) -> FleetWindow | None:
        """The fleet-wide window alone, as Redis holds it now (one round trip, at most
        redis_timeout; None when Redis did not answer in time)."""
        return self._core.metrics(self._engine.refresh()).fleet

    def reset(self) -> Completed:
        """Fleet-wide: back to CLOSED, counters and override cleared; and this process's
        metrics cleared."""
        self._engine.op("reset")
        self._core.counters.clear()
        return COMPLETED

    def force_open(self) -> Completed:
        """Fleet-wide override: reject every call until `release()`."""
        self._engine.op("force", "open")
        return COMPLETED

    def force_closed(self) -> Completed:
        """Fleet-wide override: admit every call until `release()`; outcomes are not counted."""
        self._engine.op("force", "closed")
        return COMPLETED

    def release(self) -> Completed:
        """Clear the fleet-wide override; the breaker resumes from its own state."""
        self._engine.op("force", "")
        return COMPLETED

    def stop_listening(self) -> None:
        """Stop applying the channel's news to this object (the manager does it to a
        breaker it has replaced); calls still work, each asking Redis as it must."""
        self._engine.detach()

    def close(self) -> None:
        """Send pending outcomes (batched mode), stop listening for this breaker and
        release its connections (the shared state in Redis stays). Idempotent."""
        client = self._engine.close()
        if client is not None:
            for spare in _unshare(client, self.config):
                spare.close()

    def __enter__(self) -> CircuitBreaker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self.get_state().value}>"


class AsyncCircuitBreaker(_Shell, AsyncCircuitBreakerInterface[Any]):
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
        core = self._hold(name, config, prefix, on_state_change)
        store: AsyncMemoryStore | AsyncRedisStore
        if redis is None or isinstance(redis, (MemoryStore, AsyncMemoryStore)):
            store = redis if isinstance(redis, AsyncMemoryStore) else AsyncMemoryStore(redis)
            self._engine = AsyncEngine(core, store, MemoryHub, store.sync, None)
        else:
            _check_client(redis, want_async=True)
            # one client: the caller's wait is bounded by the task it awaits, not a socket
            store = AsyncRedisStore(share_client(redis, core.config.redis_background_timeout,
                                                 SLOW_CONNECT_TIMEOUT_S))
            self._engine = AsyncEngine(core, store, AsyncHub, redis, redis)
        self._store = store

    async def call(
        self, fn: Callable[P, Awaitable[R]], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Await ``fn(*args, **kwargs)`` if admitted, with `timeout_duration` applied."""
        # The common cases (admitted from the snapshot, rejected, a batched outcome) run
        # inline, without awaiting helper coroutines: each costs about a microsecond.
        core, engine = self._core, self._engine
        permit = core.fast_admit()
        if permit is None:
            permit = await engine.admit()
        elif engine.hub_task_missing():
            engine.hub_running()
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
            await engine.done(permit, e, None, timed_out=timeout is not None)
            raise
        except BaseException as e:
            await engine.done(permit, e, None)
            raise
        record = core.finish(permit, None, result)
        if record is not None:
            core.announcer.fire(core.replies.record(record, await engine.run(record)))
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
        engine = self._engine
        permit = await engine.admit()
        try:
            yield permit
        except BaseException as e:
            await engine.done(permit, e, None)
            raise
        await engine.done(permit, None, None)

    async def admit(self) -> Permit:
        """Admit one call (or raise CircuitOpenError); finish it exactly once with `finish`.
        Cancelling the caller while Redis answers gives a granted probe lease back."""
        return await self._engine.admit()

    async def finish(self, permit: Permit, exc: BaseException | None = None,
                     result: Any = None) -> None:
        """Record how an admitted call ended: the exception it raised, or its result."""
        await self._engine.done(permit, exc, result)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every outcome recorded so far is applied in Redis (batched mode).
        Returns False on timeout."""
        w = self._engine.writer
        return True if w is None else await w.flush(timeout)

    async def check_redis(self) -> None:
        """See `CircuitBreaker.check_redis`."""
        try:
            await self._engine.check()
        except STORE_ERRORS as e:
            raise _check_error(self, e) from e

    async def refresh(self) -> CircuitState:
        """Re-read the shared state now (one round trip) and start the listener."""
        self._engine.hub_running()
        await self._engine.refresh()
        return self.get_state()

    def get_metrics(self) -> MetricsView:
        """This process's counts, read locally (no I/O): a plain call, as on
        `CircuitBreaker`. ``await`` it for the same plus the fleet-wide window (one round
        trip)."""
        return MetricsView.of(self._core.metrics(None), self)

    async def fleet_window(self) -> FleetWindow | None:
        """The fleet-wide window alone, as Redis holds it now (one round trip)."""
        return (await self._metrics_with_fleet()).fleet

    async def _metrics_with_fleet(self) -> CircuitBreakerMetrics:
        return self._core.metrics(await self._engine.refresh())

    # Operator actions start at once, as a task: one whose result is not awaited still
    # happens (a forgotten `await` must not silently drop a reset); await it for errors.

    def reset(self) -> asyncio.Task[None]:
        """Fleet-wide: back to CLOSED, counters and override cleared; and this process's
        metrics cleared. Starts now; await the returned task for its outcome."""
        return self._engine.start(self._reset())

    async def _reset(self) -> None:
        await self._engine.op("reset")
        self._core.counters.clear()

    def force_open(self) -> asyncio.Task[None]:
        """Fleet-wide override: reject every call until `release()`. Starts now; await the
        returned task for its outcome."""
        return self._engine.start(self._engine.op("force", "open"))

    def force_closed(self) -> asyncio.Task[None]:
        """Fleet-wide override: admit every call until `release()`; outcomes are not
        counted. Starts now; await the returned task for its outcome."""
        return self._engine.start(self._engine.op("force", "closed"))

    def release(self) -> asyncio.Task[None]:
        """Clear the fleet-wide override; the breaker resumes from its own state. Starts
        now; await the returned task for its outcome."""
        return self._engine.start(self._engine.op("force", ""))

    def stop_listening(self) -> None:
        """See `CircuitBreaker.stop_listening`."""
        self._engine.detach()

    async def close(self) -> None:
        """Finish pending operator actions and send pending outcomes (batched mode), stop
        listening for this breaker and release its connections. Idempotent."""
        client = await self._engine.close()
        if client is not None:
            for spare in _unshare(client, self.config, asynchronous=True):
                await spare.aclose()

    async def __aenter__(self) -> AsyncCircuitBreaker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncCircuitBreaker {self.name!r} {self.get_state().value}>"


def _unshare(client: Any, cfg: CircuitBreakerConfig, asynchronous: bool = False) -> list[Any]:
    """Give back this breaker's shared derived clients; returns those to close."""
    keys: list[tuple[float, float | None]] = [(cfg.redis_background_timeout,
                                               SLOW_CONNECT_TIMEOUT_S)]
    if not asynchronous:
        keys.append((cfg.redis_timeout, None))
    spares = [unshare_client(client, t, c) for t, c in keys]
    return [x for x in spares if x is not None]


def _check_error(b: _Shell, exc: BaseException) -> Exception:
    """The error check_redis() raises for `exc`, telling misconfiguration apart."""
    g = b._core.fallback.guard
    label = g.label if g is not None else "Redis"
    if classify(exc) == "misconfig":
        return RedisMisconfiguredError(f"breaker {b.name!r}: {misconfig_hint(exc, label)}")
    return StoreUnavailableError(b.name, b.get_state(), None,
                                 f"Redis at {label} did not serve this breaker: {exc}")


#: The seed's name for the breaker: `CircuitBreaker` itself, which guards plain functions
#: and coroutine functions alike (``await b.call(coro_fn)``, ``async with b.protect()``),
#: on the in-process store or, with ``redis=``, shared through Redis.
BaseCircuitBreaker = CircuitBreaker
