"""The pure transition rules, with `now` passed in.

This is the same state machine as ``lua/*.lua``, written for reading: the in-process store
runs it, and the tests hold the Lua scripts to it step by step. It takes the scripts'
own arguments (the config string, outcome groups) and returns their own reply arrays, so
the rest of the library cannot tell the in-process store from Redis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_LEASE_MS", "BreakerModel", "ModelConfig"]

#: A lease expiring later than now + this is garbage (no config grants more than a day).
MAX_LEASE_MS = 86_400_000 + 1000


@dataclass(frozen=True)
class ModelConfig:
    """The decoded config string (ARGV[1] of every script)."""

    ft: int
    rt: int
    st: int
    frt: float
    minc: int
    count: bool
    wn: int
    bw: int
    srt: float
    homax: int
    maxrt: int
    mult: float
    jitter: float
    lease: int
    ttl: int

    @classmethod
    def parse(cls, s: str) -> ModelConfig:
        c = [float(x) for x in s.split(",")]
        return cls(
            int(c[0]), int(c[1]), int(c[2]), c[3], int(c[4]), c[5] == 1, int(c[6]), int(c[7]),
            c[8], int(c[9]), int(c[10]), c[11], c[12], int(c[13]), int(c[14]),
        )


@dataclass
class _Window:
    calls: int = 0
    failures: int = 0
    slow: int = 0
    # time window: epoch -> [calls, failures, slow]; count window: ring of codes
    buckets: dict[int, list[int]] = field(default_factory=dict)
    last_epoch: int | None = None
    ring: list[int] = field(default_factory=list)
    head: int = 0

    def view_time(self, cfg: ModelConfig, now: int) -> tuple[int, int, int]:
        ep = now // cfg.bw
        if self.last_epoch is None or abs(ep - self.last_epoch) >= cfg.wn:
            return 0, 0, 0
        if ep <= self.last_epoch:
            return self.calls, self.failures, self.slow
        c, f, s = self.calls, self.failures, self.slow
        for k in range(self.last_epoch + 1, ep + 1):
            b = self.buckets.get(k - cfg.wn)
            if b:
                c, f, s = c - b[0], f - b[1], s - b[2]
        return c, f, s

    def add_time(self, cfg: ModelConfig, now: int, failed: bool, slow: bool) -> None:
        ep = now // cfg.bw
        if self.last_epoch is None or abs(ep - self.last_epoch) >= cfg.wn:
            self.buckets.clear()
            self.calls = self.failures = self.slow = 0
            self.last_epoch = ep
        elif ep < self.last_epoch:
            ep = self.last_epoch  # server clock stepped back: count in the newest bucket
        else:
            for k in range(self.last_epoch + 1, ep + 1):
                b = self.buckets.pop(k - cfg.wn, None)
                if b:
                    self.calls -= b[0]
                    self.failures -= b[1]
                    self.slow -= b[2]
            self.last_epoch = ep
        b = self.buckets.setdefault(ep, [0, 0, 0])
        b[0] += 1
        b[1] += failed
        b[2] += slow
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def add_count(self, cfg: ModelConfig, failed: bool, slow: bool) -> None:
        code = int(failed) + 2 * int(slow)
        if len(self.ring) >= cfg.wn:
            old = self.ring[self.head]
            self.failures -= old in (1, 3)
            self.slow -= old >= 2
            self.ring[self.head] = code
        else:
            self.ring.append(code)
            self.calls += 1
        self.head = (self.head + 1) % cfg.wn
        self.failures += failed
        self.slow += slow


@dataclass
class BreakerModel:
    """One breaker's shared state (what Redis holds in its three keys)."""

    state: str = "closed"
    gen: int = 0
    open_until: int = 0
    cf: int = 0
    hs: int = 0
    reopen: int = 0
    forced: str = ""
    opened_at: int = 0
    updated_at: int = 0
    fingerprint: str = ""
    exists: bool = False
    window: _Window = field(default_factory=_Window)
    probes: dict[str, int] = field(default_factory=dict)

    # -- helpers mirroring lua/_lib.lua --------------------------------------------------

    @property
    def effective(self) -> str:
        return self.forced or self.state

    def _transition(self, to: str, now: int, open_ms: int = 0) -> None:
        self.state = to
        self.gen += 1
        self.cf = 0
        self.hs = 0
        if to == "open":
            self.opened_at = now
            self.open_until = now + open_ms
        elif to == "closed":
            self.reopen = 0
            self.open_until = 0
        self.window = _Window()
        self.probes.clear()

    def _save(self, now: int, fp: str) -> None:
        self.exists = True
        self.updated_at = now
        if fp:
            self.fingerprint = fp

    @staticmethod
    def _backoff(cfg: ModelConfig, reopen: int, rnd: float) -> int:
        d = cfg.rt * (cfg.mult**reopen)
        d = min(d, cfg.maxrt)
        d = d * (1 + cfg.jitter * (2 * rnd - 1))
        d = max(min(d, cfg.maxrt), 1)
        return math.floor(d)

    def _expire_probes(self, now: int) -> None:
        # as probes_active() in _lib.lua: expired, or beyond the longest possible lease
        for k in [k for k, exp in self.probes.items()
                  if exp <= now or exp > now + MAX_LEASE_MS]:
            del self.probes[k]

    def _msg(self, event: str, frm: str, now: int, name: str) -> str:
        to = self.effective
        return (
            f"v1 {event} {frm or to} {to} {self.gen} {self.open_until} {now} "
            f"{self.forced or '-'} {name}"
        )

    def _reply(
        self, decision: int, now: int, frm: str, retry: int, free: int,
        w: tuple[int, int, int] | None = None,
    ) -> list[Any]:
        c, f, s = w if w is not None else (-1, -1, -1)
        return [decision, self.state, self.forced, self.gen, self.open_until, now, frm, retry,
                free, c, f, s, self.cf, ""]

    def _window_view(self, cfg: ModelConfig, now: int) -> tuple[int, int, int]:
        if cfg.count:
            w = self.window
            return w.calls, w.failures, w.slow
        return self.window.view_time(cfg, now)

    # -- the five operations: (reply, published messages) --------------------------------

    def acquire(
        self, cfg: ModelConfig, fp: str, name: str, rnd: float, now: int, lease: str
    ) -> tuple[list[Any], list[str]]:
        msgs: list[str] = []
        if self.forced == "open":
            return self._reply(0, now, "", -1, -1), msgs
        if self.forced == "closed" or self.state == "closed":
            return self._reply(1, now, "", 0, -1), msgs
        frm = ""
        if self.state == "open":
            if now < self.open_until:
                return self._reply(0, now, "", self.open_until - now, -1), msgs
            frm = self.effective
            self._transition("half_open", now)
            self._save(now, fp)
            msgs.append(self._msg("t", frm, now, name))
        self._expire_probes(now)
        n = len(self.probes)
        if n < cfg.homax:
            self.probes[lease] = now + cfg.lease
            self._save(now, fp)
            return self._reply(2, now, frm, 0, cfg.homax - n - 1), msgs
        first = min(self.probes.values())
        return self._reply(0, now, frm, max(first - now, 1), 0), msgs

    def record(
        self, cfg: ModelConfig, fp: str, name: str, rnd: float, now: int,
        outcomes: list[tuple[int, int, str, int]], counts: bool = False,
    ) -> tuple[list[Any], list[str]]:
        counted = 0
        freed = False
        frm = ""
        w: tuple[int, int, int] | None = None
        for gen, code, lease, ra in outcomes:
            if lease and self.probes.pop(lease, None) is not None:
                freed = True
            if code == 4 or gen != self.gen or self.forced or self.state == "open":
                continue
            counted += 1
            failed = code in (1, 3)
            slow = code >= 2
            if self.state == "closed":
                if cfg.count:
                    self.window.add_count(cfg, failed, slow)
                else:
                    self.window.add_time(cfg, now, failed, slow)
                win = self.window
                w = (win.calls, win.failures, win.slow)
                self.cf = self.cf + 1 if failed else 0
                c, f, s = w
                if (failed and self.cf >= cfg.ft) or (
                    c >= cfg.minc
                    and ((failed and f >= cfg.frt * c) or (slow and s >= cfg.srt * c))
                ):
                    open_ms = min(ra, cfg.maxrt) if failed and ra > 0 else cfg.rt
                    self.reopen = 0
                    frm = frm or self.effective
                    self._transition("open", now, open_ms)
                    w = None
            else:  # half_open
                if failed:
                    if ra > 0:
                        open_ms = min(ra, cfg.maxrt)
                    else:
                        open_ms = self._backoff(cfg, self.reopen + 1, rnd)
                    self.reopen += 1
                    frm = frm or self.effective
                    self._transition("open", now, open_ms)
                else:
                    self.hs += 1
                    if self.hs >= cfg.st:
                        frm = frm or self.effective
                        self._transition("closed", now)
        self._save(now, fp)
        msgs: list[str] = []
        if frm:
            msgs.append(self._msg("t", frm, now, name))
        elif freed and self.state == "half_open" and not self.forced:
            msgs.append(self._msg("p", "", now, name))
        if not frm and self.state == "closed" and not self.forced and not freed:
            if not counts:
                return [counted, self.gen, now], msgs
            c, f, s = w if w is not None else self._window_view(cfg, now)
            return [counted, self.gen, now, c, f, s, self.cf], msgs
        free = 1 if self.state == "half_open" and freed else -1
        return self._reply(counted, now, frm, 0, free, w), msgs

    def snapshot(self, cfg: ModelConfig, now: int) -> list[Any]:
        active = sum(1 for exp in self.probes.values() if now < exp <= now + MAX_LEASE_MS)
        free = max(cfg.homax - active, 0) if self.state == "half_open" else -1
        retry = 0
        if self.forced == "open":
            retry = -1
        elif not self.forced and self.state == "open":
            retry = max(self.open_until - now, 0)
        r = self._reply(int(self.exists), now, "", retry, free, self._window_view(cfg, now))
        fp = self.fingerprint if self.exists else ""
        return [*r, self.hs, self.reopen, self.opened_at, self.updated_at if self.exists else 0,
                fp, active]

    def force(
        self, fp: str, name: str, now: int, mode: str
    ) -> tuple[list[Any], list[str]]:
        if mode not in ("open", "closed", ""):
            raise ValueError(f"force mode must be open, closed or empty, got {mode!r}")
        if self.forced == mode:
            return self._reply(0, now, "", 0, -1), []
        before = self.effective
        self._transition(self.state, now, 0)
        self.forced = mode
        frm = "" if before == self.effective else before
        self._save(now, fp)
        return self._reply(1, now, frm, -1 if mode == "open" else 0, -1), [
            self._msg("f", frm, now, name)
        ]

    def reset(self, fp: str, name: str, now: int) -> tuple[list[Any], list[str]]:
        before = self.effective
        self._transition("closed", now)
        self.forced = ""
        self.reopen = 0
        frm = "" if before == "closed" else before
        self._save(now, fp)
        return self._reply(1, now, frm, 0, -1), [self._msg("r", frm, now, name)]
