"""A worker of the fault campaign (tests/test_campaign.py).

Usage: python tests/support/campaign_worker.py '<json spec>'. The spec names the worker (`id`), its
kind (`sync` or `async`), the breaker's Redis URL (the campaign's proxy), the control
Redis URL (a second redis-server that no fault touches), the breaker name, the control
namespace `ns`, the breaker config and the call rate.

It calls a guarded backend `rate` times a second until `<ns>:stop` is set. Through the
control server:

- `<ns>:backend` = "fail" makes the backend raise `BackendDown`;
- `<ns>:hold` = k asks for checkpoint k: the worker stops calling, flushes, and pushes its
  counters to `<ns>:ckpt:<k>`; it resumes when the key is gone;
- every 20 ms it writes `[wall time, state, generation, store_degraded]` to `<ns>:live`.

At the end it prints one JSON line: every exception that was neither CircuitOpenError nor
the backend's own, every call whose overhead (elapsed minus the backend's own time) went
over `redis_timeout + 0.1 s`, each TransitionEvent and StoreEvent heard (with the wall
time), each on_state_change call, its state changes, its waits in HALF_OPEN without a
probe, and its final metrics. Times are wall-clock (`time.time()`), comparable with
Redis TIME and with the other processes on this machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import threading
import time
from typing import Any

import redis
import redis.asyncio as aioredis

import distbreaker
from distbreaker import (
    AsyncCircuitBreaker,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitOpenError,
    CircuitState,
    StoreUnavailableError,
)
from distbreaker.events import StoreEvent, TransitionEvent

HALF_OPEN_WAIT_REPORTED_S = 0.5  # waits in HALF_OPEN without a probe longer than this


class BackendDown(Exception):
    """The guarded backend's own failure."""


class Control(threading.Thread):
    """Polls the control server for the test's orders; publishes this worker's state."""

    def __init__(self, spec: dict[str, Any], state: Any) -> None:
        super().__init__(name="campaign-control", daemon=True)
        self.ns = spec["ns"]
        self.wid = spec["id"]
        self.r = redis.Redis.from_url(spec["control_url"], socket_timeout=10)
        self.state = state  # () -> list: what goes to <ns>:live
        self.failing = False
        self.hold: str | None = None
        self.stop = False
        self.errors: list[str] = []

    def poll_once(self) -> None:
        p = self.r.pipeline(transaction=False)
        p.mget([f"{self.ns}:backend", f"{self.ns}:hold", f"{self.ns}:stop"])
        p.hset(f"{self.ns}:live", self.wid, json.dumps(self.state()))
        (backend, hold, stop), _ = p.execute()
        self.failing = backend == b"fail"
        self.hold = hold.decode() if hold is not None else None
        self.stop = stop is not None

    def run(self) -> None:
        while not self.stop:
            try:
                self.poll_once()
            except Exception as e:  # the control server is never faulted: worth reporting
                self.errors.append(f"{type(e).__name__}: {e}")
            time.sleep(0.02)


class Recorder:
    """What the worker saw, for the final report."""

    def __init__(self, spec: dict[str, Any], cfg: CircuitBreakerConfig) -> None:
        self.spec = spec
        self.bound = cfg.redis_timeout + 0.1
        self.breaker: Any = None
        self.calls = self.admitted = self.rejected = self.backend_failures = 0
        self.probes_admitted = 0  # admitted while this process did not see CLOSED
        self.unexpected: list[list[Any]] = []
        self.unexpected_count = 0
        self.slow: list[list[Any]] = []
        self.slow_count = 0
        self.max_overhead = 0.0
        self.worst_at = 0.0
        self.events: list[list[Any]] = []
        self.hooks: list[list[Any]] = []
        self.states: list[list[Any]] = []
        self.ho_waits: list[list[float]] = []
        self.max_ho_wait = 0.0
        self._ho_since: float | None = None
        self._last_state: str | None = None
        self.checkpoints = 0

    # -- callbacks (any thread) ------------------------------------------------------------

    def hook(self, name: str, old: CircuitState, new: CircuitState) -> None:
        gen = self.breaker.snapshot.generation if self.breaker is not None else -1
        self.hooks.append([time.time(), str(old), str(new), gen])

    def listen(self, event: Any) -> None:
        if isinstance(event, TransitionEvent):
            self.events.append([time.time(), "T", event.generation, str(event.old_state),
                                str(event.new_state), event.local, event.override])
        elif isinstance(event, StoreEvent):
            self.events.append([time.time(), "S", event.degraded])

    def live(self) -> list[Any]:
        b = self.breaker
        if b is None:
            return [time.time(), "unknown", -1, False]
        return [time.time(), str(b.get_state()), b.snapshot.generation, bool(b.store_degraded)]

    # -- the calling loop --------------------------------------------------------------------

    def note_state(self) -> str:
        s = str(self.breaker.get_state())
        if s != self._last_state:
            self.states.append([time.time(), s])
            self._last_state = s
        return s

    def outcome(self, before: str, kind: str, exc: BaseException | None, overhead: float
                ) -> None:
        now = time.time()
        self.calls += 1
        if kind == "unexpected":
            self.unexpected_count += 1
            if len(self.unexpected) < 50:
                self.unexpected.append([now, f"{type(exc).__module__}.{type(exc).__name__}",
                                        str(exc)[:300]])
        elif kind == "rejected":
            self.rejected += 1
        else:
            self.admitted += 1
            if kind == "failed":
                self.backend_failures += 1
            if before != "closed":
                self.probes_admitted += 1
        if overhead > self.max_overhead:
            self.max_overhead, self.worst_at = overhead, now
        if overhead > self.bound:
            self.slow_count += 1
            if len(self.slow) < 100:
                self.slow.append([now, round(overhead, 4), before, kind])
        # a stretch of rejections while this process sees HALF_OPEN: no probe for it
        after = self.note_state()
        if kind == "rejected" and (before == "half_open" or after == "half_open"):
            if self._ho_since is None:
                self._ho_since = now
        else:
            self.end_ho_wait(now)

    def end_ho_wait(self, now: float) -> None:
        if self._ho_since is not None:
            waited = now - self._ho_since
            self.max_ho_wait = max(self.max_ho_wait, waited)
            if waited > HALF_OPEN_WAIT_REPORTED_S:
                self.ho_waits.append([self._ho_since, now, round(waited, 3)])
            self._ho_since = None

    def report(self, metrics: Any, control: Control) -> dict[str, Any]:
        self.end_ho_wait(time.time())
        m = metrics.to_dict() if metrics is not None else None
        return {
            "id": self.spec["id"], "kind": self.spec["kind"],
            "consistency": self.spec["config"].get("consistency", "strict"),
            "calls": self.calls, "admitted": self.admitted, "rejected": self.rejected,
            "backend_failures": self.backend_failures,
            "probes_admitted": self.probes_admitted,
            "unexpected": self.unexpected, "unexpected_count": self.unexpected_count,
            "slow_calls": self.slow, "slow_count": self.slow_count,
            "max_overhead_s": round(self.max_overhead, 4), "worst_at": self.worst_at,
            "events": self.events, "hooks": self.hooks, "states": self.states,
            "half_open_waits": self.ho_waits, "max_half_open_wait_s": round(self.max_ho_wait, 3),
            "checkpoints": self.checkpoints, "metrics": m,
            "distbreaker": distbreaker.__file__,
            "control_errors": control.errors[:20],
        }


def counters(m: Any, rec: Recorder, flushed: bool) -> dict[str, Any]:
    """The outcome counters of a checkpoint (absent new fields are None)."""
    return {
        "id": rec.spec["id"], "t": time.time(), "flushed": flushed,
        "recorded": m.successful_calls + m.failed_calls,
        "admitted_seen": rec.admitted,
        "ignored": m.ignored_calls, "stale": m.stale_outcomes,
        "lost": m.lost_outcomes, "pending": m.pending_outcomes,
        "unshared": m.unshared_outcomes,
        "failovers": m.store_failovers,
        "degraded": m.store_degraded, "state": m.state,
    }


def classify(exc: BaseException) -> str:
    if isinstance(exc, StoreUnavailableError):  # policy "local": never expected
        return "unexpected"
    if isinstance(exc, CircuitOpenError):
        return "rejected"
    if isinstance(exc, BackendDown):
        return "failed"
    return "unexpected"


def run_sync(spec: dict[str, Any], cfg: CircuitBreakerConfig) -> dict[str, Any]:
    rec = Recorder(spec, cfg)
    b = CircuitBreaker(spec["name"], cfg, redis=redis.Redis.from_url(spec["url"]),
                       on_state_change=rec.hook)
    rec.breaker = b
    b.add_listener(rec.listen)
    ctl = Control(spec, rec.live)
    ctl.poll_once()
    ctl.start()
    ctl.r.rpush(f"{spec['ns']}:ready", spec["id"])
    period = 1.0 / spec["rate"]
    spent = [0.0]

    def backend() -> int:
        t0 = time.perf_counter()
        try:
            if ctl.failing:
                raise BackendDown
            return 1
        finally:
            spent[0] = time.perf_counter() - t0

    handled: str | None = None
    nxt = time.monotonic()
    while not ctl.stop:
        hold = ctl.hold
        if hold is not None and hold != handled:
            handled = hold
            rec.checkpoints += 1
            flushed = b.flush(timeout=2.0)
            c = counters(b.get_metrics(), rec, flushed)
            ctl.r.rpush(f"{spec['ns']}:ckpt:{hold}", json.dumps(c))
            while ctl.hold == hold and not ctl.stop:
                time.sleep(0.005)
            rec.end_ho_wait(time.time())  # the hold is not a wait for a probe
            nxt = time.monotonic()
            continue
        before = rec.note_state()
        spent[0] = 0.0
        exc: BaseException | None = None
        t0 = time.perf_counter()
        try:
            b.call(backend)
        except BaseException as e:  # classified below: anything unexpected is reported
            exc = e
        overhead = time.perf_counter() - t0 - spent[0]
        rec.outcome(before, "ok" if exc is None else classify(exc), exc, overhead)
        nxt += period
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -0.5:
            nxt = time.monotonic()  # do not burst to catch up
    b.flush(timeout=3.0)
    m = b.get_metrics()
    b.close()
    return rec.report(m, ctl)


async def run_async(spec: dict[str, Any], cfg: CircuitBreakerConfig) -> dict[str, Any]:
    rec = Recorder(spec, cfg)
    b = AsyncCircuitBreaker(spec["name"], cfg, redis=aioredis.Redis.from_url(spec["url"]),
                            on_state_change=rec.hook)
    rec.breaker = b
    b.add_listener(rec.listen)
    await b.refresh()
    ctl = Control(spec, rec.live)
    ctl.poll_once()
    ctl.start()
    ctl.r.rpush(f"{spec['ns']}:ready", spec["id"])
    period = 1.0 / spec["rate"]
    spent = [0.0]

    async def backend() -> int:
        t0 = time.perf_counter()
        try:
            if ctl.failing:
                raise BackendDown
            return 1
        finally:
            spent[0] = time.perf_counter() - t0

    handled: str | None = None
    nxt = time.monotonic()
    while not ctl.stop:
        hold = ctl.hold
        if hold is not None and hold != handled:
            handled = hold
            rec.checkpoints += 1
            flushed = await b.flush(timeout=2.0)
            c = counters(await b.get_metrics(), rec, flushed)
            ctl.r.rpush(f"{spec['ns']}:ckpt:{hold}", json.dumps(c))
            while ctl.hold == hold and not ctl.stop:
                await asyncio.sleep(0.005)
            rec.end_ho_wait(time.time())
            nxt = time.monotonic()
            continue
        before = rec.note_state()
        spent[0] = 0.0
        exc: BaseException | None = None
        t0 = time.perf_counter()
        try:
            await b.call(backend)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            exc = e
        overhead = time.perf_counter() - t0 - spent[0]
        rec.outcome(before, "ok" if exc is None else classify(exc), exc, overhead)
        nxt += period
        delay = nxt - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.5:
            nxt = time.monotonic()
    await b.flush(timeout=3.0)
    m = await b.get_metrics()
    await b.close()
    return rec.report(m, ctl)


def main() -> int:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(created).3f %(levelname)s %(name)s: %(message)s")
    known = {f.name for f in dataclasses.fields(CircuitBreakerConfig)}
    cfg = CircuitBreakerConfig(**{k: v for k, v in spec["config"].items() if k in known})
    report = asyncio.run(run_async(spec, cfg)) if spec["kind"] == "async" else run_sync(
        spec, cfg)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
