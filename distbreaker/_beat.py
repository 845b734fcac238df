"""The listener's heartbeat: proof that it heard every message, at the cost of one read.

Every script that publishes on a prefix's channel also counts the message in the prefix's
sequence hash (`seq_key_for`, field ``n``), and the message carries its number. A listener
keeps the last number it heard; a gap means it missed one. Once per beat (three quarters
of the shortest `max_staleness`) it reads ``n`` and the hash's epoch ``e``:

- ``n`` equals the last number heard: every message published before the read was sent has
  been heard, so every snapshot from Redis is still current as of that moment (confirmed,
  without re-reading it): an idle process costs one command per beat, whatever the number
  of its breakers;
- ``n`` is higher: those messages are in flight or lost. A PING on the pub/sub connection
  settles it: its reply comes after every message published before it, so if the numbers
  have not caught up by then, something was lost and every snapshot is re-read. A PING that
  gets no reply means a dead connection: the listener reconnects (and re-reads);
- ``n`` went back, or the epoch changed or vanished: Redis lost its data (FLUSHALL, a
  restart without persistence) or was replaced; every snapshot is re-read. The epoch is a
  random token the first listener to find none writes (HSETNX).

What never publishes (a key that expired, an edit by hand) is caught by a full re-read of
each snapshot every `SnapshotCell.reread_after`. A Cluster client has no sequence key (it
lives in another slot) and no order between a node's replies and the bus: its hub does
not beat, and re-reads each snapshot every `max_staleness` as before.
"""

from __future__ import annotations

import enum
import logging
import secrets
from typing import Any

from ._protocol import truncate

__all__ = ["BEAT_TOKEN", "Beat", "Step"]

log = logging.getLogger("distbreaker")

BEAT_TOKEN = "distbreaker-beat"  # the PING message, so that a user's health check is not ours
OVERDUE_MIN_S = 2.0  # a PING unanswered this long (or two beats) is a dead connection


class Step(enum.Enum):
    NOTHING = "nothing"
    CONFIRM = "confirm"  # every snapshot current as of the read's send time
    PING = "ping"  # ask the pub/sub connection first
    RESYNC = "resync"  # re-read every snapshot


def _int(v: Any) -> int | None:
    if v is None:
        return 0
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


class Beat:
    """What one listener knows of its channel's sequence; no I/O (the hub does it)."""

    def __init__(self, key: str, enabled: bool) -> None:
        self.key = key
        self.enabled = enabled
        self.mine = secrets.token_hex(8)  # the epoch this listener writes if it finds none
        self.epoch: str | None = None
        self.last: int | None = None  # the last number heard, in order
        self.missed = False  # a gap was heard: the hub re-reads everything
        self.pending: tuple[float, int] | None = None  # a PING is out: (asked, n awaited)
        self.next_at = 0.0

    def push(self, seq: int | None) -> None:
        """A message numbered `seq` was heard (None: it carries no number)."""
        if seq is None:
            return
        last = self.last
        if last is None or seq > last:
            if last is not None and seq != last + 1:
                self.missed = True
            self.last = seq
        # seq <= last: older than the read that set `last`, or a sequence started over;
        # the next beat's read tells which

    def due(self, now: float) -> bool:
        return self.enabled and self.pending is None and now >= self.next_at

    def overdue(self, now: float, period: float) -> bool:
        p = self.pending
        return p is not None and now - p[0] > max(2 * period, OVERDUE_MIN_S)

    def read(self, asked: float, period: float, e: Any, n: Any, claimed: bool,
             first: bool) -> Step:
        """The reply to HMGET key e n sent at `asked` (`claimed`: our HSETNX of the epoch
        took). `first`: just subscribed, and every snapshot is about to be re-read."""
        self.next_at = asked + period
        num = _int(n)
        if num is None:
            self.disable(f"field n holds {truncate(n, 40)!r}, not a number")
            return Step.NOTHING
        epoch = (e.decode() if isinstance(e, bytes) else str(e)) if e is not None else None
        if epoch is None and claimed:
            epoch = self.mine
        lost = self.epoch is not None and epoch != self.epoch
        if epoch is not None or lost:
            self.epoch = epoch  # None after a loss another listener re-claimed: adopt next
        if first or lost or self.last is None or num < self.last:
            self.last, self.pending, self.missed = num, None, False
            return Step.NOTHING if first else Step.RESYNC
        if num == self.last:
            return Step.CONFIRM
        self.pending = (asked, num)
        return Step.PING

    def pong(self) -> tuple[Step, float]:
        """The reply to our PING: every message published before it has been heard."""
        p, self.pending = self.pending, None
        if p is None:
            return Step.NOTHING, 0.0
        asked, want = p
        if self.last is not None and self.last >= want:
            return Step.CONFIRM, asked
        self.last = want
        return Step.RESYNC, asked

    def reset(self) -> None:
        """The subscription is gone: what was heard on it proves nothing any more."""
        self.last, self.pending, self.missed = None, None, False
        self.next_at = 0.0

    def disable(self, why: object) -> None:
        """The sequence key cannot be used (garbage in it, an ACL without it): re-read
        every snapshot every max_staleness instead, as a Cluster hub does."""
        if self.enabled:
            self.enabled = False
            self.pending = None
            log.warning("distbreaker: cannot use %s (%s); every breaker's state will be "
                        "re-read every max_staleness instead. Delete the key if it holds "
                        "garbage, or let the client's ACL user read and write it.",
                        self.key, why, extra={"event": "distbreaker.sequence_unusable"})
