"""The local snapshot of a breaker, and the one rule by which it changes.

Replies (of this process's own script calls), pushes (other processes' transitions over
pub/sub), the batched writer's projection and the failover policies all want to change
what a process believes. They arrive on different threads and out of order, so every
change goes through `SnapshotCell`, under one lock and one ordering rule:

- newer wins: candidates are ordered by (Redis server time, generation). A tie never lets
  an older generation win, and at an equal (time, generation) a reply replaces (it knows
  more: whether a probe is free) while a transition push does not (it is a late copy);
- a probe-freed push at an equal key does replace: it is the only news it carries;
- snapshots from the in-process fallback live on another clock, so one from the other
  source always replaces (failing over and back are decided elsewhere, by the guard);
- an escape hatch: a snapshot installed more than `max_staleness` ago loses to anything,
  so a server clock that jumped back cannot freeze a process;
- a background refresh carries the sequence number it was sent at and yields to anything
  installed since.

A snapshot is stale when nothing confirmed it for `max_staleness`: a reply, or the
listener's heartbeat (`heard`: every message published before a moment was heard), and in
any case once it was installed more than `reread_after` ago (what never publishes: a key
that expired, an edit by hand).
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ._config import CircuitState

__all__ = ["UNKNOWN", "LocalSnapshot", "SnapshotCell"]

_INF = math.inf
# a snapshot confirmed by the listener's heartbeat is still re-read this often
REREAD_MIN_S, REREAD_FACTOR = 300.0, 30.0
_CLOSED, _OPEN = CircuitState.CLOSED, CircuitState.OPEN


@dataclass(frozen=True, slots=True)
class LocalSnapshot:
    """This process's view of the shared state, and when (local monotonic) it was current."""

    state: CircuitState  # effective: the override wins
    forced: str
    generation: int
    server_ms: int
    at: float
    closed: bool  # a call may be admitted without asking Redis
    known: bool = True
    local: bool = False  # from the in-process fallback (its own clock), not from Redis


UNKNOWN = LocalSnapshot(_CLOSED, "", -1, -1, -_INF, closed=False, known=False)


def _held(s: LocalSnapshot) -> LocalSnapshot:
    """A hold: CLOSED in Redis, but this process's batched projection trips, so it admits
    nothing (and reports OPEN, the state it expects)."""
    return LocalSnapshot(_OPEN, "", s.generation, s.server_ms, s.at, False, True, s.local)


class SnapshotCell:
    """Owns the snapshot, when calls may be admitted from it (`admit_from`, monotonic), when
    it was last confirmed, and the hold of batched mode. Readers take the attributes
    without the lock (each is replaced whole); writers use the methods."""

    __slots__ = ("_lock", "admit_from", "confirmed_at", "held_gen", "max_staleness",
                 "reread_after", "seq", "snap")

    def __init__(self, max_staleness: float) -> None:
        self.max_staleness = max_staleness
        # spread: breakers installed together are not all re-read in the same tick
        self.reread_after = max(REREAD_MIN_S, REREAD_FACTOR * max_staleness) * (
            1 + random.random() / 4)
        self._lock = threading.Lock()
        self.snap = UNKNOWN
        self.admit_from = -_INF
        self.confirmed_at = -_INF  # short replies confirm without replacing
        self.seq = 0  # bumped on every change: a background refresh yields to newer news
        self.held_gen = -1  # batched projection trips at this generation: admit nothing

    # -- the rule --------------------------------------------------------------------------

    def newer(self, cand: LocalSnapshot, *, push: bool = False, probe_news: bool = False,
              late: bool = False) -> bool:
        """Whether `cand` would replace the current snapshot (see the module docstring).
        A `late` reply (its caller went on) arrived long after Redis made it: its arrival
        says nothing about a clock jump, so it gets no escape."""
        cur = self.snap
        if not cur.known or cand.local != cur.local:
            return True
        if not late and cand.at - cur.at >= self.max_staleness:
            return True
        ck, nk = (cur.server_ms, cur.generation), (cand.server_ms, cand.generation)
        if nk != ck:
            return nk > ck
        return not push or probe_news

    def offer(self, cand: LocalSnapshot, admit_from: float, *, push: bool = False,
              probe_news: bool = False, seq: int | None = None, late: bool = False) -> bool:
        """Install `cand` if it is newer; returns whether it was installed."""
        with self._lock:
            if seq is not None and seq != self.seq:
                return False
            if not self.newer(cand, push=push, probe_news=probe_news, late=late):
                return False
            if cand.closed and cand.generation == self.held_gen:
                cand, admit_from = _held(cand), _INF
            self._set(cand, admit_from, cand.at)
            return True

    def confirm(self, generation: int, server_ms: int, now: float, late: bool = False
                ) -> None:
        """A short reply: still plainly CLOSED at `generation`. Only fresher when that is
        what the snapshot says; otherwise it is offered like any reply."""
        with self._lock:
            s = self.snap
            if (s.known and not s.local and s.generation == generation and s.closed
                    and not s.forced and server_ms >= s.server_ms):
                self.confirmed_at = now
                return
        self.offer(LocalSnapshot(_CLOSED, "", generation, server_ms, now, True), -_INF,
                   late=late)

    def heard(self, asked: float) -> None:
        """The listener heard every message published before `asked`: a snapshot from
        Redis installed before then was still current then. One marked stale (waiting for
        a re-read) stays stale."""
        with self._lock:
            s = self.snap
            if s.known and not s.local and s.at > -_INF and asked > self.confirmed_at:
                self.confirmed_at = asked

    def _set(self, snap: LocalSnapshot, admit_from: float, confirmed: float) -> None:
        self.snap = snap
        self.admit_from = admit_from
        self.confirmed_at = confirmed
        self.seq += 1

    # -- holds and policies ----------------------------------------------------------------

    def hold(self, projection: Callable[[], int]) -> None:
        """Batched mode: make the snapshot agree with the projection (`projection()` is the
        generation it trips at, or -1), read under the lock so that the last caller sees
        the last word however threads interleave."""
        with self._lock:
            want = projection()
            s = self.snap
            held, self.held_gen = self.held_gen, want
            if want >= 0:
                if s.generation == want and s.closed and not s.forced:
                    self._set(_held(s), _INF, self.confirmed_at)
            elif (held >= 0 and s.generation == held and not s.closed and not s.forced
                    and self.admit_from == _INF):
                # lift our own hold: back to the CLOSED snapshot it covered
                self._set(LocalSnapshot(_CLOSED, "", held, s.server_ms, s.at, True, True,
                                        s.local), -_INF, self.confirmed_at)

    def is_held(self) -> bool:
        s = self.snap
        return self.held_gen >= 0 and s.generation == self.held_gen and not s.closed

    def deny(self, now: float) -> None:
        """Policy "deny" while Redis is unavailable: admit nothing, keep the state shown."""
        with self._lock:
            s = self.snap
            # on the fallback's clock (server_ms -1): its first reply replaces this one
            self._set(LocalSnapshot(s.state, "open", s.generation, -1, now, False, s.known,
                                    True), _INF, now)

    def mark_stale(self) -> None:
        """Keep answering from the snapshot, but let the listener re-read it at once."""
        with self._lock:
            s = self.snap
            self._set(LocalSnapshot(s.state, s.forced, s.generation, s.server_ms, -_INF,
                                    s.closed, s.known, s.local), self.admit_from, -_INF)

    def forget(self) -> None:
        """Drop the snapshot: the next call asks Redis first."""
        with self._lock:
            self._set(UNKNOWN, -_INF, -_INF)

    def after_fork(self) -> None:
        """In a forked child: a fresh lock; the parent's hold is not this child's."""
        self._lock = threading.Lock()
        if self.held_gen >= 0 and self.snap.generation == self.held_gen:
            self.snap, self.admit_from = UNKNOWN, -_INF
        self.held_gen = -1
        self.mark_stale()

    def is_stale(self, now: float) -> bool:
        at = self.snap.at
        return (now - max(self.confirmed_at, at) > self.max_staleness
                or now - at > self.reread_after)
