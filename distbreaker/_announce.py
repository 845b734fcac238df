"""Who hears of a transition, and that each hears of it once.

A transition reaches a process by its own reply, by the pub/sub push, or both, in either
order; `Announcer` makes it one log line, one event for each listener, and (for a
transition this object's own script made) one `on_state_change` call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ._config import CircuitState
from .events import Listener, TransitionEvent
from .metrics import Counters

__all__ = ["Announcer", "Event", "StateChangeHook"]

log = logging.getLogger("distbreaker")

StateChangeHook = Callable[[str, CircuitState, CircuitState], Any]
#: A transition to announce: (name, old, new, generation, forced, Redis time in ms).
Event = tuple[str, CircuitState, CircuitState, int, str, int]

_SEEN_MAX = 512


class Announcer:
    """The hook, the listeners, and the transitions already announced."""

    def __init__(self, name: str, hook: StateChangeHook | None, counters: Counters) -> None:
        if hook is not None and not callable(hook):
            raise TypeError("on_state_change must be callable(name, old_state, new_state)")
        self.name = name
        self.hook = hook
        self.listeners: tuple[Listener, ...] = ()
        self._counters = counters
        self._lock = threading.Lock()
        # transitions heard, by (generation, Redis time): generations restart after
        # FLUSHALL, times do not
        self._seen: dict[tuple[int, int], None] = {}

    def add(self, listener: Listener) -> None:
        if not callable(listener):
            raise TypeError("a listener must be callable(event)")
        self.listeners = (*self.listeners, listener)

    def remove(self, listener: Listener) -> None:
        self.listeners = tuple(x for x in self.listeners if x != listener)

    def emit(self, event: Any) -> None:
        for fn in self.listeners:
            try:
                fn(event)
            except Exception:
                log.exception("distbreaker listener raised", extra={"breaker": self.name})

    def first(self, gen: int, now_ms: int) -> bool:
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

    def announce(self, gen: int, old: CircuitState, new: CircuitState, forced: str,
                 local: bool) -> None:
        if local:
            log.info("breaker %s: %s -> %s", self.name, old.value, new.value,
                     extra={"event": "distbreaker.transition", "breaker": self.name,
                            "from_state": old.value, "to_state": new.value,
                            "generation": gen})
        if self.listeners:
            self.emit(TransitionEvent(self.name, old, new, gen, forced or None, local))

    def fire(self, events: list[Event]) -> None:
        """Run on_state_change for transitions this process made, once each (its reply
        and its push both say so); never under a lock."""
        hook = self.hook
        for name, old, new, gen, forced, now_ms in events:
            if not self.first(gen, now_ms):
                continue
            self._counters.add("state_changes")
            if hook is not None:
                try:
                    hook(name, old, new)
                except Exception:
                    log.exception("on_state_change hook raised", extra={"breaker": name})
            self.announce(gen, old, new, forced, local=True)

    def after_fork(self) -> None:
        self._lock = threading.Lock()
