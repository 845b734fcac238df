"""What the sync and asyncio engines share: their place in the process.

An engine is a member of three things that outlive a call: the listener hub of its client
(`HubMember`: pushes and stale snapshots come through it), the guard of its Redis server
(through its core's fallback), and the process (`PROCESS.residents`: re-initialised after
a fork, given one step at exit). Joining and leaving them is the same for both engines;
how they run a call is not (`_sync_engine`, `_async_engine`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._core import BreakerCore
from ._listener import Hub, hub_for
from ._model import ModelConfig
from ._process import PROCESS
from ._protocol import Push
from .stores import AsyncMemoryStore, MemoryStore

__all__ = ["CLOSE_FLUSH_TIMEOUT_S", "Engine"]

#: How long close() and interpreter exit wait for pending outcomes (batched mode).
CLOSE_FLUSH_TIMEOUT_S = 5.0


class Engine:
    """One breaker's membership of its hub, its guard and the process."""

    def __init__(self, core: BreakerCore, store: Any, hub_kind: type[Hub], backend: Any,
                 client: Any) -> None:
        self.core = core
        self.name = core.name
        self.config = core.config
        self.store = store
        self._hub: Hub | None = None
        self.attached: tuple[type[Hub], Any, Any] | None = (hub_kind, backend, client)
        memory = store.sync if isinstance(store, AsyncMemoryStore) else store
        if isinstance(memory, MemoryStore):
            core.direct = _direct(memory, core)

    def _join(self) -> None:
        """The last step of a subclass's construction."""
        self.attach()
        PROCESS.residents.add(self)

    def attach(self) -> None:
        """Join this process's listener for the backend and, for Redis, the guard of the
        client: at construction and again in a forked child."""
        assert self.attached is not None
        hub_kind, backend, client = self.attached
        if client is not None:
            self.core.fallback.attach(client)
        self._hub = hub_for(hub_kind, backend, self.core.channel)
        self._hub.add(self)

    def detach(self) -> None:
        self.attached = None  # closed: a forked child does not re-attach it either
        if self._hub is not None:
            self._hub.remove(self)

    def after_fork(self) -> None:
        """In a forked child: the core's fresh state, then a new hub and guard (unless
        closed)."""
        self.core.after_fork()
        if self.attached is not None:
            self.attach()

    def apply_push(self, p: Push, recv: float) -> None:
        self.core.replies.push(p, recv)

    def is_stale(self, now: float) -> bool:
        return self.core.cell.is_stale(now)

    def heard(self, asked: float) -> None:
        self.core.cell.heard(asked)

    def refresh_background(self) -> Any:
        """Re-read the snapshot for the hub (a coroutine on an asyncio engine)."""
        raise NotImplementedError


def _direct(store: MemoryStore, core: BreakerCore) -> Callable[[int], bool]:
    """`BreakerCore.direct` for an in-process store: what a record call of one plain
    success would carry (state key, config, fingerprint, the test clock), bound once."""
    key = core.keys.all[0]
    cfg = ModelConfig.parse(core.config.script_arg)
    fp = core.config.fingerprint
    calls = core.calls
    plain = store.plain_success

    def direct(generation: int) -> bool:
        return plain(key, cfg, fp, generation, calls.clock_ms)

    return direct
