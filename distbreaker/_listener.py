"""Keeping every local snapshot current: one pub/sub listener per process and client.

A hub holds the breakers of one client and channel. It applies every transition message
to the breakers of that name, refreshes all of them whenever the subscription is
(re)established (messages published while it was down are lost), and keeps them from going
stale with a heartbeat (`_beat.py`): one read per beat proves that nothing was missed, so
an idle process costs the same whatever the number of its breakers; a breaker is re-read
only when something was missed or nothing confirmed it for its `max_staleness`. The sync
hub is a daemon thread; the asyncio hub is a task on the running loop. Both share the
registry and dispatch below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from redis.exceptions import ResponseError

from ._beat import BEAT_TOKEN, Beat, Step
from ._clients import STORE_ERRORS, derive_client, is_cluster, sentinel_pools
from ._guard import StoreGuard, describe, guard_for
from ._keys import seq_key_for
from ._process import PROCESS
from ._protocol import Push, decode_push
from ._subscriber import (
    AsyncPubSubReader,
    AsyncSocketReader,
    PubSubReader,
    SocketReader,
    aopen_reader,
    open_reader,
)

__all__ = ["AsyncHub", "Hub", "HubMember", "MemoryHub", "ThreadHub", "hub_for"]

log = logging.getLogger("distbreaker")


class HubMember(Protocol):
    """What a hub calls on a breaker's engine (the only calls it makes)."""

    name: str
    config: Any  # a CircuitBreakerConfig: its max_staleness sets the tick

    def apply_push(self, p: Push, recv: float) -> None: ...
    def is_stale(self, now: float) -> bool: ...
    def heard(self, asked: float) -> None: ...
    def refresh_background(self) -> Any: ...  # a coroutine on an asyncio hub


class Hub:
    """Breakers by name, weakly held, and the dispatch of channel messages to them.

    A message costs one dict lookup by name, whatever the number of breakers: the list
    of all members (for the staleness scan, once per tick) and the tick itself are cached
    and rebuilt only when a breaker joins or leaves."""

    def __init__(self, channel: str, beats: bool = False) -> None:
        self.channel = channel
        self._lock = threading.Lock()
        # by name: weak references (a WeakSet per name costs about 1 KB)
        self._members: dict[str, list[weakref.ref[HubMember]]] = {}
        self._all: list[weakref.ref[HubMember]] | None = None  # None: rebuild
        self._tick_s = 1.0
        self._beat_s = 1.5
        self.beat = Beat(seq_key_for(channel.rsplit(":", 2)[0]), beats)

    def add(self, member: HubMember) -> None:
        with self._lock:
            refs = self._members.setdefault(member.name, [])
            if not any(r() is member for r in refs):
                refs.append(weakref.ref(member, self._dropped))
            self._all = None

    def remove(self, member: HubMember) -> None:
        with self._lock:
            self._discard(member.name, member)
            self._all = None

    def _discard(self, name: str, member: HubMember | None) -> None:
        """Drop `member` (None: every dead reference) from `name`'s list; holds the lock."""
        refs = self._members.get(name)
        if refs is not None:
            refs[:] = [r for r in refs if (m := r()) is not None and m is not member]
            if not refs:
                del self._members[name]

    def _dropped(self, ref: weakref.ref[HubMember]) -> None:
        """A breaker was dropped without close(): rebuild the member list on next use."""
        self._all = None

    def _refs(self) -> list[weakref.ref[HubMember]]:
        refs = self._all
        if refs is None:
            with self._lock:
                for name in [n for n, rs in self._members.items()
                             if any(r() is None for r in rs)]:
                    self._discard(name, None)
                refs = [r for rs in self._members.values() for r in rs]
                live = [m for r in refs if (m := r()) is not None]
                st = min((m.config.max_staleness for m in live), default=4.0)
                self._tick_s = min(max(st / 4, 0.02), 1.0)
                self._beat_s = st * 0.75  # confirmed every beat: never older than st
                self._all = refs
        return refs

    def members(self) -> list[HubMember]:
        return [m for r in self._refs() if (m := r()) is not None]

    def alive(self) -> bool:
        """Any member left (a dropped breaker leaves without telling)."""
        return any(r() is not None for r in self._refs())

    def tick(self) -> float:
        """How long the loop waits for a message: a quarter of the shortest max_staleness,
        between 20 ms and 1 s."""
        self._refs()
        return self._tick_s

    def beat_period(self) -> float:
        self._refs()
        return self._beat_s

    def heard(self, asked: float) -> None:
        """The heartbeat's proof: every message published before `asked` was heard."""
        for m in self.members():
            m.heard(asked)

    def dispatch(self, data: Any) -> None:
        p = decode_push(data)
        if p is None:
            return
        self.beat.push(p.seq)
        with self._lock:
            refs = self._members.get(p.name)
            targets = [m for r in refs if (m := r()) is not None] if refs else []
        recv = time.monotonic()
        for m in targets:
            m.apply_push(p, recv)


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

    def ok(self, asked: float) -> None:
        """Subscribed. The confirmation may have waited in the socket since Redis sent
        it, so it proves Redis answered at some time after `asked`, not now."""
        self.guard.success(asked)
        self.backoff = 0.05
        if self.down:
            self.down = False
            log.info("distbreaker: listener subscribed again",
                     extra={"event": "distbreaker.listener_up", "store": self.guard.label})


class ThreadHub(Hub):
    """A daemon thread with one pub/sub connection for every breaker on one sync client."""

    def __init__(self, client: Any, channel: str) -> None:
        super().__init__(channel, beats=not is_cluster(client))
        self._user_client = client
        self._client = derive_client(client, 5.0, 1.0)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def add(self, member: HubMember) -> None:
        super().add(member)
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name=f"distbreaker-listener[{self.channel}]", daemon=True
                )
                self._thread.start()

    def _may_stop(self) -> bool:
        """No breakers left: stop, unless an add() raced with this exit (it saw the thread
        alive and started none), in which case the loop goes on."""
        with self._start_lock:  # an add() racing with this exit starts a new thread
            if not self.alive():
                self._thread = None
                return True
        return False

    # --- generated by .ci/unasync.py from AsyncHub._refresh: do not edit ---
    def _refresh(self, members: list[HubMember], only_stale: bool) -> None:
        now = time.monotonic()
        for m in members:
            if only_stale and not m.is_stale(now):
                continue
            try:
                m.refresh_background()
            except Exception as e:  # the next tick tries again
                log.debug("refresh of %s failed: %s", m.name, e)
    # --- end generated ---

    # --- generated by .ci/unasync.py from AsyncHub._beat: do not edit ---
    def _beat(self, ps: Any, guard: StoreGuard, first: bool) -> None:
        """One heartbeat (see _beat.py): read the sequence, then confirm every snapshot,
        re-read them all, or PING the pub/sub connection first. Its answer tells `guard`
        (the listener's, `_Outage.guard`) that Redis is up, like any answer."""
        b = self.beat
        if not b.enabled:
            return
        asked = time.monotonic()
        try:
            e, n = self._client.hmget(b.key, "e", "n")
            claimed = e is None and bool(self._client.hsetnx(b.key, "e", b.mine))
        except ResponseError as exc:  # garbage in the key, or an ACL without it
            b.disable(exc)
            return
        except STORE_ERRORS as exc:  # no confirmation: snapshots go stale and are re-read
            b.next_at = asked + self.beat_period()
            log.debug("distbreaker: heartbeat read failed: %s", exc)
            return
        guard.success(asked)
        step = b.read(asked, self.beat_period(), e, n, claimed, first)
        if step is Step.PING:
            ps.ping(BEAT_TOKEN)
        else:
            self._after((step, asked))
    # --- end generated ---

    # --- generated by .ci/unasync.py from AsyncHub._after: do not edit ---
    def _after(self, outcome: tuple[Step, float]) -> None:
        step, asked = outcome
        if step is Step.CONFIRM:
            self.heard(asked)
        elif step is Step.RESYNC:
            self._refresh(self.members(), only_stale=False)
    # --- end generated ---

    # --- generated by .ci/unasync.py from AsyncHub._run: do not edit ---
    def _run(self) -> None:
        ps = None
        outage = _Outage(self._user_client)
        next_check = time.monotonic() + 1.0
        next_scan = 0.0
        while True:
            if not self.alive():
                if self._may_stop():
                    break
                continue
            tick = self.tick()
            try:
                if ps is None:
                    asked = time.monotonic()
                    self.beat.reset()
                    ps = open_reader(self._client, self.channel)
                items = ps.read(tick)
                for kind, data in items:  # a storm arrives as many items at once
                    if kind == "message":
                        self.dispatch(data)
                        if self.beat.missed:  # a gap in the numbers
                            self.beat.missed = False
                            self._refresh(self.members(), only_stale=False)
                    elif kind == "subscribe":
                        outage.ok(asked)
                        self._beat(ps, outage.guard, first=True)
                        self._refresh(self.members(), only_stale=False)
                        next_scan = time.monotonic() + tick
                    elif kind == "pong" and _text(data) == BEAT_TOKEN:
                        self._after(self.beat.pong())
                if time.monotonic() >= next_scan:  # once per tick, not per message
                    now = next_scan = time.monotonic()
                    next_scan += tick
                    if self.beat.overdue(now, self.beat_period()):
                        raise ConnectionError("no reply to a PING on the pub/sub "
                                              "connection: it is dead")
                    if self.beat.due(now):
                        self._beat(ps, outage.guard, first=False)
                    self._refresh(self.members(), only_stale=True)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 1.0
                    for pool in sentinel_pools(self._user_client):
                        pool.get_master_address()
            except Exception as e:
                if not self.alive():
                    continue  # closed while Redis went away: exit without a warning
                delay = outage.failed(e)
                _close_quietly(ps)
                ps = None
                time.sleep(delay)
        _close_quietly(ps)
    # --- end generated ---


class AsyncHub(Hub):
    """The same as a task on the running event loop, for `redis.asyncio` clients."""

    def __init__(self, client: Any, channel: str) -> None:
        super().__init__(channel, beats=not is_cluster(client))
        self._user_client = client
        self._client = derive_client(client, 5.0, 1.0)
        #: The listener task, if one was started (it may have ended with its loop).
        self.task: asyncio.Task[None] | None = None

    def add(self, member: HubMember) -> None:
        super().add(member)
        self.ensure_running()

    def ensure_running(self) -> None:
        """Start the listener task on the running loop, if there is one and it is not up."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        t = self.task
        if t is None or t.done() or t.get_loop() is not loop:
            self.task = loop.create_task(self._run(), name=f"distbreaker-listener[{self.channel}]")

    def _may_stop(self) -> bool:
        """No breakers left: the task ends (the next add() starts a new one)."""
        return True

    async def _refresh(self, members: list[HubMember], only_stale: bool) -> None:
        now = time.monotonic()
        for m in members:
            if only_stale and not m.is_stale(now):
                continue
            try:
                await m.refresh_background()
            except Exception as e:  # the next tick tries again
                log.debug("refresh of %s failed: %s", m.name, e)

    async def _beat(self, ps: Any, guard: StoreGuard, first: bool) -> None:
        """One heartbeat (see _beat.py): read the sequence, then confirm every snapshot,
        re-read them all, or PING the pub/sub connection first. Its answer tells `guard`
        (the listener's, `_Outage.guard`) that Redis is up, like any answer."""
        b = self.beat
        if not b.enabled:
            return
        asked = time.monotonic()
        try:
            e, n = await self._client.hmget(b.key, "e", "n")
            claimed = e is None and bool(await self._client.hsetnx(b.key, "e", b.mine))
        except ResponseError as exc:  # garbage in the key, or an ACL without it
            b.disable(exc)
            return
        except STORE_ERRORS as exc:  # no confirmation: snapshots go stale and are re-read
            b.next_at = asked + self.beat_period()
            log.debug("distbreaker: heartbeat read failed: %s", exc)
            return
        guard.success(asked)
        step = b.read(asked, self.beat_period(), e, n, claimed, first)
        if step is Step.PING:
            await ps.ping(BEAT_TOKEN)
        else:
            await self._after((step, asked))

    async def _after(self, outcome: tuple[Step, float]) -> None:
        step, asked = outcome
        if step is Step.CONFIRM:
            self.heard(asked)
        elif step is Step.RESYNC:
            await self._refresh(self.members(), only_stale=False)

    async def _run(self) -> None:
        ps = None
        outage = _Outage(self._user_client)
        next_check = time.monotonic() + 1.0
        next_scan = 0.0
        try:  # unasync: unwrap
            while True:
                if not self.alive():
                    if self._may_stop():
                        break
                    continue
                tick = self.tick()
                try:
                    if ps is None:
                        # unasync: async-only begin
                        init = getattr(self._client, "initialize", None)
                        if init is not None:  # an asyncio Cluster client learns its slots
                            await init()
                        # unasync: async-only end
                        asked = time.monotonic()
                        self.beat.reset()
                        ps = await aopen_reader(self._client, self.channel)
                    items = await ps.read(tick)
                    _raise_if_cancelling()  # unasync: async-only
                    for kind, data in items:  # a storm arrives as many items at once
                        if kind == "message":
                            self.dispatch(data)
                            if self.beat.missed:  # a gap in the numbers
                                self.beat.missed = False
                                await self._refresh(self.members(), only_stale=False)
                        elif kind == "subscribe":
                            outage.ok(asked)
                            await self._beat(ps, outage.guard, first=True)
                            await self._refresh(self.members(), only_stale=False)
                            next_scan = time.monotonic() + tick
                        elif kind == "pong" and _text(data) == BEAT_TOKEN:
                            await self._after(self.beat.pong())
                    if time.monotonic() >= next_scan:  # once per tick, not per message
                        now = next_scan = time.monotonic()
                        next_scan += tick
                        if self.beat.overdue(now, self.beat_period()):
                            raise ConnectionError("no reply to a PING on the pub/sub "
                                                  "connection: it is dead")
                        if self.beat.due(now):
                            await self._beat(ps, outage.guard, first=False)
                        await self._refresh(self.members(), only_stale=True)
                    if time.monotonic() >= next_check:
                        next_check = time.monotonic() + 1.0
                        for pool in sentinel_pools(self._user_client):
                            await pool.get_master_address()
                except Exception as e:
                    if not self.alive():
                        continue  # closed while Redis went away: exit without a warning
                    delay = outage.failed(e)
                    await _aclose_quietly(ps)
                    ps = None
                    await asyncio.sleep(delay)
        finally:  # unasync: unwrap
            await _aclose_quietly(ps)


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _raise_if_cancelling() -> None:
    """redis-py's get_message(timeout=...) can swallow a cancellation that lands while its
    own timeout fires; without this check, asyncio.run() could wait forever at exit."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


def _close_quietly(ps: PubSubReader | SocketReader | None) -> None:
    if ps is not None:
        with contextlib.suppress(Exception):
            ps.close()


async def _aclose_quietly(ps: AsyncPubSubReader | AsyncSocketReader | None) -> None:
    if ps is not None:
        with contextlib.suppress(Exception):
            await ps.close()


def hub_for(kind: Callable[[Any, str], Hub], backend: Any, channel: str) -> Hub:
    """The process's one hub for (client or store, channel); a forked child gets its own."""
    key = (getattr(kind, "__name__", repr(kind)), id(backend), channel)
    with PROCESS.lock:
        hub = PROCESS.hubs.get(key)
        if hub is None:
            hub = kind(backend, channel)
            hub._backend_ref = backend  # type: ignore[attr-defined]  # keeps id() unique
            PROCESS.hubs[key] = hub
        return hub
