"""Event data for listeners (`breaker.add_listener(fn)`).

A listener is any callable taking one event. It runs outside every lock, in the thread
that learned of the event (a caller's thread, or the listener thread for pushes); an
exception in it is logged, never raised into a caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._config import CircuitState

__all__ = ["BreakerEvent", "Listener", "RejectionEvent", "StoreEvent", "TransitionEvent"]


@dataclass(frozen=True)
class TransitionEvent:
    """A fleet-wide transition. `local` is True in the process whose script made it (where
    `on_state_change` also fires), False where it was learned from pub/sub."""

    name: str
    old_state: CircuitState
    new_state: CircuitState
    generation: int
    override: str | None
    local: bool


@dataclass(frozen=True)
class RejectionEvent:
    """A call this process did not admit."""

    name: str
    state: CircuitState
    retry_after: float | None
    store_unavailable: bool


@dataclass(frozen=True)
class StoreEvent:
    """Redis became unavailable (`degraded` True) or came back, as seen by this breaker."""

    name: str
    degraded: bool


BreakerEvent = TransitionEvent | RejectionEvent | StoreEvent
Listener = Callable[[Any], Any]
