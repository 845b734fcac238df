"""The breaker logic shared by the sync and asyncio shells.

Everything that decides lives here: the local snapshot and fast path, outcome
classification, reply handling, callbacks. The shells in ``breaker.py`` only run the
`ScriptCall`s this class builds, through a store, and hand the replies back.
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, NoReturn

from ._batch import OutcomeBatch
from ._config import CircuitBreakerConfig, CircuitState
from ._errors import CircuitOpenError, StoreUnavailableError
from ._failsafe import StoreGuard, classify, guard_for, truncate, was_sent
from ._keys import DEFAULT_PREFIX, BreakerKeys, channel_for, validate_name, validate_prefix
from ._model import BreakerModel
from ._ops import (
    Code,
    Push,
    Reply,
    ScriptCall,
    argv_prefix,
    decode_reply,
    record_outcomes,
)
from ._snapshot import LocalSnapshot, SnapshotCell
from ._sync import Hub, hub_for
from .events import Listener, RejectionEvent, StoreEvent, TransitionEvent
from .metrics import CircuitBreakerMetrics, FleetWindow, _Counters
from .stores.memory import MemoryStore

__all__ = ["BACKGROUND", "CALLER", "OPERATOR", "WRITER", "BreakerCore", "LocalSnapshot",
           "Permit", "StateChangeHook"]

log = logging.getLogger("distbreaker")

_monotonic = time.monotonic
_sleep = time.sleep
_YIELD_EVERY_S = 0.0005
_perf = time.perf_counter
_INF = math.inf
_CLOSED, _OPEN, _HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
_NONE = int(Code.NONE)

StateChangeHook = Callable[[str, CircuitState, CircuitState], Any]


#: How a script call is run (see the shells' `_run`): a caller waits at most redis_timeout
#: and its request may finish in the background; an operator action, the batched writer and
#: the listener's re-reads wait up to redis_background_timeout. Only callers and the
#: writer fall back to the local store; only background re-reads never move the guard.
CALLER, OPERATOR, WRITER, BACKGROUND = 0, 1, 2, 3


class _LocalReply(list[Any]):
    """A reply of the in-process fallback: its clock is not Redis's."""


#: What a caller gets when Redis did not answer within redis_timeout.
NO_REPLY: Any = object()
_SEEN_MAX = 512

class Permit:
    """An admitted call. Finish it exactly once; `mark_failure` lets a `protect()` body
    report a failure that raised nothing (an HTTP 503, say)."""

    __slots__ = ("failed", "generation", "ignored", "lease", "record", "retry_after", "started")

    def __init__(self, generation: int, lease: str, record: bool) -> None:
        self.generation = generation
        self.lease = lease
        self.record = record
        self.failed = False
        self.ignored = False
        self.retry_after: float | None = None
        self.started = _perf()

    @property
    def is_probe(self) -> bool:
        return bool(self.lease)

    def mark_failure(self, retry_after: float | None = None) -> None:
        """Record this call as failed even if it returns normally.

        `retry_after` (seconds), e.g. from a provider's Retry-After header, sets the open
        period if this failure trips the breaker.
        """
        self.failed = True
        self.retry_after = retry_after

    def mark_ignored(self) -> None:
        """Count this call as neither success nor failure (it says nothing about the
        provider: a request this process got wrong, a cancellation). A probe's lease goes
        back to the fleet at once."""
        self.ignored = True


class BreakerCore:
    """State and decisions of one breaker in one process; no I/O."""

    def __init__(
        self,
        name: str,
        config: CircuitBreakerConfig | None,
        *,
        prefix: str = DEFAULT_PREFIX,
        on_state_change: StateChangeHook | None = None,
    ) -> None:
        validate_name(name)
        validate_prefix(prefix)
        if config is None:
            config = CircuitBreakerConfig()
        elif not isinstance(config, CircuitBreakerConfig):
            raise TypeError(
                f"config must be a CircuitBreakerConfig, got {type(config).__name__}"
            )
        if on_state_change is not None and not callable(on_state_change):
            raise TypeError("on_state_change must be callable(name, old_state, new_state)")
        self.name = name
        self.config = config
        self.prefix = prefix
        self.keys = BreakerKeys.for_name(name, prefix)
        self.channel = channel_for(prefix)
        self._on_state_change = on_state_change
        self._cell = SnapshotCell(config.max_staleness)  # the one owner of the snapshot
        self._yield_at = _INF  # a listener thread needs the GIL now and then: see is_available
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._origin = secrets.token_hex(4)  # tells this object's own pushed messages
        self._base_args = argv_prefix(config.script_arg, config.fingerprint, self.channel,
                                      f"{self._origin} {name}")
        # Private test clock: a time in ms that replaces Redis TIME in the scripts.
        self._now_ms: int | None = None
        # Redis as a failing dependency: the guard shared by the client's breakers, and the
        # in-process fallback used while it is open.
        self._guard: StoreGuard | None = None
        self._local: MemoryStore | None = None
        self._hub: Hub | None = None
        self._attached: tuple[type[Hub], Any, Any] | None = None
        self._listeners: tuple[Listener, ...] = ()
        # transitions heard, by (generation, Redis time): each is announced once however it
        # arrives (reply, push, both); generations restart after FLUSHALL, times do not
        self._seen: dict[tuple[int, int], None] = {}
        self._drift_warned = False
        self.config_drift = False  # the fingerprint in Redis is another config's
        # Batched mode: outcomes wait here for the writer, which the shell wakes.
        self._batch = OutcomeBatch(config) if config.consistency == "batched" else None
        _LIVE.add(self)

    # -- fast path (no I/O) ---------------------------------------------------------------

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
        return self._cell.snap

    def _fast_admit(self) -> Permit | None:
        """Admit locally when plainly CLOSED, raise when plainly not admissible; None means
        ask Redis (acquire.lua)."""
        cell = self._cell
        s = cell.snap
        if s.closed:
            return Permit(s.generation, "", not s.forced)
        now = _monotonic()
        admit_from = cell.admit_from
        if now < admit_from:
            # inline: this is the rejection path of every call while OPEN
            retry = None if s.forced == "open" else admit_from - now
            if retry == _INF:  # held by batched mode's projection: the open period to come
                retry = self.config.recovery_timeout
            elif s.state is _HALF_OPEN and self.config.timeout_duration is None:
                retry = 0.0  # a probe is out; when its result comes is not known
            if self._listeners or self._local is not None:
                self._raise_rejected(s.state, retry)
            self._counters.reject()
            raise CircuitOpenError(self.name, s.state, retry)
        return None

    def _raise_rejected(self, state: CircuitState, retry: float | None) -> NoReturn:
        self._counters.reject()
        store_down = self._local is not None and self.config.on_redis_error == "deny"
        if self._listeners:
            self._emit(RejectionEvent(self.name, state, retry, store_down))
        if store_down:
            raise StoreUnavailableError(self.name, state, None, self._why_unavailable())
        raise CircuitOpenError(self.name, state, retry)

    def _why_unavailable(self, action: str = "") -> str:
        """The message of a StoreUnavailableError: what failed, and the policy in force."""
        g = self._guard
        cause = (g.misconfig or g.cause) if g is not None else ""
        policy = self.config.on_redis_error
        head = "Redis is unavailable" + (f" ({cause})" if cause else "")
        if action:
            return (f"{head}: {action} was not applied (operator actions must reach Redis; "
                    f"on_redis_error={policy!r} answers guarded calls meanwhile)")
        return f"{head} and on_redis_error is {policy!r}: calls are rejected until it returns"

    # -- listeners ---------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(event)` for transitions (made here or learned over pub/sub),
        rejections and Redis outages; see `distbreaker.events`."""
        if not callable(listener):
            raise TypeError("a listener must be callable(event)")
        self._listeners = (*self._listeners, listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners = tuple(x for x in self._listeners if x != listener)

    def _emit(self, event: Any) -> None:
        for fn in self._listeners:
            try:
                fn(event)
            except Exception:
                log.exception("distbreaker listener raised", extra={"breaker": self.name})

    def _first(self, gen: int, now_ms: int) -> bool:
        """True the first time this process hears of the transition made at Redis time
        `now_ms` into generation `gen` (from a reply or a push, whichever comes first)."""
        key = (gen, now_ms)
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = None
            if len(self._seen) > _SEEN_MAX:
                del self._seen[next(iter(self._seen))]
            return True

    def _announce(self, gen: int, old: CircuitState, new: CircuitState, forced: str,
                  local: bool) -> None:
        if local:
            log.info("breaker %s: %s -> %s", self.name, old.value, new.value,
                     extra={"event": "distbreaker.transition", "breaker": self.name,
                            "from_state": old.value, "to_state": new.value,
                            "generation": gen})
        if self._listeners:
            self._emit(TransitionEvent(self.name, old, new, gen, forced or None, local))

    @property
    def store_degraded(self) -> bool:
        """True while Redis is unavailable and this breaker runs on its fallback."""
        g = self._guard
        return g is not None and g.degraded

    @property
    def store_problem(self) -> str | None:
        """While Redis refuses this process for a configuration reason (credentials, ACL,
        db index): what to fix. None otherwise."""
        g = self._guard
        return g.misconfig if g is not None else None

    # -- when Redis fails ----------------------------------------------------------------

    def _may_try_store(self, mode: int) -> bool:
        """Go to the store? Not while the guard is open, except for an operator action
        (which must reach Redis or fail) and a background re-read (whose answer is how an
        idle process learns that Redis is back); the in-process store has no guard."""
        g = self._guard
        return g is None or mode in (OPERATOR, BACKGROUND) or g.allow()

    def _store_answered(self, raw: Any) -> Any:
        if self._guard is not None:
            self._guard.answered()
        return raw

    def _store_failed(self, call: ScriptCall, exc: BaseException, mode: int,
                      sent_at: float) -> Any:
        """Redis failed: tell the guard what kind of failure it was (a background re-read
        tells it nothing); an operator action raises, a caller gets the fallback's
        answer, the writer's uncertain batch (sent, no reply) is reported lost."""
        kind = classify(exc)
        g = self._guard
        if g is not None and mode != BACKGROUND:
            if kind == "timeout":
                g.silent(sent_at, self.config.failover_after)
            elif kind == "misconfig":
                g.misconfigured(exc)
            else:
                g.failure(exc)
        if mode == OPERATOR:
            raise StoreUnavailableError(self.name, self.get_state(), None,
                                        self._why_unavailable(_op_arg(call))
                                        ) from exc
        if mode == BACKGROUND or (mode == WRITER and kind == "timeout"):
            raise exc
        if call.op == "record" and kind != "misconfig" and was_sent(exc):
            # it may have been counted: never count it a second time in the fallback
            if mode == WRITER:
                raise exc  # the writer reports the batch lost
            self._count_lost(call)
            return NO_REPLY
        return self._fallback_run(call)

    def _stuck_writer(self, mode: int, exc: BaseException) -> bool:
        """The batched writer's batch got no reply within redis_background_timeout. The
        shell asks Redis for a PING on another connection: if it answers, one connection
        was stuck (a blackhole swallowed its bytes), and that is not silence."""
        return mode == WRITER and classify(exc) == "timeout"

    def _count_lost(self, call: ScriptCall) -> None:
        n = _outcomes_in(call)
        if n:
            self._counters.add("lost", n)
            log.warning("breaker %s: a record of %d outcomes was sent but not answered; "
                        "they may or may not be counted", self.name, n,
                        extra={"breaker": self.name, "event": "distbreaker.outcomes_lost"})

    def _no_reply(self, call: ScriptCall, sent_at: float) -> Any:
        """A caller's request got no reply within redis_timeout and goes on in the
        background. Not an outage by itself: the guard decides (failover_after). The
        caller's answer: for a record, nothing to wait for; for an acquire, the
        fallback's if this breaker runs on it (the guard failed over), else the
        snapshot's."""
        g = self._guard
        if g is not None:
            g.silent(sent_at, self.config.failover_after)
        if call.op == "acquire" and self._local is not None:
            return self._fallback_run(call)
        return NO_REPLY

    def _late(self, call: ScriptCall, raw: Any, exc: BaseException | None,
              ) -> tuple[list[tuple[Any, ...]], ScriptCall | None]:
        """The outcome of a request whose caller went on (no reply within redis_timeout,
        or cancelled): apply it. Returns the events to fire and, when a late acquire
        granted a probe lease nobody will use, the call that gives it back."""
        if exc is not None:
            kind = classify(exc)
            g = self._guard
            if call.op != "record":
                if g is not None and kind == "down":
                    g.failure(exc)
                return [], None
            if g is not None and kind != "timeout":
                if kind == "misconfig":
                    g.misconfigured(exc)
                else:
                    g.failure(exc)
            if kind != "misconfig" and was_sent(exc):  # its fate unknown: never twice
                self._count_lost(call)
                return [], None
            try:  # the fallback counts it (unshared), as it counts the calls after it
                return self._after_record(call, self._fallback_run(call)), None
            except Exception:
                log.exception("distbreaker: could not apply a late outcome",
                              extra={"breaker": self.name})
                return [], None
        self._store_answered(raw)
        try:
            if call.op == "record":
                return self._after_record(call, raw, late=True), None
            if call.op == "snapshot":
                self._after_snapshot(raw, late=True)
                return [], None
            if call.op == "acquire":
                r = decode_reply(raw)
                events = self._apply_reply(r, _monotonic(), late=True)
                if r.decision == 2:  # nobody waits for this probe: give the lease back
                    lease = str(call.args[-1])
                    return events, self._call("record", "", r.generation, _NONE, lease, 0)
                return events, None
            return self._after_record(call, raw, late=True), None  # force / reset
        except Exception:
            log.exception("distbreaker: could not apply a late reply",
                          extra={"breaker": self.name})
            return [], None

    def _fallback_run(self, call: ScriptCall) -> Any:
        """Run a script call on the in-process fallback, seeded on first use from the last
        snapshot: the real state for policy "local", an override for "allow" / "deny".
        Outcomes it records never reach the shared window: counted as unshared."""
        local = self._local
        if local is None:
            local = self._seed_local()
            g = self._guard
            with self._lock:  # kept only while failed over: recovery may have just run
                if self._local is not None:
                    local = self._local
                elif g is None or g.degraded:
                    self._local = local
        if call.op == "record":
            n = _outcomes_in(call)
            if n:
                self._counters.add("unshared", n)
        return _LocalReply(local.run(call))

    def _seed_local(self) -> MemoryStore:
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
        store._models[self.keys.state] = m
        return store

    def _store_lost(self) -> None:
        """Redis just failed for this client: a "deny" breaker stops admitting at once,
        even before its own next call touches Redis."""
        g = self._guard
        if g is not None and not g.degraded:
            return  # already recovered: a late notice
        if self._listeners:
            self._emit(StoreEvent(self.name, True))
        if self.config.on_redis_error == "deny":
            self._fallback_run(self._call("snapshot"))
            self._cell.deny(_monotonic())

    def _store_recovered(self) -> None:
        """Redis is back: drop the fallback and adopt the shared state. The snapshot stays
        (is_available() keeps answering from it) but is marked stale, so the listener
        re-reads it at once; a call adopts the shared state with its own reply."""
        with self._lock:
            self._local = None
        if self.config.on_redis_error != "local":
            self._cell.forget()  # the fallback's state was made up ("allow" / "deny")
        else:
            self._cell.mark_stale()
        if self._listeners:
            self._emit(StoreEvent(self.name, False))

    # -- script calls -----------------------------------------------------------------------

    def _call(self, op: str, *extra: str | int | float) -> ScriptCall:
        args = self._base_args.copy()
        args.append(random.random())
        args.append("" if self._now_ms is None else self._now_ms)
        args.extend(extra)
        return ScriptCall(op, self.keys.all, args)

    def _acquire_call(self) -> ScriptCall:
        return self._call("acquire", secrets.token_hex(8))

    def _after_acquire(self, call: ScriptCall, raw: Any) -> tuple[Permit, list[tuple[Any, ...]]]:
        """Apply an acquire reply; return the permit and the events to fire, or raise
        CircuitOpenError (after firing events)."""
        if raw is NO_REPLY:
            return self._snapshot_decides(), []
        r = decode_reply(raw)
        events = self._apply_reply(r, _monotonic())
        if r.decision == 0:
            self._fire(events)
            retry = None if r.forced == "open" else max(r.retry_after_ms, 0) / 1000.0
            if r.effective is _HALF_OPEN and self.config.timeout_duration is None:
                retry = 0.0  # the lease's end is not when the probe's result comes
            self._raise_rejected(r.effective, retry)
        lease = str(call.args[-1]) if r.decision == 2 else ""
        if lease:
            self._counters.add("probes")
        return Permit(r.generation, lease, r.forced != "closed"), events

    def _snapshot_decides(self) -> Permit:
        """No reply in time and no failover (yet): decide as the snapshot says. A breaker
        last seen CLOSED (or never seen) admits; one that was OPEN or HALF_OPEN admits
        nothing until Redis answers, as a probe may only come from Redis."""
        s = self._cell.snap
        if s.closed or not s.known:
            if not s.known and self.config.on_redis_error == "deny":
                self._raise_rejected(s.state, self.config.redis_timeout)
            return Permit(max(s.generation, 0), "", not s.forced)
        self._raise_rejected(s.state, None if s.forced == "open" else
                             0.0 if s.state is _HALF_OPEN else self.config.redis_timeout)

    def _finish(
        self, permit: Permit, exc: BaseException | None, result: Any, *, timed_out: bool = False
    ) -> ScriptCall | None:
        """Classify a finished call, count it, and build its record call (None: nothing to
        send, e.g. a call admitted under a forced-closed override)."""
        cfg = self.config
        duration = _perf() - permit.started
        timeout = not permit.ignored and (timed_out or (
            cfg.timeout_duration is not None and duration > cfg.timeout_duration
        ))
        slow = cfg.slow_call_duration is not None and duration > cfg.slow_call_duration
        retry_after = permit.retry_after
        failed: bool | None
        if permit.ignored:
            failed = None
        elif timeout:
            failed = True
        elif exc is not None:
            if not isinstance(exc, Exception) or isinstance(exc, cfg.ignore_exceptions):
                failed = None  # cancellation, interpreter exit, or excluded by config
            else:
                failed = isinstance(exc, cfg.record_exceptions)
                if failed and retry_after is None:
                    retry_after = _retry_after_of(exc)
        else:
            failed = permit.failed
            if not failed and cfg.is_failure_result is not None:
                try:
                    failed = bool(cfg.is_failure_result(result))
                except Exception:
                    log.exception("is_failure_result raised; counting the call as failed",
                                  extra={"breaker": self.name})
                    failed = True
        self._counters.outcome(failed, duration, slow, timeout)
        if not permit.lease and (not permit.record or failed is None):
            return None  # nothing for Redis: a forced-closed call, or no outcome and no lease
        code = _NONE if failed is None else Code.of(failed, slow)
        ra = 0 if not retry_after or retry_after <= 0 else max(1, round(retry_after * 1000))
        b = self._batch
        if b is not None and not permit.lease:  # a probe's outcome is always sent at once
            wake, trips = b.add(permit.generation, code, ra)
            if trips:
                self._apply_hold()
            if wake or trips:
                self._wake()
            return None
        return self._call("record", "", permit.generation, code, permit.lease, ra)

    # -- batched mode -----------------------------------------------------------------------

    def _wake(self) -> None:
        """Tell the writer this breaker has outcomes pending; the shell provides it."""
        raise NotImplementedError

    def _apply_hold(self) -> None:
        """Make the snapshot agree with the batch's projection: while it trips, admit
        nothing at its generation; once it does not, lift the hold (see SnapshotCell)."""
        b = self._batch
        if b is not None:
            self._cell.hold(lambda: b.gen if b.tripped else -1)

    def _batch_take(self) -> ScriptCall | None:
        """The next record call of pending outcomes (None: none, or one is in flight)."""
        b = self._batch
        out = b.take(self.config.max_batch) if b is not None else None
        if not out:
            return None
        return self._call("record", "r", ";".join(f"{g},{c},{r},{n}" for g, c, r, n in out))

    def _batch_due(self) -> float:
        """When (monotonic) the writer should send this breaker's pending outcomes."""
        return self._batch.due() if self._batch is not None else _INF

    def _batch_done(self, call: ScriptCall, raw: Any) -> tuple[bool, list[tuple[Any, ...]]]:
        """Apply the writer's reply; returns (more is pending, events to fire)."""
        assert self._batch is not None
        if len(raw) == 3 or len(raw) == 7:
            gen = int(raw[1])
            counts = (int(raw[3]), int(raw[4]), int(raw[5]), int(raw[6])) if len(raw) == 7 \
                else None
        else:
            r = decode_reply(raw)  # raises on garbage before anything is marked applied
            gen = r.generation
            counts = (r.calls, r.failures, r.slow, r.consecutive_failures)
        b = self._batch
        sent = b.sent
        more, _, waiters = b.done(gen, counts)
        # The reply is applied: from here on nothing may raise into the writer, or the
        # batch would be counted again as lost.
        self._apply_hold()
        self._counters.add("batches")
        try:
            events = self._after_record(call, raw, sent)
        except Exception:
            log.exception("distbreaker: could not apply a batch reply",
                          extra={"breaker": self.name})
            events = []
        _notify_all(waiters)
        return more, events

    def _warn_unapplied(self, when: str) -> None:
        n = self._batch.outstanding() if self._batch is not None else 0
        log.warning("breaker %s: %d outcomes not applied %s", self.name, n, when,
                    extra={"breaker": self.name, "event": "distbreaker.batch_lost"})

    def _batch_lost(self, exc: BaseException) -> bool:
        """The writer's call failed in a way the fallback could not absorb, or was
        interrupted (`exc`): its outcomes are dropped, never sent twice. Returns whether
        more are pending."""
        b = self._batch
        assert b is not None
        if isinstance(exc, Exception):
            log.error("distbreaker: a batch of %d outcomes was lost", b.sent, exc_info=exc,
                      extra={"breaker": self.name, "event": "distbreaker.batch_lost"})
        self._counters.add("lost", b.sent)
        more, _, waiters = b.done(b.gen, None)
        self._apply_hold()
        _notify_all(waiters)
        return more

    def _after_record(self, call: ScriptCall, raw: Any, sent: int | None = None,
                      late: bool = False) -> list[tuple[Any, ...]]:
        """Apply a record (or operator) reply. `sent`: the outcomes the call carried, if
        the caller knows (the writer does); else counted from its groups of four."""
        if raw is NO_REPLY:
            return []  # it finishes in the background (see _late)
        if sent is None:  # outcome groups start at args[7]; the code is the second of each
            a = call.args
            sent = sum(1 for i in range(8, len(a), 4) if a[i] != _NONE)
        local = isinstance(raw, _LocalReply)
        if len(raw) == 3 or len(raw) == 7:  # short reply: still plainly CLOSED
            counted, gen, now_ms = int(raw[0]), int(raw[1]), int(raw[2])
            if sent > counted:
                self._counters.add("stale", sent - counted)
            if local:
                self._cell.offer(LocalSnapshot(_CLOSED, "", gen, now_ms, _monotonic(), True,
                                               True, True), -_INF)
            else:
                self._cell.confirm(gen, now_ms, _monotonic(), late=late)
            return []
        r = decode_reply(raw)
        if sent > r.decision:
            self._counters.add("stale", sent - r.decision)
        return self._apply_reply(r, _monotonic(), local=local, late=late)

    def _after_snapshot(self, raw: Any, seq: int | None = None,
                        late: bool = False) -> Reply | None:
        """Apply a snapshot reply; with `seq` (a background refresh), only if nothing was
        installed since the refresh was sent. None: no reply in time."""
        if raw is NO_REPLY:
            return None
        r = decode_reply(raw)
        self._apply_reply(r, _monotonic(), snapshot=True, seq=seq,
                          local=isinstance(raw, _LocalReply), late=late)
        return r

    # -- applying what the store says ------------------------------------------------------

    def _apply_reply(self, r: Reply, recv: float, snapshot: bool = False,
                     seq: int | None = None, local: bool = False,
                     late: bool = False) -> list[tuple[Any, ...]]:
        eff = r.effective
        if eff is _CLOSED:
            admit_from = -_INF
        elif eff is _OPEN:
            admit_from = _INF if r.forced == "open" else recv + max(
                r.open_until_ms - r.now_ms, 0) / 1000.0
        elif r.probes_free == 0:
            wait = r.retry_after_ms / 1000.0 if r.retry_after_ms > 0 else self.config.lease_s
            admit_from = recv + wait
        else:
            admit_from = -_INF
        snap = LocalSnapshot(eff, r.forced, r.generation, r.now_ms, recv, eff is _CLOSED,
                             True, local)
        self._cell.offer(snap, admit_from, seq=seq, late=late)
        b = self._batch
        if b is not None and r.generation > b.gen:
            b.adopt(r.generation, (r.calls, r.failures, r.slow, r.consecutive_failures))
        if r.note:
            log.warning("repaired breaker state in Redis: %s", truncate(r.note),
                        extra={"breaker": self.name, "event": "distbreaker.repaired"})
        if snapshot and len(r.extra) > 4:
            self._check_drift(str(r.extra[4]))
        if r.transition_from and not snapshot:
            return [(self.name, CircuitState(r.transition_from), eff, r.generation, r.forced,
                     r.now_ms)]
        return []

    def _check_drift(self, stored: str) -> None:
        drift = bool(stored) and stored != self.config.fingerprint
        self.config_drift = drift
        if drift and not self._drift_warned:
            self._drift_warned = True
            log.warning("breaker %r: Redis holds config %s, this process runs %s; processes "
                        "sharing a breaker should share its config", self.name,
                        truncate(stored, 64),
                        self.config.fingerprint,
                        extra={"breaker": self.name, "event": "distbreaker.config_drift",
                               "stored": truncate(stored, 64), "local": self.config.fingerprint})

    def _attach(self, hub_kind: type[Hub], backend: Any, client: Any) -> None:
        """Join this process's listener for `backend` and, for Redis, the guard of
        `client`: done at construction and again in a forked child."""
        self._attached = (hub_kind, backend, client)
        if client is not None:
            self._guard = guard_for(client)
            self._guard.add(self)
        self._hub = hub_for(hub_kind, backend, self.channel)
        self._hub.add(self)
        self._yield_at = -_INF if getattr(self._hub, "THREADED", False) else _INF

    def _detach(self) -> None:
        self._attached = None  # closed: a forked child does not re-attach it either
        if self._hub is not None:
            self._hub.remove(self)

    def _after_fork(self) -> None:
        """In a forked child: fresh locks, no fallback, and a new listener and guard (the
        parent's thread and connections do not exist here)."""
        self._lock = threading.Lock()
        self._counters._lock = threading.Lock()
        self._local = None
        # a new origin: the parent's (and every sibling's) pushes are not this child's own
        self._origin = secrets.token_hex(4)
        self._base_args = argv_prefix(self.config.script_arg, self.config.fingerprint,
                                      self.channel, f"{self._origin} {self.name}")
        if self._batch is not None:
            self._batch.reset()  # the parent sends its own pending outcomes
        self._cell.after_fork()
        if self._attached is not None:
            self._attach(*self._attached)

    def _apply_push(self, p: Push, recv: float) -> None:
        """A message from the channel: install it if it is newer (while failed over, the
        fallback's state is the truth and pushes only inform), and announce a transition
        the first time this process hears of it. A transition this object's own script
        made (the origin says so) fires on_state_change here if its reply was lost."""
        eff = p.to_state
        if self._local is None:
            if eff is _CLOSED:
                admit_from = -_INF
            elif eff is _OPEN:
                admit_from = _INF if p.forced == "open" else recv + max(
                    p.open_until_ms - p.now_ms, 0) / 1000.0
            else:
                admit_from = -_INF
            self._cell.offer(
                LocalSnapshot(eff, p.forced, p.generation, p.now_ms, recv, eff is _CLOSED),
                admit_from, push=True, probe_news=p.event == "p",
            )
            b = self._batch
            if b is not None and p.generation > b.gen:
                b.adopt(p.generation, None)
        if p.from_state is not p.to_state:
            if p.origin == self._origin:
                self._fire([(self.name, p.from_state, p.to_state, p.generation, p.forced,
                             p.now_ms)])
            elif self._first(p.generation, p.now_ms):
                self._announce(p.generation, p.from_state, p.to_state, p.forced, local=False)

    def _forget(self) -> None:
        """Drop the snapshot so the next call asks Redis first (e.g. after a fork)."""
        self._cell.forget()

    def _is_stale(self, now: float) -> bool:
        return self._cell.is_stale(now)

    def _fire(self, events: list[tuple[Any, ...]]) -> None:
        """Run on_state_change for transitions this process made, once each (its reply
        and its push both say so); never under a lock."""
        hook = self._on_state_change
        for name, old, new, gen, forced, now_ms in events:
            if not self._first(gen, now_ms):
                continue
            self._counters.add("state_changes")
            if hook is not None:
                try:
                    hook(name, old, new)
                except Exception:
                    log.exception("on_state_change hook raised", extra={"breaker": name})
            self._announce(gen, old, new, forced, local=True)

    def _metrics(self, fleet_reply: Reply | None) -> CircuitBreakerMetrics:
        pending = self._batch.outstanding() if self._batch is not None else 0
        fleet = None
        if fleet_reply is not None:
            x = fleet_reply.extra
            fleet = FleetWindow(
                calls=fleet_reply.calls, failures=fleet_reply.failures, slow=fleet_reply.slow,
                consecutive_failures=fleet_reply.consecutive_failures,
                half_open_successes=int(x[0]), reopen_count=int(x[1]),
                active_probes=int(x[5]), generation=fleet_reply.generation,
                config_fingerprint=str(x[4]),
            )
        g = self._guard
        return self._counters.view(self.name, self._cell.snap.state.value, fleet,
                                   self.store_degraded, pending,
                                   g.failovers if g is not None else 0,
                                   g is not None and g.misconfig is not None)


_LIVE: weakref.WeakSet[BreakerCore] = weakref.WeakSet()


def _reinit_after_fork() -> None:
    for b in list(_LIVE):
        try:
            b._after_fork()
        except Exception:  # never break the child over one breaker
            log.exception("distbreaker: re-initialising %r after fork failed", b)


os.register_at_fork(after_in_child=_reinit_after_fork)


def _outcomes_in(call: ScriptCall) -> int:
    """How many outcomes (not bare lease returns) a record call carries."""
    if call.op != "record":
        return 0
    return sum(1 for o in record_outcomes(call.args) if o[1] != _NONE)


def _op_arg(call: ScriptCall) -> str:
    """An operator call as the user wrote it: "force_open()", "reset()"."""
    if call.op == "force":
        return {"open": "force_open()", "closed": "force_closed()"}.get(str(call.args[6]),
                                                                        "release()")
    return f"{call.op}()"


def _notify_all(waiters: list[Callable[[], None]]) -> None:
    for notify in waiters:
        try:
            notify()
        except Exception:  # e.g. a flush() whose event loop is gone
            log.debug("distbreaker: a flush waiter could not be notified", exc_info=True)


def _retry_after_of(exc: BaseException) -> float | None:
    """A `retry_after` attribute (seconds) on the exception, if it carries a usable one."""
    v = getattr(exc, "retry_after", None)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v):
        return float(v)
    return None
