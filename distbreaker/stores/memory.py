"""The in-process store: the pure model behind the script protocol.

For single-process use and tests. Share one `MemoryStore` between breakers to share state,
as they would through Redis; transition messages reach subscribers synchronously, after
the store's lock is released.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

from .._model import BreakerModel, ModelConfig
from .._protocol import ScriptCall, record_outcomes

__all__ = ["AsyncMemoryStore", "MemoryStore"]

_parse = functools.lru_cache(maxsize=256)(ModelConfig.parse)

Subscriber = Callable[[str], None]


class MemoryStore:
    """Thread-safe; its clock is this process's monotonic clock, in ms."""

    def __init__(self, clock_ms: Callable[[], int] | None = None) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, BreakerModel] = {}
        self._seqs: dict[str, itertools.count[int]] = {}  # by KEYS[4], as Lua's seq hash
        self._subs: dict[str, list[Subscriber]] = {}
        self._clock = clock_ms or (lambda: int(time.monotonic() * 1000))

    def run(self, call: ScriptCall, wait: float | None = None, done: Any = None) -> list[Any]:
        a = call.args
        cfg_s, fp, channel, name = str(a[0]), str(a[1]), str(a[2]), str(a[3])
        rnd = float(a[4])
        with self._lock:
            now = int(a[5]) if a[5] != "" else self._clock()
            m = self._models.get(call.keys[0])
            if m is None:
                m = self._models[call.keys[0]] = BreakerModel()
            if len(call.keys) > 3 and m.seq is None:
                m.seq = self._seq(call.keys[3])
            msgs: list[str] = []
            cfg = _parse(cfg_s)
            if call.op == "acquire":
                reply, msgs = m.acquire(cfg, fp, name, rnd, now, str(a[6]))
            elif call.op == "record":
                reply, msgs = m.record(cfg, fp, name, rnd, now, record_outcomes(a),
                                       a[6] in ("c", "r"))
            elif call.op == "snapshot":
                reply = m.snapshot(cfg, now)
            elif call.op == "force":
                reply, msgs = m.force(fp, name, now, str(a[6]))
            elif call.op == "reset":
                reply, msgs = m.reset(fp, name, now)
            else:
                raise ValueError(f"unknown operation {call.op!r}")
            subs = list(self._subs.get(channel, ()))
        for msg in msgs:
            for cb in subs:
                cb(msg)
        return reply

    def plain_success(self, key: str, cfg: ModelConfig, fp: str, generation: int,
                      clock_ms: int | None) -> bool:
        """One success of a call admitted while plainly CLOSED, applied straight to the
        model of state key `key` (`BreakerModel.plain_success`) instead of through the
        script protocol: the common call of an in-process breaker, without building and
        parsing a script call. False: nothing applied, send the record call."""
        with self._lock:
            m = self._models.get(key)
            if m is None:
                return False
            return m.plain_success(cfg, self._clock() if clock_ms is None else clock_ms,
                                   generation, fp)

    def _seq(self, key: str) -> Callable[[], int]:
        c = self._seqs.get(key)
        if c is None:
            c = self._seqs[key] = itertools.count(1)
        return c.__next__

    def seed(self, key: str, model: BreakerModel) -> None:
        """Start the breaker whose state key is `key` from `model` (a fallback seeded
        from the last shared snapshot)."""
        with self._lock:
            self._models[key] = model

    def subscribe(self, channel: str, callback: Subscriber) -> None:
        with self._lock:
            self._subs.setdefault(channel, []).append(callback)

    def unsubscribe(self, channel: str, callback: Subscriber) -> None:
        with self._lock:
            subs = self._subs.get(channel, [])
            if callback in subs:
                subs.remove(callback)


class AsyncMemoryStore:
    """The same in-process store behind an awaitable `run`."""

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.sync = store or MemoryStore()

    async def run(self, call: ScriptCall, wait: float | None = None,
                  done: Any = None) -> list[Any]:
        return self.sync.run(call)
