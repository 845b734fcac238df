"""Keeping every local snapshot current: one pub/sub listener per process and client.

A hub holds the breakers of one client and channel. It applies every transition message
to the breakers of that name, refreshes a breaker whose snapshot is older than its
`max_staleness`, and refreshes all of them whenever the subscription is (re)established,
because messages published while it was down are lost. The sync hub is a daemon thread;
the asyncio hub is a task on the running loop. Both share the registry and dispatch below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ._failsafe import STORE_ERRORS, derive_client, describe, guard_for, sentinel_pools
from ._ops import decode_push

__all__ = ["AsyncHub", "Hub", "MemoryHub", "ThreadHub", "hub_for"]

log = logging.getLogger("distbreaker")


class _Member(Protocol):
    name: str

    def _apply_push(self, p: Any, recv: float) -> None: ...
    def _is_stale(self, now: float) -> bool: ...


class Hub:
    """Breakers by name, weakly held, and the dispatch of channel messages to them."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self._lock = threading.Lock()
        self._members: dict[str, weakref.WeakSet[Any]] = {}

    def add(self, member: Any) -> None:
        with self._lock:
            self._members.setdefault(member.name, weakref.WeakSet()).add(member)

    def remove(self, member: Any) -> None:
        with self._lock:
            ws = self._members.get(member.name)
            if ws is not None:
                ws.discard(member)
                if not ws:
                    del self._members[member.name]

    def members(self) -> list[Any]:
        with self._lock:
            return [m for ws in self._members.values() for m in ws]

    def dispatch(self, data: Any) -> None:
        p = decode_push(data)
        if p is None:
            return
        with self._lock:
            ws = self._members.get(p.name)
            targets = list(ws) if ws is not None else []
        recv = time.monotonic()
        for m in targets:
            m._apply_push(p, recv)

    def _tick(self, members: list[Any]) -> float:
        st = min((m.config.max_staleness for m in members), default=1.0)
        return min(max(st / 4, 0.02), 1.0)


class MemoryHub(Hub):
    """For the in-process store: messages arrive synchronously from the store itself."""

    def __init__(self, store: Any, channel: str) -> None:
        super().__init__(channel)
        store.subscribe(channel, self.dispatch)


class _Outage:
    """Reconnect delays of a listener (backoff with jitter, at most 1 s).

    The listener is not the data path: losing its connection (a `CLIENT KILL TYPE
    pubsub`, a proxy dropping idle connections) fails nothing over; the guard hears only
    of its successes (a subscription proves Redis answers, which ends an outage for an
    idle process). What was published meanwhile is recovered by re-reading every snapshot
    once subscribed again."""

    def __init__(self, client: Any) -> None:
        self.guard = guard_for(client)
        self.backoff = 0.05
        self.down = False

    def failed(self, exc: BaseException) -> float:
        if not self.down:
            self.down = True
            level = logging.INFO if isinstance(exc, STORE_ERRORS) else logging.WARNING
            log.log(level, "distbreaker: listener connection lost (%s); reconnecting, and "
                    "re-reading every breaker's state once back (guarded calls are not "
                    "affected)", describe(exc),
                    extra={"event": "distbreaker.listener_error", "store": self.guard.label})
        delay = self.backoff * (0.5 + random.random())
        self.backoff = min(self.backoff * 2, 1.0)
        return delay

    def ok(self) -> None:
        self.guard.success()
        self.backoff = 0.05
        if self.down:
            self.down = False
            log.info("distbreaker: listener subscribed again",
                     extra={"event": "distbreaker.listener_up", "store": self.guard.label})


class ThreadHub(Hub):
    """A daemon thread with one pub/sub connection for every breaker on one sync client."""

    THREADED = True  # its breakers' is_available() lets it have the GIL now and then

    def __init__(self, client: Any, channel: str) -> None:
        super().__init__(channel)
        self._user_client = client
        self._client = derive_client(client, 5.0, 1.0)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def add(self, member: Any) -> None:
        super().add(member)
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name=f"distbreaker-listener[{self.channel}]", daemon=True
                )
                self._thread.start()

    def _refresh(self, members: list[Any], only_stale: bool) -> None:
        now = time.monotonic()
        for m in members:
            if only_stale and not m._is_stale(now):
                continue
            try:
                m._refresh(background=True)
            except Exception as e:  # the next tick tries again
                log.debug("refresh of %s failed: %s", m.name, e)

    def _run(self) -> None:
        ps = None
        outage = _Outage(self._user_client)
        next_check = time.monotonic() + 1.0
        while True:
            members = self.members()
            if not members:
                with self._start_lock:  # an add() racing with this exit starts a new thread
                    if not self.members():
                        self._thread = None
                        break
                continue
            try:
                if ps is None:
                    ps = self._client.pubsub()
                    ps.subscribe(self.channel)
                msg = ps.get_message(timeout=self._tick(members))
                if msg is not None:
                    if msg["type"] == "subscribe":
                        outage.ok()
                        self._refresh(members, only_stale=False)
                    elif msg["type"] == "message":
                        self.dispatch(msg["data"])
                self._refresh(members, only_stale=True)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 1.0
                    for pool in sentinel_pools(self._user_client):
                        pool.get_master_address()
            except Exception as e:
                if not self.members():
                    continue  # closed while Redis went away: exit without a warning
                delay = outage.failed(e)
                _close_quietly(ps)
                ps = None
                time.sleep(delay)
            del members
        _close_quietly(ps)


class AsyncHub(Hub):
    """The same as a task on the running event loop, for `redis.asyncio` clients."""

    def __init__(self, client: Any, channel: str) -> None:
        super().__init__(channel)
        self._user_client = client
        self._client = derive_client(client, 5.0, 1.0)
        self._task: asyncio.Task[None] | None = None

    def add(self, member: Any) -> None:
        super().add(member)
        self.ensure_running()

    def ensure_running(self) -> None:
        """Start the listener task on the running loop, if there is one and it is not up."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        t = self._task
        if t is None or t.done() or t.get_loop() is not loop:
            self._task = loop.create_task(self._run(), name=f"distbreaker-listener[{self.channel}]")

    async def _refresh(self, members: list[Any], only_stale: bool) -> None:
        now = time.monotonic()
        for m in members:
            if only_stale and not m._is_stale(now):
                continue
            try:
                await m._refresh(background=True)
            except Exception as e:
                log.debug("refresh of %s failed: %s", m.name, e)

    async def _run(self) -> None:
        ps = None
        outage = _Outage(self._user_client)
        next_check = time.monotonic() + 1.0
        try:
            while True:
                members = self.members()
                if not members:
                    break
                try:
                    if ps is None:
                        init = getattr(self._client, "initialize", None)
                        if init is not None:  # an asyncio Cluster client learns its slots
                            await init()
                        ps = self._client.pubsub()
                        await ps.subscribe(self.channel)
                    msg = await ps.get_message(timeout=self._tick(members))
                    _raise_if_cancelling()
                    if msg is not None:
                        if msg["type"] == "subscribe":
                            outage.ok()
                            await self._refresh(members, only_stale=False)
                        elif msg["type"] == "message":
                            self.dispatch(msg["data"])
                    await self._refresh(members, only_stale=True)
                    if time.monotonic() >= next_check:
                        next_check = time.monotonic() + 1.0
                        for pool in sentinel_pools(self._user_client):
                            await pool.get_master_address()
                except Exception as e:
                    if not self.members():
                        continue
                    delay = outage.failed(e)
                    await _aclose_quietly(ps)
                    ps = None
                    await asyncio.sleep(delay)
                del members
        finally:
            await _aclose_quietly(ps)


def _raise_if_cancelling() -> None:
    """redis-py's get_message(timeout=...) can swallow a cancellation that lands while its
    own timeout fires; without this check, asyncio.run() could wait forever at exit."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


def _close_quietly(ps: Any) -> None:
    if ps is not None:
        with contextlib.suppress(Exception):
            ps.close()


async def _aclose_quietly(ps: Any) -> None:
    if ps is not None:
        try:
            close: Callable[[], Awaitable[None]] = getattr(ps, "aclose", None) or ps.close
            await close()
        except Exception:
            pass


_HUBS: weakref.WeakValueDictionary[tuple[Any, ...], Hub] = weakref.WeakValueDictionary()
_HUBS_LOCK = threading.Lock()


def _fresh_lock_in_child() -> None:
    global _HUBS_LOCK
    _HUBS_LOCK = threading.Lock()  # the parent may have held it while forking


os.register_at_fork(after_in_child=_fresh_lock_in_child)


def hub_for(kind: type[Hub], backend: Any, channel: str) -> Hub:
    """The process's one hub for (client or store, channel); a forked child gets its own."""
    key = (os.getpid(), kind.__name__, id(backend), channel)
    with _HUBS_LOCK:
        hub = _HUBS.get(key)
        if hub is None:
            hub = kind(backend, channel)  # type: ignore[call-arg]
            hub._backend_ref = backend  # type: ignore[attr-defined]  # keeps id() unique
            _HUBS[key] = hub
        return hub
