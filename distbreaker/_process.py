"""Everything distbreaker keeps per process, in one place, with one fork hook and one exit hook.

A breaker is shared through Redis, but some things are per process by nature: the listener
hub per client, the guard per Redis server, the derived clients every breaker of one client
shares, the background threads that finish late requests, the batched writer thread, the
asyncio loops' writers, the global manager. A forked child inherits none of them in a usable
state (threads do not survive a fork; a lock held by one may never be released), so after
a fork the child:

1. takes fresh locks;
2. forgets the parent's threads, hubs, guards, shared clients, loop writers and manager;
3. re-initialises every resident (every live breaker's engine), in no particular order
   (they share nothing but the registries): fresh locks, a new origin, no fallback, and
   new hubs and guards.

At interpreter exit, every resident's `at_exit()` runs: a sync breaker sends what its
batch holds, an asyncio one reports what its loop left unsent.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("distbreaker")

__all__ = ["PROCESS", "ProcessState"]


class ProcessState:
    """The process-wide registries; `PROCESS` is the one instance."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # guards every registry below
        self.hubs: weakref.WeakValueDictionary[tuple[Any, ...], Any] = (
            weakref.WeakValueDictionary())
        self.guards: dict[str, Any] = {}  # server label -> StoreGuard
        self.clients: dict[tuple[int, float, float | None], list[Any]] = {}
        self.executor: ThreadPoolExecutor | None = None
        self.writer: Any = None
        #: asyncio batched mode's writers: event loop -> _loop_writer.LoopWriter
        self.loop_writers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self.manager: Any = None  # the global CircuitBreakerManager (providers.configure)
        self.manager_lock = threading.Lock()  # held while one is built (that takes `lock`)
        #: Live breakers' engines: each has after_fork() and at_exit().
        self.residents: weakref.WeakSet[Any] = weakref.WeakSet()

    def after_fork_in_child(self) -> None:
        """Steps 1-3 of the module docstring, in that order."""
        self.lock = threading.Lock()
        self.manager_lock = threading.Lock()
        self.manager = None
        self.hubs = weakref.WeakValueDictionary()
        self.guards = {}
        self.clients = {}
        self.executor = None
        self.writer = None
        self.loop_writers = weakref.WeakKeyDictionary()  # one may have been mid-send
        for r in list(self.residents):
            try:
                r.after_fork()
            except Exception:  # never break the child over one breaker
                log.exception("distbreaker: re-initialising %r after fork failed", r)

    def at_exit(self) -> None:
        for r in list(self.residents):
            try:
                r.at_exit()
            except Exception:
                log.debug("distbreaker: an exit step failed", exc_info=True)


PROCESS = ProcessState()
os.register_at_fork(after_in_child=PROCESS.after_fork_in_child)
atexit.register(PROCESS.at_exit)
