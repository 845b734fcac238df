"""The pure transition rules, with `now` passed in.

This is the same state machine as ``lua/*.lua``, written for reading: the in-process store
runs it, and the tests hold the Lua scripts to it step by step. It takes the scripts'
own arguments (the config string, outcome groups) and returns their own reply arrays, so
the rest of the library cannot tell the in-process store from Redis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._protocol import NONE, Code, is_failure, is_slow

__all__ = ["MAX_LEASE_MS", "BreakerModel", "ModelConfig", "roll_window", "trips"]

#: A lease expiring later than now + this is garbage (no config grants more than a day).
MAX_LEASE_MS = 86_400_000 + 1000


@dataclass(frozen=True)
class ModelConfig:
    """The decoded config string (ARGV[1] of every script)."""

    # In the order of the config string; the Lua's name (CFG.<name>) after each field.
    failure_threshold: int  # ft: consecutive failures that trip
    recovery_ms: int  # rt: the open period
    success_threshold: int  # st: probe successes that close
    failure_rate: float  # frt: window failure rate that trips (0..1)
    minimum_calls: int  # minc: calls in the window before the rates count
    count_window: bool  # count: a count window (else a time window)
    window_n: int  # wn: calls of a count window, buckets of a time window
    bucket_ms: int  # bw: a time window's bucket width
    slow_rate: float  # srt: window slow-call rate that trips
    half_open_max: int  # homax: probes in flight at once
    max_recovery_ms: int  # maxrt: the longest open period (backoff, Retry-After)
    backoff_multiplier: float  # mult: open period growth per failed probe
    jitter: float  # jitter: +- share of the open period
    lease_ms: int  # lease: how long a probe permit lasts
    ttl_ms: int  # ttl: key expiry

    @classmethod
    def parse(cls, s: str) -> ModelConfig:
        c = [float(x) for x in s.split(",")]
        return cls(
            int(c[0]), int(c[1]), int(c[2]), c[3], int(c[4]), c[5] == 1, int(c[6]), int(c[7]),
            c[8], int(c[9]), int(c[10]), c[11], c[12], int(c[13]), int(c[14]),
        )


def trips(cfg: ModelConfig, calls: int, failures: int, slow: int, consecutive: int,
          failed: bool, slow_call: bool) -> bool:
    """The trip rule (record.lua's): after an outcome (`failed`, `slow_call`) has been
    counted into the window (`calls`, `failures`, `slow`) and the run of `consecutive`
    failures, does the breaker open? Either enough failures in a row, or, once the window
    holds `minimum_calls`, a failure rate (on a failure) or slow-call rate (on a slow
    call) at its threshold."""
    return (failed and consecutive >= cfg.failure_threshold) or (
        calls >= cfg.minimum_calls
        and ((failed and failures >= cfg.failure_rate * calls)
             or (slow_call and slow >= cfg.slow_rate * calls)))


def roll_window(totals: tuple[int, int, int], last_epoch: int | None, epoch: int, n: int,
                expired: Callable[[int], Sequence[int] | None]) -> tuple[int, int, int]:
    """A time window's (calls, failures, slow) as of bucket `epoch`, from its `totals` as
    of `last_epoch`: the buckets between fall out, each found by `expired(its epoch)`.
    A window `n` or more buckets old (either way: the clock may step back) is empty."""
    if last_epoch is None or abs(epoch - last_epoch) >= n:
        return 0, 0, 0
    if epoch <= last_epoch:
        return totals
    c, f, s = totals
    for k in range(last_epoch + 1, epoch + 1):
        b = expired(k - n)
        if b:
            c, f, s = c - b[0], f - b[1], s - b[2]
    return c, f, s


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
        return roll_window((self.calls, self.failures, self.slow), self.last_epoch,
                           now // cfg.bucket_ms, cfg.window_n, self.buckets.get)

    def add_time(self, cfg: ModelConfig, now: int, failed: bool, slow: bool) -> None:
        ep = now // cfg.bucket_ms
        if self.last_epoch is None or abs(ep - self.last_epoch) >= cfg.window_n:
            self.buckets.clear()
            self.calls = self.failures = self.slow = 0
            self.last_epoch = ep
        elif ep < self.last_epoch:
            ep = self.last_epoch  # server clock stepped back: count in the newest bucket
        else:
            for k in range(self.last_epoch + 1, ep + 1):
                b = self.buckets.pop(k - cfg.window_n, None)
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

    def add(self, cfg: ModelConfig, now: int, failed: bool, slow: bool) -> None:
        if cfg.count_window:
            self.add_count(cfg, failed, slow)
        else:
            self.add_time(cfg, now, failed, slow)

    def add_count(self, cfg: ModelConfig, failed: bool, slow: bool) -> None:
        code = Code.of(failed, slow)
        if len(self.ring) >= cfg.window_n:
            old = self.ring[self.head]
            self.failures -= is_failure(old)
            self.slow -= is_slow(old)
            self.ring[self.head] = code
        else:
            self.ring.append(code)
            self.calls += 1
        self.head = (self.head + 1) % cfg.window_n
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
    #: Numbers this breaker's messages in its prefix's sequence (KEYS[4] in Lua); None: '-'.
    seq: Callable[[], int] | None = field(default=None, repr=False, compare=False)

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
        d = cfg.recovery_ms * (cfg.backoff_multiplier**reopen)
        d = min(d, cfg.max_recovery_ms)
        d = d * (1 + cfg.jitter * (2 * rnd - 1))
        d = max(min(d, cfg.max_recovery_ms), 1)
        return math.floor(d)

    def _expire_probes(self, now: int) -> None:
        # as probes_active() in _lib.lua: expired, or beyond the longest possible lease
        for k in [k for k, exp in self.probes.items()
                  if exp <= now or exp > now + MAX_LEASE_MS]:
            del self.probes[k]

    def _msg(self, event: str, frm: str, now: int, name: str) -> str:
        to = self.effective
        seq = "-" if self.seq is None else self.seq()
        sender = name if " " in name else f"- {name}"
        return (
            f"v1 {event} {frm or to} {to} {self.gen} {self.open_until} {now} "
            f"{self.forced or '-'} {seq} {sender}"
        )

    def _reply(
        self, decision: int, now: int, frm: str, retry: int, free: int,
        w: tuple[int, int, int] | None = None,
    ) -> list[Any]:
        c, f, s = w if w is not None else (-1, -1, -1)
        return [decision, self.state, self.forced, self.gen, self.open_until, now, frm, retry,
                free, c, f, s, self.cf, ""]

    def _window_view(self, cfg: ModelConfig, now: int) -> tuple[int, int, int]:
        if cfg.count_window:
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
        if n < cfg.half_open_max:
            self.probes[lease] = now + cfg.lease_ms
            self._save(now, fp)
            return self._reply(2, now, frm, 0, cfg.half_open_max - n - 1), msgs
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
            if code == NONE or gen != self.gen or self.forced or self.state == "open":
                continue
            counted += 1
            failed = is_failure(code)
            slow = is_slow(code)
            if self.state == "closed":
                self.window.add(cfg, now, failed, slow)
                win = self.window
                w = (win.calls, win.failures, win.slow)
                self.cf = self.cf + 1 if failed else 0
                c, f, s = w
                if trips(cfg, c, f, s, self.cf, failed, slow):
                    open_ms = min(ra, cfg.max_recovery_ms) if failed and ra > 0 else cfg.recovery_ms
                    self.reopen = 0
                    frm = frm or self.effective
                    self._transition("open", now, open_ms)
                    w = None
            else:  # half_open
                if failed:
                    if ra > 0:
                        open_ms = min(ra, cfg.max_recovery_ms)
                    else:
                        open_ms = self._backoff(cfg, self.reopen + 1, rnd)
                    self.reopen += 1
                    frm = frm or self.effective
                    self._transition("open", now, open_ms)
                else:
                    self.hs += 1
                    if self.hs >= cfg.success_threshold:
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

    def plain_success(self, cfg: ModelConfig, now: int, generation: int, fp: str) -> bool:
        """`record()` of one success without a lease, when plainly CLOSED at `generation`:
        counted in the window, the failure streak ended, no transition (a success trips no
        rule: the rate rules are judged on failures) and no message. False, with nothing
        changed, when not plainly CLOSED there: the caller sends it through `record()`."""
        if self.state != "closed" or self.forced or generation != self.gen or not self.exists:
            return False
        self.window.add(cfg, now, False, False)
        self.cf = 0
        self._save(now, fp)
        return True

    def snapshot(self, cfg: ModelConfig, now: int) -> list[Any]:
        active = sum(1 for exp in self.probes.values() if now < exp <= now + MAX_LEASE_MS)
        free = max(cfg.half_open_max - active, 0) if self.state == "half_open" else -1
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
