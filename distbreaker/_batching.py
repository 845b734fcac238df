"""Batched mode's glue between a breaker and its `OutcomeBatch`: one file for it.

Outcomes wait in the batch (`_batch.OutcomeBatch`, which also projects whether they trip
the breaker); a writer (the process's writer thread, or the event loop's writer task) takes
them as one record call, and the reply is applied here. While the projection says the
pending outcomes trip the breaker, the snapshot is held: nothing is admitted at that
generation until Redis has answered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ._announce import Event
from ._batch import OutcomeBatch
from ._config import CircuitBreakerConfig
from ._protocol import Calls, ScriptCall, decode_reply, decode_short
from ._replies import Replies
from ._snapshot import SnapshotCell
from .metrics import Counters

__all__ = ["Batching", "notify_all"]

log = logging.getLogger("distbreaker")


class Batching:
    """Adds outcomes to the batch, builds the writer's calls and applies their replies."""

    def __init__(self, name: str, config: CircuitBreakerConfig, batch: OutcomeBatch,
                 cell: SnapshotCell, counters: Counters, replies: Replies,
                 calls: Calls) -> None:
        self.name = name
        self.config = config
        self.batch = batch
        self._cell = cell
        self._counters = counters
        self._replies = replies
        self._calls = calls

    def add(self, generation: int, code: int, retry_after_ms: int) -> bool:
        """Queue one outcome; True when the writer should be woken now."""
        wake, trips = self.batch.add(generation, code, retry_after_ms)
        if trips:
            self.hold()
        return wake or trips

    def hold(self) -> None:
        """Make the snapshot agree with the batch's projection: while it trips, admit
        nothing at its generation; once it does not, lift the hold (see SnapshotCell)."""
        b = self.batch
        self._cell.hold(lambda: b.gen if b.tripped else -1)

    def take(self) -> ScriptCall | None:
        """The next record call of pending outcomes (None: none, or one is in flight)."""
        out = self.batch.take(self.config.max_batch)
        if not out:
            return None
        return self._calls.build("record", "r",
                                 ";".join(f"{g},{c},{r},{n}" for g, c, r, n in out))

    def due(self) -> float:
        """When (monotonic) the writer should send the pending outcomes."""
        return self.batch.due()

    def done(self, call: ScriptCall, raw: Any) -> tuple[bool, list[Event]]:
        """Apply the writer's reply; returns (more is pending, events to fire)."""
        short = decode_short(raw)
        if short is not None:
            gen, counts = short.generation, short.counts
        else:
            r = decode_reply(raw)  # raises on garbage before anything is marked applied
            gen, counts = r.generation, r.counts
        b = self.batch
        sent = b.sent
        more, _, waiters = b.done(gen, counts)
        # The reply is applied: from here on nothing may raise into the writer, or the
        # batch would be counted again as lost.
        self.hold()
        self._counters.add("batches")
        try:
            events = self._replies.record(call, raw, sent)
        except Exception:
            log.exception("distbreaker: could not apply a batch reply",
                          extra={"breaker": self.name})
            events = []
        notify_all(waiters)
        return more, events

    def lost(self, exc: BaseException) -> bool:
        """The writer's call failed in a way the fallback could not absorb, or was
        interrupted (`exc`): its outcomes are dropped, never sent twice. Returns whether
        more are pending."""
        b = self.batch
        if isinstance(exc, Exception):
            log.error("distbreaker: a batch of %d outcomes was lost", b.sent, exc_info=exc,
                      extra={"breaker": self.name, "event": "distbreaker.batch_lost"})
        self._counters.add("lost", b.sent)
        more, _, waiters = b.done(b.gen, None)
        self.hold()
        notify_all(waiters)
        return more

    def warn_unapplied(self, when: str) -> None:
        log.warning("breaker %s: %d outcomes not applied %s", self.name,
                    self.batch.outstanding(), when,
                    extra={"breaker": self.name, "event": "distbreaker.batch_lost"})


def notify_all(waiters: list[Callable[[], None]]) -> None:
    for notify in waiters:
        try:
            notify()
        except Exception:  # e.g. a flush() whose event loop is gone
            log.debug("distbreaker: a flush waiter could not be notified", exc_info=True)
