"""What the store says, applied: every reply and every push goes through `Replies`.

A reply (to a call this process made, on time or late) or a push (a transition or probe
news from any process) becomes at most one write to the snapshot cell, a note to the
batch of batched mode, and transitions for the announcer. Whether a newer view wins is
the cell's decision (`SnapshotCell.offer`); how a reply is laid out is `_protocol`'s.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from ._announce import Announcer, Event
from ._batch import OutcomeBatch
from ._config import CircuitBreakerConfig, CircuitState
from ._fallback import NO_REPLY, Fallback, LocalReply
from ._protocol import (
    Calls,
    Push,
    Reply,
    ScriptCall,
    decode_reply,
    decode_short,
    outcomes_sent,
    truncate,
)
from ._snapshot import LocalSnapshot, SnapshotCell
from .metrics import Counters

__all__ = ["Replies"]

log = logging.getLogger("distbreaker")
_monotonic = time.monotonic
_INF = math.inf
_CLOSED, _OPEN = CircuitState.CLOSED, CircuitState.OPEN


class Replies:
    """Applies one breaker's replies and pushes; notices config drift."""

    def __init__(self, name: str, config: CircuitBreakerConfig, cell: SnapshotCell,
                 counters: Counters, batch: OutcomeBatch | None, announcer: Announcer,
                 fallback: Fallback, calls: Calls) -> None:
        self.name = name
        self.config = config
        self._cell = cell
        self._counters = counters
        self._batch = batch
        self._announcer = announcer
        self._fallback = fallback
        self._calls = calls
        self._drift_warned = False
        self.config_drift = False  # the fingerprint in Redis is another config's

    def record(self, call: ScriptCall, raw: Any, sent: int | None = None,
               late: bool = False) -> list[Event]:
        """Apply a record (or operator) reply. `sent`: the outcomes the call carried, if
        the caller knows (the writer does); else counted from its groups of four."""
        if raw is NO_REPLY:
            return []  # it finishes in the background (see late)
        if sent is None:
            sent = outcomes_sent(call.args)
        local = isinstance(raw, LocalReply)
        short = decode_short(raw)
        if short is not None:  # still plainly CLOSED
            counted, gen, now_ms = short.counted, short.generation, short.now_ms
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
        return self.apply(r, _monotonic(), local=local, late=late)

    def snapshot(self, raw: Any, seq: int | None = None, late: bool = False) -> Reply | None:
        """Apply a snapshot reply; with `seq` (a background refresh), only if nothing was
        installed since the refresh was sent. None: no reply in time."""
        if raw is NO_REPLY:
            return None
        r = decode_reply(raw)
        self.apply(r, _monotonic(), snapshot=True, seq=seq,
                   local=isinstance(raw, LocalReply), late=late)
        return r

    def apply(self, r: Reply, recv: float, snapshot: bool = False, seq: int | None = None,
              local: bool = False, late: bool = False) -> list[Event]:
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
            b.adopt(r.generation, r.counts)
        if r.note:
            log.warning("repaired breaker state in Redis: %s", truncate(r.note),
                        extra={"breaker": self.name, "event": "distbreaker.repaired"})
        extras = r.snapshot if snapshot else None
        if extras is not None:
            self._check_drift(extras.config_fingerprint)
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
                        truncate(stored, 64), self.config.fingerprint,
                        extra={"breaker": self.name, "event": "distbreaker.config_drift",
                               "stored": truncate(stored, 64), "local": self.config.fingerprint})

    def push(self, p: Push, recv: float) -> None:
        """A message from the channel: install it if it is newer (while failed over, the
        fallback's state is the truth and pushes only inform), and announce a transition
        the first time this process hears of it. A transition this object's own script
        made (the origin says so) fires on_state_change here if its reply was lost."""
        eff = p.to_state
        if self._fallback.local is None:
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
            a = self._announcer
            if p.origin == self._calls.origin:
                a.fire([(self.name, p.from_state, p.to_state, p.generation, p.forced,
                         p.now_ms)])
            elif a.first(p.generation, p.now_ms):
                a.announce(p.generation, p.from_state, p.to_state, p.forced, local=False)

    def late(self, call: ScriptCall, raw: Any, exc: BaseException | None,
             ) -> tuple[list[Event], ScriptCall | None]:
        """The outcome of a request whose caller went on (no reply within redis_timeout,
        or cancelled): apply it. Returns the events to fire and, when a late acquire
        granted a probe lease nobody will use, the call that gives it back."""
        if exc is not None:
            try:  # the fallback counts it (unshared), as it counts the calls after it
                return self.record(call, self._fallback.late_failure(call, exc)), None
            except Exception:
                log.exception("distbreaker: could not apply a late outcome",
                              extra={"breaker": self.name})
                return [], None
        self._fallback.answered(raw)
        try:
            if call.op == "snapshot":
                self.snapshot(raw, late=True)
                return [], None
            if call.op == "acquire":
                r = decode_reply(raw)
                events = self.apply(r, _monotonic(), late=True)
                if r.decision == 2:  # nobody waits for this probe: give the lease back
                    return events, self._calls.give_back(r.generation, str(call.args[-1]))
                return events, None
            return self.record(call, raw, late=True), None  # record, force, reset
        except Exception:
            log.exception("distbreaker: could not apply a late reply",
                          extra={"breaker": self.name})
            return [], None
