"""Redis as a dependency that fails: what a store error says, and a breaker around Redis.

A breaker that fails when Redis fails turns a cache outage into a full outage, and one
that gives up on Redis at every slow reply stops being shared when it matters. So every
guarded call goes through a `StoreGuard`: a small breaker around the store itself, shared
by every breaker of one server in one process, which opens on evidence of an outage only.
While it is open, breakers answer from their local fallback (`_fallback.Fallback`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
from typing import Any, Protocol

from ._clients import InFlight, label
from ._process import PROCESS
from ._protocol import truncate

__all__ = ["GuardMember", "StoreGuard", "classify", "describe", "guard_for", "misconfig_hint"]

log = logging.getLogger("distbreaker")
_INF_S = float("inf")


class GuardMember(Protocol):
    """What the guard tells each breaker's fallback (the only calls it makes)."""

    def store_lost(self) -> None: ...
    def store_recovered(self) -> None: ...


_MISCONFIG_MARKS = ("WRONGPASS", "NOAUTH", "NOPERM", "invalid password",
                    "invalid username-password", "DB index is out of range",
                    "invalid DB index", "no permissions")


def classify(exc: BaseException) -> str:
    """What a store error says: "misconfig" (credentials, ACL, db index: fix the config,
    waiting does not help), "timeout" (no reply in time: not, by itself, an outage) or
    "down" (refused, reset, an error reply such as OOM: evidence of an outage)."""
    if isinstance(exc, InFlight):
        return "timeout"
    try:
        from redis import exceptions as rx

        if isinstance(exc, (rx.AuthenticationError, rx.AuthorizationError,
                            rx.NoPermissionError, rx.AuthenticationWrongNumberOfArgsError)):
            return "misconfig"
        timeout_types: tuple[type[BaseException], ...] = (rx.TimeoutError, TimeoutError)
    except ImportError:  # pragma: no cover - redis is a dependency
        timeout_types = (TimeoutError,)
    msg = str(exc)
    if any(m in msg for m in _MISCONFIG_MARKS):
        return "misconfig"
    if isinstance(exc, timeout_types):
        return "timeout"
    return "down"


def describe(exc: BaseException) -> str:
    """One line for a log: what failed, told apart (refused, reset, no reply, error reply)."""
    msg = truncate(exc, 160)
    low = msg.lower()
    if "refused" in low:
        return f"connection refused ({msg})"
    if "reset" in low or "closed by server" in low or "broken pipe" in low:
        return f"connection dropped ({msg})"
    if classify(exc) == "timeout":
        return f"no reply in time ({type(exc).__name__}: {msg})"
    return f"{type(exc).__name__}: {msg}"


def misconfig_hint(exc: BaseException, label: str) -> str:
    """What to fix, for a misconfiguration error; never includes a password."""
    msg = truncate(exc, 160)
    if "NOPERM" in msg or "no permissions" in msg:
        return (f"the Redis user has no permission for what distbreaker runs ({msg}); grant "
                "it FCALL and FUNCTION LOAD (or EVALSHA and SCRIPT LOAD), the breakers' "
                "keys (~distbreaker:* by default) and their channel (&distbreaker:*)")
    if "NOAUTH" in msg:
        return ("Redis requires authentication and none was given: put the password in "
                "the URL (redis://:PASSWORD@host:port/db) or pass password= to the client")
    if "DB index" in msg:
        return (f"no such database ({msg}): use a db index below the server's 'databases' "
                "setting")
    return (f"Redis rejected the credentials ({msg}): check the username and password "
            f"given for {label}")


class StoreGuard:
    """Redis as a failing dependency, for every breaker of one server in one process.

    A process fails over to its local fallback on evidence of an outage: a refused or
    dropped connection, an error reply, or no reply at all for `failover_after` (a
    caller's own timeout is not evidence: a fork for BGSAVE, a slow command or a busy host
    delays replies for a moment, and the request completes in the background). While
    failed over, one trial per backoff period goes to Redis; the first answer ends it.

    Logging is per outage, not per flap: one warning when it starts, one when Redis has
    answered for `SETTLE` seconds, counting the blips absorbed in between. Misconfiguration
    (credentials, ACL, db index) is not an outage: it is logged at ERROR with what to fix,
    at most once a minute, and reported as such.
    """

    MIN_BACKOFF = 0.1
    MAX_BACKOFF = 1.0
    SETTLE = 1.0
    REPORT_EVERY = 60.0

    def __init__(self, label: str) -> None:
        self.label = label
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self.cause = ""
        self.misconfig: str | None = None  # what to fix, while misconfigured
        self.silent_since: float | None = None  # oldest request unanswered since an answer
        self._last_answer = -_INF_S
        self._retry_at = 0.0
        self._trial = False
        self._backoff = self.MIN_BACKOFF
        self.failovers = 0  # functional failovers, blips included
        self.outages = 0  # outages as logged (blips within SETTLE merged)
        self._outage_start: float | None = None  # an outage logged, its end not yet
        self._blips = 0
        self._up_at = 0.0
        self.slow_replies = 0  # callers released at redis_timeout without failing over
        self._slow_reported = 0
        self._slow_report_at = time.monotonic() + self.REPORT_EVERY
        self._misconfig_logged = -_INF_S
        self._members: weakref.WeakSet[GuardMember] = weakref.WeakSet()

    @property
    def degraded(self) -> bool:
        return self.down_since is not None

    def add(self, member: GuardMember) -> None:
        with self._lock:
            self._members.add(member)

    def allow(self) -> bool:
        """May this caller try the store now? Always while up; while down, one trial per
        backoff period (the others use the fallback at once)."""
        if self.down_since is None:
            return True
        with self._lock:
            now = time.monotonic()
            if self._trial or now < self._retry_at:
                return False
            self._trial = True
            return True

    def silent(self, sent_at: float, failover_after: float) -> None:
        """A request sent at `sent_at` got no reply within the caller's wait. Fails over
        once Redis has answered nothing for `failover_after`."""
        with self._lock:
            now = time.monotonic()
            self.slow_replies += 1
            if sent_at < self._last_answer:
                return  # Redis answered since this was sent: a lost reply, not silence
            if self.silent_since is None or sent_at < self.silent_since:
                self.silent_since = sent_at
            if self.down_since is not None:
                self._trial_failed(now)
                return
            quiet = now - max(self.silent_since, self._last_answer)
            if quiet < failover_after:
                return
        self._go_down(f"no reply for {quiet:.2f}s (failover_after={failover_after:g}s)")

    def failure(self, exc: BaseException) -> None:
        """Evidence of an outage (refused, dropped, an error reply): fail over now."""
        self._go_down(describe(exc))

    def misconfigured(self, exc: BaseException) -> None:
        hint = misconfig_hint(exc, self.label)
        now = time.monotonic()
        with self._lock:
            self.misconfig = hint
            loud = now - self._misconfig_logged >= self.REPORT_EVERY
            if loud:
                self._misconfig_logged = now
        if loud:
            log.error("distbreaker: Redis at %s is misconfigured for distbreaker: %s. "
                      "Breakers run on their local fallback until it is fixed.",
                      self.label, hint,
                      extra={"event": "distbreaker.store_misconfigured", "store": self.label})
        self._go_down("misconfigured", quiet=True)

    def _trial_failed(self, now: float) -> None:
        self._trial = False
        self._retry_at = now + self._backoff * (0.5 + random.random())
        self._backoff = min(self._backoff * 2, self.MAX_BACKOFF)

    def _go_down(self, cause: str, quiet: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            first = self.down_since is None
            self._trial_failed(now)
            if not first:
                return
            self.down_since = now
            self.cause = cause
            self.failovers += 1
            ended = self._settled(now)
            blip = not quiet and self._outage_start is not None
            if blip:
                self._blips += 1
            elif not quiet:
                self._outage_start = now
                self._blips = 0
                self.outages += 1
            members = list(self._members)
        if ended is not None:
            self._log_back(*ended)
        if not blip and not quiet:
            log.warning("distbreaker: Redis unavailable at %s: %s; breakers fall back to "
                        "their local policy until it answers again", self.label, cause,
                        extra={"event": "distbreaker.store_down", "store": self.label,
                               "cause": cause})
        for m in members:
            m.store_lost()

    def _settled(self, now: float) -> tuple[float, int] | None:
        """An outage whose end is not logged yet, once Redis has been up for SETTLE."""
        if (self.down_since is None or self.down_since == now) and (
                self._outage_start is not None and now - self._up_at >= self.SETTLE
                and self._up_at >= self._outage_start):
            ended = (self._up_at - self._outage_start, self._blips)
            self._outage_start = None
            return ended
        return None

    def _log_back(self, took: float, blips: int) -> None:
        absorbed = f" ({blips} blips absorbed)" if blips else ""
        log.warning("distbreaker: Redis is back at %s after %.1fs%s; breakers use the "
                    "shared state again", self.label, took, absorbed,
                    extra={"event": "distbreaker.store_up", "store": self.label,
                           "outage_s": round(took, 3), "blips": blips})

    def answered(self, asked: float | None = None) -> None:
        """Redis answered a request (any request, however late). `asked`, when given, is
        when that request was sent: its answer may have been read late, so it proves
        Redis alive since then only, and ends no outage that began after it."""
        now = time.monotonic()
        at = now if asked is None else min(asked, now)
        if at > self._last_answer:
            self._last_answer = at
        if (self.down_since is None and self.silent_since is None
                and self._outage_start is None and self.misconfig is None):
            self._report_slow()
            return
        with self._lock:
            if (self.down_since is not None and at < self.down_since) or (
                    self.silent_since is not None and at < self.silent_since):
                return  # asked before the silence began: no evidence that it is over
            self.silent_since = None
            self.misconfig = None
            recovered = self.down_since is not None
            if recovered:
                self.down_since = None
                self.cause = ""
                self._trial = False
                self._backoff = self.MIN_BACKOFF
                self._up_at = now
            members = list(self._members) if recovered else []
            ended = None if recovered else self._settled(now)
        if ended is not None:
            self._log_back(*ended)
        for m in members:
            m.store_recovered()

    def success(self, asked: float | None = None) -> None:  # the listener's word
        if self.misconfig is None:
            self.answered(asked)

    def _report_slow(self) -> None:
        n = self.slow_replies - self._slow_reported
        if n <= 0 or time.monotonic() < self._slow_report_at:
            return
        with self._lock:
            n = self.slow_replies - self._slow_reported
            if n <= 0:
                return
            self._slow_reported = self.slow_replies
            self._slow_report_at = time.monotonic() + self.REPORT_EVERY
        log.info("distbreaker: %d replies from Redis at %s took longer than redis_timeout "
                 "in the last minute; their callers went on and the requests completed in "
                 "the background (no failover)", n, self.label,
                 extra={"event": "distbreaker.slow_replies", "store": self.label,
                        "count": n})




def guard_for(client: Any) -> StoreGuard:
    """The process's one guard for the server `client` talks to (clients of the same
    server share it; a forked child gets its own)."""
    key = label(client)
    with PROCESS.lock:
        g = PROCESS.guards.get(key)
        if g is None:
            g = PROCESS.guards[key] = StoreGuard(key)
        return g
