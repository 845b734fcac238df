"""Uniform adapters for peer circuit-breaker libraries that keep breaker state in Redis.

The benchmark runner measures these side by side with distbreaker::

    from peers import available_peers, make

    for name in available_peers():
        adapter = make(name, port, "bench-1")
        ...  # adapter.ok(), adapter.check(), adapter.trip(), adapter.rejected(), adapter.close()

Every method of a sync peer (``Peer.is_async`` False) runs and returns directly; every
method of an async peer returns a coroutine, to be awaited in one event loop (the one that
first uses the adapter; its clients and background tasks are bound to that loop).

Each breaker uses its library's Redis-backed storage, a failure threshold of
``FAILURE_THRESHOLD`` and an open duration of ``RECOVERY_TIMEOUT`` seconds, so that a tripped
breaker stays OPEN for a whole measurement. ``make`` does not reset state that an earlier
breaker of the same name left in Redis: several adapters of one name share one breaker.

The peer libraries (and redis-py) are imported only inside ``make``, so this module imports
without any of them installed. Only their public APIs are used, with one workaround:
purgatory 3.0.1's ``SyncRedisUnitOfWork`` builds a ``redis.asyncio`` client and so fails on its
first call; the adapter gives its repository a sync ``redis.Redis`` (see ``_make_purgatory_sync``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, Protocol

__all__ = [
    "FAILURE_THRESHOLD",
    "HOST",
    "PEERS",
    "RECOVERY_TIMEOUT",
    "Adapter",
    "Peer",
    "available_peers",
    "make",
]

HOST = "127.0.0.1"
FAILURE_THRESHOLD = 5
RECOVERY_TIMEOUT = 120.0  # seconds OPEN before a probe is allowed; >= 60 by design
TRIP_CONFIRM_TIMEOUT = 5.0  # seconds to wait for a trip written in the background


@dataclass
class Peer:
    """What a peer library is and how it uses Redis."""

    name: str
    package: str  # PyPI distribution name, for version lookup
    is_async: bool
    records_in_redis: bool  # call outcomes / failure counters are stored in Redis
    shares_window: bool  # the failure window is fleet-wide
    note: str  # how it uses Redis (measured), one line


class Adapter(Protocol):
    """One breaker of a peer library; see the module docstring for sync/async."""

    peer: Peer
    # The library's availability/state check: True when it reports the breaker not OPEN
    # (HALF_OPEN counts as available). None if the library has none.
    check: Callable[[], Any] | None

    def ok(self) -> Any:
        """One successful guarded call of a no-op that returns 1."""

    def trip(self) -> Any:
        """Put the breaker into OPEN with ``FAILURE_THRESHOLD`` failing guarded calls.

        Returns once OPEN is stored in Redis (interlock-cb writes it in the background).
        """

    def rejected(self) -> Any:
        """One guarded call while OPEN; True if the library's open error rejected it."""

    def close(self) -> Any:
        """Release the breaker's connections and background work."""


class _Failure(Exception):
    """The failure that ``trip`` makes the guarded function raise."""


def _noop() -> int:
    return 1


async def _anoop() -> int:
    return 1


def _fail() -> int:
    raise _Failure("peer benchmark: induced failure")


async def _afail() -> int:
    raise _Failure("peer benchmark: induced failure")


class _SyncAdapter:
    """Adapter over a sync breaker, given its guarded calls."""

    def __init__(
        self,
        peer: Peer,
        *,
        call_ok: Callable[[], Any],
        call_fail: Callable[[], Any],
        open_error: type[BaseException],
        check: Callable[[], bool] | None,
        release: Callable[[], Any],
        confirm_trip: Callable[[], Any] | None = None,
    ) -> None:
        self.peer = peer
        self.check = check
        self._call_ok = call_ok
        self._call_fail = call_fail
        self._open_error = open_error
        self._release = release
        self._confirm_trip = confirm_trip

    def ok(self) -> Any:
        """One successful guarded call."""
        return self._call_ok()

    def trip(self) -> None:
        """Fail ``FAILURE_THRESHOLD`` guarded calls."""
        for _ in range(FAILURE_THRESHOLD):
            with contextlib.suppress(_Failure, self._open_error):
                self._call_fail()
        if self._confirm_trip is not None:
            self._confirm_trip()

    def rejected(self) -> bool:
        """One guarded call; True if the breaker rejected it."""
        try:
            self._call_ok()
        except self._open_error:
            return True
        return False

    def close(self) -> None:
        """Release connections."""
        self._release()


class _AsyncAdapter:
    """Adapter over an async breaker; every method returns a coroutine."""

    def __init__(
        self,
        peer: Peer,
        *,
        call_ok: Callable[[], Awaitable[Any]],
        call_fail: Callable[[], Awaitable[Any]],
        open_error: type[BaseException],
        check: Callable[[], Awaitable[bool]] | None,
        release: Callable[[], Awaitable[Any]],
        confirm_trip: Callable[[], Awaitable[Any]] | None = None,
        setup: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self.peer = peer
        self._call_ok = call_ok
        self._call_fail = call_fail
        self._open_error = open_error
        self._check = check
        self._release = release
        self._confirm_trip = confirm_trip
        self._setup = setup
        self.check = check if check is None or setup is None else self._checked

    async def _ready(self) -> None:
        if self._setup is not None:
            setup, self._setup = self._setup, None
            await setup()

    async def _checked(self) -> bool:
        assert self._check is not None
        if self._setup is not None:
            await self._ready()
        return await self._check()

    async def ok(self) -> Any:
        """One successful guarded call."""
        if self._setup is not None:
            await self._ready()
        return await self._call_ok()

    async def trip(self) -> None:
        """Fail ``FAILURE_THRESHOLD`` guarded calls."""
        await self._ready()
        for _ in range(FAILURE_THRESHOLD):
            with contextlib.suppress(_Failure, self._open_error):
                await self._call_fail()
        if self._confirm_trip is not None:
            await self._confirm_trip()

    async def rejected(self) -> bool:
        """One guarded call; True if the breaker rejected it."""
        if self._setup is not None:
            await self._ready()
        try:
            await self._call_ok()
        except self._open_error:
            return True
        return False

    async def close(self) -> None:
        """Release connections and background tasks."""
        await self._release()


# --- builders (each imports its library lazily) ------------------------------------------


def _sync_client(port: int) -> Any:
    import redis

    return redis.Redis(host=HOST, port=port)


def _async_client(port: int) -> Any:
    import redis.asyncio

    return redis.asyncio.Redis(host=HOST, port=port)


def _make_pybreaker(peer: Peer, port: int, name: str) -> Adapter:
    import pybreaker

    client = _sync_client(port)
    storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client, namespace=name)
    breaker = pybreaker.CircuitBreaker(
        fail_max=FAILURE_THRESHOLD,
        reset_timeout=RECOVERY_TIMEOUT,
        state_storage=storage,
        name=name,
    )
    return _SyncAdapter(
        peer,
        call_ok=partial(breaker.call, _noop),
        call_fail=partial(breaker.call, _fail),
        open_error=pybreaker.CircuitBreakerError,
        check=lambda: breaker.current_state != pybreaker.STATE_OPEN,
        release=client.close,
    )


def _make_aiobreaker(peer: Peer, port: int, name: str) -> Adapter:
    import aiobreaker
    from aiobreaker.storage.redis import CircuitRedisStorage

    # aiobreaker's Redis storage calls a *sync* client (it decodes bytes replies itself).
    client = _sync_client(port)
    closed = aiobreaker.CircuitBreakerState.CLOSED
    storage = CircuitRedisStorage(closed, client, namespace=name)
    breaker = aiobreaker.CircuitBreaker(
        fail_max=FAILURE_THRESHOLD,
        timeout_duration=timedelta(seconds=RECOVERY_TIMEOUT),
        state_storage=storage,
        name=name,
    )
    opened = aiobreaker.CircuitBreakerState.OPEN

    async def check() -> bool:
        return bool(breaker.current_state is not opened)

    async def release() -> None:
        client.close()

    return _AsyncAdapter(
        peer,
        call_ok=partial(breaker.call_async, _anoop),
        call_fail=partial(breaker.call_async, _afail),
        open_error=aiobreaker.CircuitBreakerError,
        check=check,
        release=release,
    )


def _make_aiobreaker_redis(peer: Peer, port: int, name: str) -> Adapter:
    import aiobreaker_redis

    client = _async_client(port)
    breaker = aiobreaker_redis.CircuitBreaker(
        name,
        failure_threshold=FAILURE_THRESHOLD,
        recovery_timeout=RECOVERY_TIMEOUT,
        redis_client=client,
    )
    opened = aiobreaker_redis.CircuitState.OPEN

    async def check() -> bool:
        return bool(await breaker.get_state() is not opened)

    return _AsyncAdapter(
        peer,
        call_ok=partial(breaker.call, _anoop),
        call_fail=partial(breaker.call, _afail),
        open_error=aiobreaker_redis.CircuitOpenError,
        check=check,
        release=client.aclose,
    )


def _redis_url(port: int) -> str:
    return f"redis://{HOST}:{port}/0"


def _make_purgatory_sync(peer: Peer, port: int, name: str) -> Adapter:
    import purgatory
    import redis
    from purgatory.domain.model import OpenedState

    uow = purgatory.SyncRedisUnitOfWork(_redis_url(port))
    factory = purgatory.SyncCircuitBreakerFactory(
        default_threshold=FAILURE_THRESHOLD, default_ttl=RECOVERY_TIMEOUT, uow=uow
    )
    repo: Any = uow.contexts  # a SyncRedisRepository; its client is the `redis` attribute
    if isinstance(repo.redis, redis.Redis):
        factory.initialize()
    else:
        # purgatory 3.0.1's sync repository is built on a redis.asyncio client (its sync
        # code is generated from the async one), so its first call fails with a TypeError
        # and initialize() leaves an un-awaited coroutine. Give it a sync client instead;
        # initialize() then has nothing to do (and would call a method redis.Redis lacks).
        repo.redis = redis.Redis.from_url(_redis_url(port))
    client = repo.redis
    guard = factory(name)

    def check() -> bool:
        # purgatory has no state query of its own; get_breaker() loads the breaker from
        # Redis, as every guarded call does.
        return bool(factory.get_breaker(name).context.state != "opened")

    return _SyncAdapter(
        peer,
        call_ok=guard(_noop),
        call_fail=guard(_fail),
        open_error=OpenedState,
        check=check,
        release=client.close,
    )


def _make_purgatory_async(peer: Peer, port: int, name: str) -> Adapter:
    import purgatory
    from purgatory.domain.model import OpenedState

    uow = purgatory.AsyncRedisUnitOfWork(_redis_url(port))
    factory = purgatory.AsyncCircuitBreakerFactory(
        default_threshold=FAILURE_THRESHOLD, default_ttl=RECOVERY_TIMEOUT, uow=uow
    )
    repo: Any = uow.contexts  # an AsyncRedisRepository; its client is the `redis` attribute
    guard = factory(name)

    async def check() -> bool:
        breaker = await factory.get_breaker(name)
        return bool(breaker.context.state != "opened")

    return _AsyncAdapter(
        peer,
        call_ok=guard(_anoop),
        call_fail=guard(_afail),
        open_error=OpenedState,
        check=check,
        release=repo.redis.aclose,
        setup=factory.initialize,
    )


def _interlock_config() -> Any:
    from interlock import Config

    # interlock trips on a failure *rate* over a window; a count window of
    # FAILURE_THRESHOLD calls at a 100% rate trips on that many consecutive failures.
    return Config(
        failure_rate_threshold=1.0,
        minimum_number_of_calls=FAILURE_THRESHOLD,
        window_size=FAILURE_THRESHOLD,
        wait_duration_in_open=RECOVERY_TIMEOUT,
    )


def _make_interlock_sync(peer: Peer, port: int, name: str) -> Adapter:
    from interlock import CircuitBreaker, CircuitOpenError, State
    from interlock.integrations.redis import RedisStorage

    client = _sync_client(port)
    storage = RedisStorage(client)
    breaker = CircuitBreaker(name=name, config=_interlock_config(), storage=storage)
    open_states = (State.OPEN, State.FORCED_OPEN)

    def confirm_trip() -> None:
        # The local trip reaches Redis from a background thread; wait until it is shared.
        deadline = time.monotonic() + TRIP_CONFIRM_TIMEOUT
        while True:
            shared = storage.read(name)
            if shared is not None and shared.state is State.OPEN:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"interlock: the trip of {name!r} did not reach Redis")
            time.sleep(0.005)

    def release() -> None:
        breaker.close()
        client.close()

    return _SyncAdapter(
        peer,
        call_ok=breaker(_noop),
        call_fail=breaker(_fail),
        open_error=CircuitOpenError,
        check=lambda: breaker.state not in open_states,
        release=release,
        confirm_trip=confirm_trip,
    )


def _make_interlock_async(peer: Peer, port: int, name: str) -> Adapter:
    from interlock import CircuitBreaker, CircuitOpenError, State
    from interlock.integrations.redis import AsyncRedisStorage

    client = _async_client(port)
    storage = AsyncRedisStorage(client)
    breaker = CircuitBreaker(name=name, config=_interlock_config(), storage=storage)
    open_states = (State.OPEN, State.FORCED_OPEN)

    async def check() -> bool:
        return breaker.state not in open_states

    async def confirm_trip() -> None:
        # The local trip reaches Redis from a background task; wait until it is shared.
        deadline = time.monotonic() + TRIP_CONFIRM_TIMEOUT
        while True:
            shared = await storage.read(name)
            if shared is not None and shared.state is State.OPEN:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"interlock: the trip of {name!r} did not reach Redis")
            await asyncio.sleep(0.005)

    async def release() -> None:
        await breaker.aclose()
        await client.aclose()

    return _AsyncAdapter(
        peer,
        call_ok=breaker(_anoop),
        call_fail=breaker(_afail),
        open_error=CircuitOpenError,
        check=check,
        release=release,
        confirm_trip=confirm_trip,
    )


# --- registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    peer: Peer
    module: str  # import name, for find_spec
    build: Callable[[Peer, int, str], Adapter]
    min_python: tuple[int, int] = (3, 9)


_ENTRIES: tuple[_Entry, ...] = (
    _Entry(
        Peer(
            name="pybreaker (redis)",
            package="pybreaker",
            is_async=False,
            records_in_redis=True,
            shares_window=True,
            note=(
                "sync redis.Redis; ok: GET state + SET fail_counter=0; rejected: GET state + GET "
                "opened_at; check: GET state"
            ),
        ),
        "pybreaker",
        _make_pybreaker,
    ),
    _Entry(
        Peer(
            name="aiobreaker (redis)",
            package="aiobreaker",
            is_async=True,
            records_in_redis=True,
            shares_window=True,
            note=(
                "storage on a sync redis.Redis (blocks the loop); ok: GET + SET; rejected: 3 GET; "
                "check: GET"
            ),
        ),
        "aiobreaker",
        _make_aiobreaker,
    ),
    _Entry(
        Peer(
            name="aiobreaker-redis",
            package="aiobreaker-redis",
            is_async=True,
            records_in_redis=True,
            shares_window=True,
            note=(
                "redis.asyncio; ok: GET state + SET state + DEL failures; rejected: GET; failure: "
                "INCR + EXPIRE"
            ),
        ),
        "aiobreaker_redis",
        _make_aiobreaker_redis,
    ),
    _Entry(
        Peer(
            name="purgatory (redis, sync)",
            package="purgatory",
            is_async=False,
            records_in_redis=True,
            shares_window=True,
            note=(
                "re-reads the breaker per call: 2 GET (JSON + failure_count) per ok, rejected or "
                "check"
            ),
        ),
        "purgatory",
        _make_purgatory_sync,
    ),
    _Entry(
        Peer(
            name="purgatory (redis, async)",
            package="purgatory",
            is_async=True,
            records_in_redis=True,
            shares_window=True,
            note=(
                "re-reads the breaker per call: 2 GET (JSON + failure_count) per ok, rejected or "
                "check"
            ),
        ),
        "purgatory",
        _make_purgatory_async,
    ),
    _Entry(
        Peer(
            name="interlock-cb (redis, sync)",
            package="interlock-cb",
            is_async=False,
            records_in_redis=False,
            shares_window=False,
            note=(
                "0 commands per ok/rejected/check (local window, cached view); a lane thread "
                "polls 1 HGETALL/s (1 EVAL/s while OPEN); trip: 1 EVAL, sent by the lane"
            ),
        ),
        "interlock",
        _make_interlock_sync,
        (3, 11),
    ),
    _Entry(
        Peer(
            name="interlock-cb (redis, async)",
            package="interlock-cb",
            is_async=True,
            records_in_redis=False,
            shares_window=False,
            note=(
                "0 commands per ok/rejected/check (local window, cached view); a lane task "
                "polls 1 HGETALL/s (1 EVAL/s while OPEN); trip: 1 EVAL, sent by the lane"
            ),
        ),
        "interlock",
        _make_interlock_async,
        (3, 11),
    ),
)

_BY_NAME = {entry.peer.name: entry for entry in _ENTRIES}
PEERS: dict[str, Peer] = {entry.peer.name: entry.peer for entry in _ENTRIES}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_peers() -> list[str]:
    """Names of the peers whose library (and redis-py) can be imported here."""
    if not _importable("redis"):
        return []
    return [
        entry.peer.name
        for entry in _ENTRIES
        if sys.version_info >= entry.min_python and _importable(entry.module)
    ]


def make(peer_name: str, port: int, breaker_name: str) -> Adapter:
    """Build an adapter for ``peer_name`` against redis-server on 127.0.0.1:``port``."""
    try:
        entry = _BY_NAME[peer_name]
    except KeyError:
        known = ", ".join(_BY_NAME)
        raise ValueError(f"unknown peer {peer_name!r}; known: {known}") from None
    return entry.build(entry.peer, port, breaker_name)
