"""What happens when Redis fails: one file for it.

`Fallback` stands between a breaker and its store. It tells the guard (shared by every
breaker of one Redis server) what each failure was, decides whether a call may try Redis
at all while the guard is open, and runs calls on an in-process store meanwhile, seeded
from the last snapshot: the real state for ``on_redis_error="local"``, an override for
"allow" and "deny". Outcomes it counts never reach the shared window (counted as
unshared); an outcome that may have reached Redis is never counted a second time (lost).
It is the guard's member: the guard calls `store_lost()` and `store_recovered()`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from ._announce import Announcer
from ._clients import was_sent
from ._config import CircuitBreakerConfig, CircuitState
from ._errors import StoreUnavailableError
from ._guard import StoreGuard, classify, guard_for
from ._keys import BreakerKeys
from ._model import BreakerModel
from ._protocol import NONE, Calls, ScriptCall, record_outcomes
from ._snapshot import SnapshotCell
from .events import StoreEvent
from .metrics import Counters
from .stores.memory import MemoryStore

__all__ = ["BACKGROUND", "CALLER", "NO_REPLY", "OPERATOR", "WRITER", "Fallback",
           "LocalReply", "outcomes_in"]

log = logging.getLogger("distbreaker")
_monotonic = time.monotonic
_CLOSED, _OPEN = CircuitState.CLOSED, CircuitState.OPEN

#: How a script call is run (see the engines' `run`): a caller waits at most redis_timeout
#: and its request may finish in the background; an operator action, the batched writer and
#: the listener's re-reads wait up to redis_background_timeout. Only callers and the
#: writer fall back to the local store; only background re-reads never move the guard.
CALLER, OPERATOR, WRITER, BACKGROUND = 0, 1, 2, 3

#: What a caller gets when Redis did not answer within redis_timeout.
NO_REPLY: Any = object()


class LocalReply(list[Any]):
    """A reply of the in-process fallback: its clock is not Redis's."""


class Fallback:
    """One breaker's side of the guard, and its in-process store while the guard is open."""

    def __init__(self, name: str, config: CircuitBreakerConfig, keys: BreakerKeys,
                 cell: SnapshotCell, counters: Counters, announcer: Announcer,
                 calls: Calls) -> None:
        self.name = name
        self.config = config
        self._keys = keys
        self._cell = cell
        self._counters = counters
        self._announcer = announcer
        self._calls = calls
        self._lock = threading.Lock()
        self.guard: StoreGuard | None = None  # None: the in-process store, nothing to fail
        self.local: MemoryStore | None = None  # kept only while failed over

    def attach(self, client: Any) -> None:
        """Join the guard of the Redis server `client` talks to (again in a forked child)."""
        self.guard = guard_for(client)
        self.guard.add(self)

    def after_fork(self) -> None:
        self._lock = threading.Lock()
        self.local = None

    @property
    def degraded(self) -> bool:
        g = self.guard
        return g is not None and g.degraded

    @property
    def problem(self) -> str | None:
        g = self.guard
        return g.misconfig if g is not None else None

    @property
    def denying(self) -> bool:
        """Failed over under on_redis_error="deny": rejections say Redis is why."""
        return self.local is not None and self.config.on_redis_error == "deny"

    def why(self, action: str = "") -> str:
        """The message of a StoreUnavailableError: what failed, and the policy in force."""
        g = self.guard
        cause = (g.misconfig or g.cause) if g is not None else ""
        policy = self.config.on_redis_error
        head = "Redis is unavailable" + (f" ({cause})" if cause else "")
        if action:
            return (f"{head}: {action} was not applied (operator actions must reach Redis; "
                    f"on_redis_error={policy!r} answers guarded calls meanwhile)")
        return f"{head} and on_redis_error is {policy!r}: calls are rejected until it returns"

    # -- one call's fate ---------------------------------------------------------------

    def may_try(self, mode: int) -> bool:
        """Go to the store? Not while the guard is open, except for an operator action
        (which must reach Redis or fail) and a background re-read (whose answer is how an
        idle process learns that Redis is back); the in-process store has no guard."""
        g = self.guard
        return g is None or mode in (OPERATOR, BACKGROUND) or g.allow()

    def answered(self, raw: Any, asked: float | None = None) -> Any:
        """Redis answered a request sent at `asked` (monotonic; None: just now). The
        reply may have waited in a socket before a busy thread read it, so it proves
        Redis alive since `asked` only: see `StoreGuard.answered`."""
        if self.guard is not None:
            self.guard.answered(asked)
        return raw

    def failed(self, call: ScriptCall, exc: BaseException, mode: int, sent_at: float) -> Any:
        """Redis failed: tell the guard what kind of failure it was (a background re-read
        tells it nothing); an operator action raises, a caller gets the fallback's
        answer, the writer's uncertain batch (sent, no reply) is reported lost."""
        kind = classify(exc)
        g = self.guard
        if g is not None and mode != BACKGROUND:
            if kind == "timeout":
                g.silent(sent_at, self.config.failover_after)
            elif kind == "misconfig":
                g.misconfigured(exc)
            else:
                g.failure(exc)
        if mode == OPERATOR:
            raise StoreUnavailableError(self.name, self._cell.snap.state, None,
                                        self.why(_op_arg(call))) from exc
        if mode == BACKGROUND or (mode == WRITER and kind == "timeout"):
            raise exc
        if call.op == "record" and kind != "misconfig" and was_sent(exc):
            # it may have been counted: never count it a second time in the fallback
            if mode == WRITER:
                raise exc  # the writer reports the batch lost
            self.count_lost(call)
            return NO_REPLY
        return self.run(call)

    @staticmethod
    def stuck_writer(mode: int, exc: BaseException) -> bool:
        """The batched writer's batch got no reply within redis_background_timeout. The
        engine asks Redis for a PING on another connection: if it answers, one connection
        was stuck (a blackhole swallowed its bytes), and that is not silence."""
        return mode == WRITER and classify(exc) == "timeout"

    def no_reply(self, call: ScriptCall, sent_at: float) -> Any:
        """A caller's request got no reply within redis_timeout and goes on in the
        background. Not an outage by itself: the guard decides (failover_after). The
        caller's answer: for a record, nothing to wait for; for an acquire, the
        fallback's if this breaker runs on it (the guard failed over), else the
        snapshot's."""
        g = self.guard
        if g is not None:
            g.silent(sent_at, self.config.failover_after)
        if call.op == "acquire" and self.local is not None:
            return self.run(call)
        return NO_REPLY

    def late_failure(self, call: ScriptCall, exc: BaseException) -> Any:
        """A request whose caller went on failed after all. Returns the fallback's reply
        of a record it now counts (unshared), or NO_REPLY."""
        kind = classify(exc)
        g = self.guard
        if call.op != "record":
            if g is not None and kind == "down":
                g.failure(exc)
            return NO_REPLY
        if g is not None and kind != "timeout":
            if kind == "misconfig":
                g.misconfigured(exc)
            else:
                g.failure(exc)
        if kind != "misconfig" and was_sent(exc):  # its fate unknown: never twice
            self.count_lost(call)
            return NO_REPLY
        return self.run(call)  # counted here (unshared), as the calls after it are

    def count_lost(self, call: ScriptCall) -> None:
        n = outcomes_in(call)
        if n:
            self._counters.add("lost", n)
            log.warning("breaker %s: a record of %d outcomes was sent but not answered; "
                        "they may or may not be counted", self.name, n,
                        extra={"breaker": self.name, "event": "distbreaker.outcomes_lost"})

    # -- the in-process store ------------------------------------------------------------

    def run(self, call: ScriptCall) -> Any:
        """Run a script call on the in-process store, seeded on first use from the last
        snapshot. Outcomes it records never reach the shared window: counted as unshared."""
        local = self.local
        if local is None:
            local = self._seed()
            g = self.guard
            with self._lock:  # kept only while failed over: recovery may have just run
                if self.local is not None:
                    local = self.local
                elif g is None or g.degraded:
                    self.local = local
        if call.op == "record":
            n = outcomes_in(call)
            if n:
                self._counters.add("unshared", n)
        return LocalReply(local.run(call))

    def _seed(self) -> MemoryStore:
        s = self._cell.snap
        policy = self.config.on_redis_error
        m = BreakerModel(gen=max(s.generation, 0), exists=True,
                         fingerprint=self.config.fingerprint)
        if policy == "allow":
            m.forced = "closed"
        elif policy == "deny":
            m.forced = "open"
        else:
            m.forced = s.forced
            if not s.forced and s.state is not _CLOSED and not self._cell.is_held():
                m.state = s.state.value
                admit_from = self._cell.admit_from
                if s.state is _OPEN and math.isfinite(admit_from):
                    left = max(admit_from - _monotonic(), 0.0)
                    m.open_until = int(_monotonic() * 1000) + int(left * 1000)
        store = MemoryStore()
        store.seed(self._keys.state, m)
        return store

    # -- the guard's member ------------------------------------------------------------

    def store_lost(self) -> None:
        """Redis just failed for this client: a "deny" breaker stops admitting at once,
        even before its own next call touches Redis."""
        if not self.degraded:
            return  # already recovered: a late notice
        if self._announcer.listeners:
            self._announcer.emit(StoreEvent(self.name, True))
        if self.config.on_redis_error == "deny":
            self.run(self._calls.build("snapshot"))
            self._cell.deny(_monotonic())

    def store_recovered(self) -> None:
        """Redis is back: drop the fallback and adopt the shared state. The snapshot stays
        (is_available() keeps answering from it) but is marked stale, so the listener
        re-reads it at once; a call adopts the shared state with its own reply."""
        with self._lock:
            self.local = None
        if self.config.on_redis_error != "local":
            self._cell.forget()  # the fallback's state was made up ("allow" / "deny")
        else:
            self._cell.mark_stale()
        if self._announcer.listeners:
            self._announcer.emit(StoreEvent(self.name, False))


def outcomes_in(call: ScriptCall) -> int:
    """How many outcomes (not bare lease returns) a record call carries."""
    if call.op != "record":
        return 0
    return sum(1 for o in record_outcomes(call.args) if o[1] != NONE)


def _op_arg(call: ScriptCall) -> str:
    """An operator call as the user wrote it: "force_open()", "reset()"."""
    if call.op == "force":
        return {"open": "force_open()", "closed": "force_closed()"}.get(str(call.args[6]),
                                                                        "release()")
    return f"{call.op}()"
