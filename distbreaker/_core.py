"""One breaker in one process, without I/O: the owners it is made of, and its decisions.

`BreakerCore` is what the sync and asyncio engines (`_sync_engine`, `_async_engine`) hold.
It owns nothing by itself but the decisions that need several owners at once: admitting
from the snapshot, rejecting, turning an acquire reply into a permit, turning a finished
call into a record call (or an outcome for the batch), and the metrics. The owners:

- `SnapshotCell` (`_snapshot`): the local view, and every write to it;
- `Calls` (`_protocol`): the script calls this breaker sends;
- `Announcer` (`_announce`): the hook, the listeners, once per transition;
- `Fallback` (`_fallback`): the guard and the in-process store while Redis fails;
- `Replies` (`_replies`): what the store and the channel say, applied;
- `Batching` (`_batching`): batched mode's outcomes and replies;
- `Counters` (`metrics`): this process's counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NoReturn

from ._announce import Announcer, Event, StateChangeHook
from ._batch import OutcomeBatch
from ._batching import Batching
from ._config import CircuitBreakerConfig, CircuitState
from ._errors import CircuitOpenError, StoreUnavailableError
from ._fallback import NO_REPLY, Fallback
from ._keys import DEFAULT_PREFIX, BreakerKeys, channel_for, validate_name, validate_prefix
from ._outcome import Permit, judge
from ._protocol import NONE, Calls, Code, Reply, ScriptCall, decode_reply
from ._replies import Replies
from ._snapshot import SnapshotCell
from .events import RejectionEvent
from .metrics import CircuitBreakerMetrics, Counters, FleetWindow

__all__ = ["BreakerCore"]

_monotonic = time.monotonic
_INF = math.inf
_CLOSED, _HALF_OPEN = CircuitState.CLOSED, CircuitState.HALF_OPEN


def _no_writer() -> None:
    raise RuntimeError("batched mode needs an engine to wake its writer")


class BreakerCore:
    """State and decisions of one breaker in one process; no I/O."""

    def __init__(self, name: str, config: CircuitBreakerConfig | None, *,
                 prefix: str = DEFAULT_PREFIX,
                 on_state_change: StateChangeHook | None = None) -> None:
        validate_name(name)
        validate_prefix(prefix)
        if config is None:
            config = CircuitBreakerConfig()
        elif not isinstance(config, CircuitBreakerConfig):
            raise TypeError(
                f"config must be a CircuitBreakerConfig, got {type(config).__name__}"
            )
        self.name = name
        self.config = config
        self.prefix = prefix
        self.keys = BreakerKeys.for_name(name, prefix)
        self.channel = channel_for(prefix)
        self.counters = Counters()
        self.cell = SnapshotCell(config.max_staleness)
        self.calls = Calls(self.keys, config, self.channel)
        self.announcer = Announcer(name, on_state_change, self.counters)
        self.fallback = Fallback(name, config, self.keys, self.cell, self.counters,
                                 self.announcer, self.calls)
        batch = OutcomeBatch(config) if config.consistency == "batched" else None
        self.batch = batch
        self.replies = Replies(name, config, self.cell, self.counters, batch, self.announcer,
                               self.fallback, self.calls)
        self.batching = None if batch is None else Batching(
            name, config, batch, self.cell, self.counters, self.replies, self.calls)
        #: Wakes the writer when batched outcomes are due; the engine sets it.
        self.wake: Callable[[], None] = _no_writer
        #: In-process store only: applies a plain success at a generation in place, or
        #: says False (`MemoryStore.plain_success`); the engine sets it.
        self.direct: Callable[[int], bool] | None = None

    # -- admitting ---------------------------------------------------------------------

    def fast_admit(self) -> Permit | None:
        """Admit locally when plainly CLOSED, raise when plainly not admissible; None means
        ask Redis (acquire.lua)."""
        cell = self.cell
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
            if self.announcer.listeners or self.fallback.local is not None:
                self.rejected(s.state, retry)
            self.counters.reject()
            raise CircuitOpenError(self.name, s.state, retry)
        return None

    def rejected(self, state: CircuitState, retry: float | None) -> NoReturn:
        """Count a rejection, tell the listeners, and raise what the caller should see."""
        self.counters.reject()
        store_down = self.fallback.denying
        a = self.announcer
        if a.listeners:
            a.emit(RejectionEvent(self.name, state, retry, store_down))
        if store_down:
            raise StoreUnavailableError(self.name, state, None, self.fallback.why())
        raise CircuitOpenError(self.name, state, retry)

    def after_acquire(self, call: ScriptCall, raw: Any) -> tuple[Permit, list[Event]]:
        """Apply an acquire reply; return the permit and the events to fire, or raise
        CircuitOpenError (after firing events)."""
        if raw is NO_REPLY:
            return self.snapshot_decides(), []
        r = decode_reply(raw)
        events = self.replies.apply(r, _monotonic())
        if r.decision == 0:
            self.announcer.fire(events)
            retry = None if r.forced == "open" else max(r.retry_after_ms, 0) / 1000.0
            if r.effective is _HALF_OPEN and self.config.timeout_duration is None:
                retry = 0.0  # the lease's end is not when the probe's result comes
            self.rejected(r.effective, retry)
        lease = str(call.args[-1]) if r.decision == 2 else ""
        if lease:
            self.counters.add("probes")
        return Permit(r.generation, lease, r.forced != "closed"), events

    def snapshot_decides(self) -> Permit:
        """No reply in time and no failover (yet): decide as the snapshot says. A breaker
        last seen CLOSED (or never seen) admits; one that was OPEN or HALF_OPEN admits
        nothing until Redis answers, as a probe may only come from Redis."""
        s = self.cell.snap
        if s.closed or not s.known:
            if not s.known and self.config.on_redis_error == "deny":
                self.rejected(s.state, self.config.redis_timeout)
            return Permit(max(s.generation, 0), "", not s.forced)
        self.rejected(s.state, None if s.forced == "open" else
                      0.0 if s.state is _HALF_OPEN else self.config.redis_timeout)

    # -- finishing ---------------------------------------------------------------------

    def finish(self, permit: Permit, exc: BaseException | None, result: Any, *,
               timed_out: bool = False) -> ScriptCall | None:
        """Classify a finished call, count it, and build its record call (None: nothing to
        send now: a forced-closed call, no outcome and no lease, or a batched outcome)."""
        failed, slow, timeout, duration, ra = judge(self.config, permit, exc, result,
                                                    timed_out, self.name)
        self.counters.outcome(failed, duration, slow, timeout)
        if not permit.lease and (not permit.record or failed is None):
            return None
        code = NONE if failed is None else Code.of(failed, slow)
        ra_ms = 0 if not ra or ra <= 0 else max(1, round(ra * 1000))
        b = self.batching
        if b is not None and not permit.lease:  # a probe's outcome is always sent at once
            if b.add(permit.generation, code, ra_ms):
                self.wake()
            return None
        direct = self.direct
        if (direct is not None and code == Code.OK and not permit.lease and not ra_ms
                and direct(permit.generation)):
            return None  # applied in the in-process store: no reply to apply either
        return self.calls.record(permit.generation, code, permit.lease, ra_ms)

    # -- the rest ----------------------------------------------------------------------

    def metrics(self, fleet_reply: Reply | None) -> CircuitBreakerMetrics:
        pending = self.batch.outstanding() if self.batch is not None else 0
        fleet = None
        x = fleet_reply.snapshot if fleet_reply is not None else None
        if fleet_reply is not None and x is not None:
            fleet = FleetWindow(
                calls=fleet_reply.calls, failures=fleet_reply.failures, slow=fleet_reply.slow,
                consecutive_failures=fleet_reply.consecutive_failures,
                half_open_successes=x.half_open_successes, reopen_count=x.reopen_count,
                active_probes=x.active_probes, generation=fleet_reply.generation,
                config_fingerprint=x.config_fingerprint,
            )
        g = self.fallback.guard
        return self.counters.view(self.name, self.cell.snap.state.value, fleet,
                                  self.fallback.degraded, pending,
                                  g.failovers if g is not None else 0,
                                  g is not None and g.misconfig is not None)

    def take_for_pipe(self) -> ScriptCall | None:
        """The next batch for a writer's pipeline, if one is due and Redis is up (while the
        guard is down, the writer's lone path decides: a trial, or the fallback)."""
        b, g = self.batching, self.fallback.guard
        if b is None or (g is not None and g.degraded):
            return None
        return b.take()

    def after_fork(self) -> None:
        """In a forked child: fresh locks, no fallback, a new origin (the parent's and every
        sibling's pushes are not this child's own), no pending outcomes (the parent sends
        its own), and a snapshot to confirm. The engine re-attaches hub and guard."""
        self.announcer.after_fork()
        self.counters.after_fork()
        self.fallback.after_fork()
        self.calls.renew()
        if self.batch is not None:
            self.batch.reset()
        self.cell.after_fork()
