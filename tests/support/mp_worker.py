"""One worker process of the multi-process tests (tests/test_multiprocess.py).

Run as ``python tests/support/mp_worker.py '<json spec>'``. The spec says which Redis to use, the
breaker name and config, the scenario (``mode``) and its parameters. The worker:

1. connects, builds its breaker (unless the mode builds it after the barrier), and
   RPUSHes its id on ``<ns>:ready``;
2. waits on the barrier: BLPOP ``<ns>:go`` (the parent LPUSHes one item per worker);
3. runs its scenario, counting every backend execution with INCR ``<ns>:exec``;
4. prints JSON lines on stdout: one ``{"kind": "event", ...}`` per on_state_change call it
   received (as they happen) and one final ``{"kind": "result", ...}``.

Times that are compared across processes are Redis server times (TIME, in ms), never a
worker's wall clock. ``MP_CLOCK_SKEW_S`` (seconds) shifts this process's ``time.time`` and
``time.time_ns`` before anything else is imported, to play a host with a wrong clock.
Every worker kills itself (SIGALRM) after ``timeout`` seconds so that nothing hangs.
"""

from __future__ import annotations

import os
import time

_SKEW_S = float(os.environ.get("MP_CLOCK_SKEW_S") or 0.0)
_real_time = time.time
_real_time_ns = time.time_ns
if _SKEW_S:
    _skew_ns = round(_SKEW_S * 1e9)

    def _skewed_time() -> float:
        return _real_time() + _SKEW_S

    def _skewed_time_ns() -> int:
        return _real_time_ns() + _skew_ns

    time.time = _skewed_time
    time.time_ns = _skewed_time_ns

import contextlib  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Any, ClassVar  # noqa: E402

import redis  # noqa: E402
from redis.connection import Connection, ConnectionPool  # noqa: E402

from distbreaker import (  # noqa: E402
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitOpenError,
    CircuitState,
)

_out_lock = threading.Lock()


def emit(**obj: Any) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


class Boom(Exception):
    """The backend failure."""


class CountingConnection(Connection):
    """A connection that counts every command this process sends over it."""

    lock = threading.Lock()
    sent = 0  # send_packed_command calls (one per command outside pipelines)
    names: ClassVar[list[str]] = []  # "<thread name> <COMMAND>" per send_command

    _via = threading.local()  # set while send_command packs and sends

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        cmd = str(args[0]).upper() if args else "?"
        with CountingConnection.lock:
            CountingConnection.names.append(f"{threading.current_thread().name} {cmd}")
        self._via.on = True
        try:
            super().send_command(*args, **kwargs)
        finally:
            self._via.on = False

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        with CountingConnection.lock:
            CountingConnection.sent += 1
            if not getattr(self._via, "on", False):  # packed by the caller (distbreaker)
                first = b"".join(command) if isinstance(command, list) else bytes(command)
                name = first.split(b"\r\n")[2].decode().upper()
                CountingConnection.names.append(f"{threading.current_thread().name} {name}")
        super().send_packed_command(command, check_health)

    @classmethod
    def mark(cls) -> tuple[int, int]:
        with cls.lock:
            return cls.sent, len(cls.names)

    @classmethod
    def since(cls, mark: tuple[int, int]) -> tuple[int, list[str]]:
        with cls.lock:
            return cls.sent - mark[0], cls.names[mark[1]:]


def command_calls(r: redis.Redis) -> dict[str, int]:
    """Server-wide INFO commandstats: calls per command."""
    return {k: int(v["calls"]) for k, v in r.info("commandstats").items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    keys = set(before) | set(after)
    d = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    return {k: v for k, v in d.items() if v}


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.wid: int = spec["wid"]
        self.ns: str = spec["ns"]
        self.p: dict[str, Any] = spec.get("params", {})
        # `r` is this worker's own connection for barrier, counters and TIME; the breaker
        # gets its own client so its commands can be counted separately.
        self.r = redis.Redis(port=spec["port"])
        self.cfg = CircuitBreakerConfig(**spec["config"])
        self.events: list[dict[str, Any]] = []
        self.breaker: CircuitBreaker | None = None
        self.available_at_ready: bool | None = None
        self.counted = spec.get("counting_client", False)

    # -- helpers --------------------------------------------------------------------------

    def server_ms(self) -> int:
        s, us = self.r.time()
        return int(s) * 1000 + int(us) // 1000

    def on_change(self, name: str, old: CircuitState, new: CircuitState) -> None:
        ev = {"old": str(old), "new": str(new), "name": name}
        self.events.append(ev)
        emit(kind="event", wid=self.wid, **ev)

    def build(self) -> CircuitBreaker:
        if self.counted:
            pool = ConnectionPool(port=self.spec["port"], connection_class=CountingConnection)
            client = redis.Redis(connection_pool=pool)
        else:
            client = redis.Redis(port=self.spec["port"])
        self.breaker = CircuitBreaker(
            self.spec["name"], self.cfg, redis=client, on_state_change=self.on_change
        )
        return self.breaker

    def key(self, suffix: str) -> str:
        return f"{self.ns}:{suffix}"

    def barrier(self, which: str | None = None) -> None:
        which = which or self.spec.get("go", "go")
        got = self.r.blpop([self.key(which)], timeout=self.spec.get("barrier_timeout", 30))
        if got is None:
            raise SystemExit(f"worker {self.wid}: barrier {which!r} timed out")

    def exec_incr(self) -> None:
        self.r.incr(self.key("exec"))

    def result(self, **kw: Any) -> None:
        emit(kind="result", wid=self.wid, events=self.events, **kw)

    # -- scenarios --------------------------------------------------------------------------

    def run(self) -> None:
        mode = self.spec["mode"]
        build_after_barrier = self.p.get("build_after_barrier", False)
        if not build_after_barrier:
            self.build()
        self.available_at_ready = None if self.breaker is None else self.breaker.is_available()
        self.r.rpush(self.key("ready"), self.wid)
        self.barrier()
        if build_after_barrier:
            self.build()
        getattr(self, f"mode_{mode}")()

    def mode_hammer(self) -> None:
        """Call in a loop for `duration` s; the backend always fails or always succeeds.
        With `rate_hz`, calls are paced to about that rate."""
        b = self.breaker
        assert b is not None
        fail = self.p["outcome"] == "fail"
        period = 1.0 / self.p["rate_hz"] if self.p.get("rate_hz") else 0.0
        executed = rejected = failed = succeeded = 0

        def backend() -> str:
            nonlocal executed
            executed += 1
            self.exec_incr()
            if fail:
                raise Boom("backend down")
            return "ok"

        start = time.monotonic()
        end = start + self.p["duration"]
        nxt = start
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if period:
                nxt += period
                if nxt > now:
                    time.sleep(nxt - now)
            try:
                b.call(backend)
                succeeded += 1
            except Boom:
                failed += 1
            except CircuitOpenError:
                rejected += 1
                if not period:
                    time.sleep(0.001)
        flushed = b.flush(10)  # batched mode: everything applied before reporting
        m = b.get_metrics()
        self.result(executed=executed, rejected=rejected, failed=failed, succeeded=succeeded,
                    state=str(b.get_state()), flushed=flushed, batches=m.batches,
                    lost=m.lost_outcomes)

    def mode_probe_once(self) -> None:
        """Try to get through for `attempt_window` s; if admitted, hold the permit until
        the parent pushes `<ns>:release`."""
        b = self.breaker
        assert b is not None
        admitted = None
        attempts = rejected = 0
        end = time.monotonic() + self.p["attempt_window"]
        while time.monotonic() < end:
            attempts += 1
            try:
                with b.protect() as permit:
                    admitted = {"is_probe": permit.is_probe, "at_ms": self.server_ms()}
                    self.exec_incr()
                    self.r.rpush(self.key("probing"), self.wid)
                    if self.r.blpop([self.key("release")], timeout=30) is None:
                        raise SystemExit("release timed out")
                break
            except CircuitOpenError:
                rejected += 1
                time.sleep(0.002)
        if admitted is None:
            self.r.rpush(self.key("attempts_done"), self.wid)
        self.result(admitted=admitted, attempts=attempts, rejected=rejected,
                    state=str(b.get_state()))

    def mode_hang_probe(self) -> None:
        """Get the probe, announce it on `<ns>:inprobe`, then hang inside it (to be killed)."""
        b = self.breaker
        assert b is not None
        end = time.monotonic() + self.p["deadline"]
        while time.monotonic() < end:
            try:
                with b.protect() as permit:
                    self.exec_incr()
                    self.r.rpush(self.key("inprobe"), json.dumps(
                        {"wid": self.wid, "is_probe": permit.is_probe, "at_ms": self.server_ms()}))
                    time.sleep(120)
            except CircuitOpenError:
                time.sleep(0.005)
        self.result(admitted=None)

    def mode_probe_after(self) -> None:
        """Call until admitted once (or `deadline` s); the admitted call records Redis TIME
        on `<ns>:probe_times`."""
        b = self.breaker
        assert b is not None
        admitted = None
        rejected = 0
        first_reject_ms = None
        end = time.monotonic() + self.p["deadline"]
        while time.monotonic() < end:
            try:
                with b.protect() as permit:
                    t = self.server_ms()
                    self.exec_incr()
                    self.r.rpush(self.key("probe_times"), t)
                    admitted = {"is_probe": permit.is_probe, "at_ms": t}
                break
            except CircuitOpenError:
                rejected += 1
                if first_reject_ms is None:
                    first_reject_ms = self.server_ms()
                time.sleep(0.002)
        self.result(admitted=admitted, rejected=rejected, first_reject_ms=first_reject_ms)

    def mode_trip(self) -> None:
        """Open the breaker: one failing call (`how` = "trip") or force_open()."""
        b = self.breaker
        assert b is not None
        before = self.server_ms()
        if self.p["how"] == "force_open":
            b.force_open()
        else:
            def backend() -> None:
                self.exec_incr()
                raise Boom("backend down")
            with contextlib.suppress(Boom):
                b.call(backend)
        after = self.server_ms()
        self.result(before_ms=before, after_ms=after, available=b.is_available(),
                    state=str(b.get_state()))

    def mode_poll(self) -> None:
        """Poll is_available() (never a call) until it turns False; optionally then wait for
        `<ns>:measure` and make 10,000 calls that must all be rejected locally."""
        b = self.breaker
        assert b is not None
        initially = self.available_at_ready
        t0 = time.monotonic()
        end = t0 + self.p["deadline"]
        seen_ms = None
        polls = 0
        while time.monotonic() < end:
            polls += 1
            if not b.is_available():
                seen_ms = self.server_ms()
                break
            time.sleep(0.001)
        res: dict[str, Any] = dict(initially_available=initially, seen_ms=seen_ms, polls=polls,
                                   local_wait_s=time.monotonic() - t0, state=str(b.get_state()))
        if seen_ms is not None and self.p.get("measure"):
            emit(kind="seen", wid=self.wid)
            self.barrier("measure")
            res["measure"] = self.measure_rejections(self.p["measure"])
        self.result(**res)

    def measure_rejections(self, n: int) -> dict[str, Any]:
        b = self.breaker
        assert b is not None
        executed = 0

        def backend() -> None:
            nonlocal executed
            executed += 1

        before = command_calls(self.r)
        mark = CountingConnection.mark()
        rejected = 0
        for _ in range(n):
            try:
                b.call(backend)
            except CircuitOpenError:
                rejected += 1
        sent, names = CountingConnection.since(mark)
        after = command_calls(self.r)
        return {"rejected": rejected, "executed": executed, "client_sent": sent,
                "client_names": names[:20], "server_delta": delta(before, after)}

    def mode_cost(self) -> None:
        """Successful calls in strict mode: commands sent per call, counted by this client and
        by the server."""
        b = self.breaker
        assert b is not None
        # Let the listener finish its first (on-subscribe) refresh so that it cannot land
        # inside the measured window; with max_staleness=60 it sends nothing afterwards.
        end = time.monotonic() + 10
        listener_refreshed = False
        while time.monotonic() < end and not listener_refreshed:
            with CountingConnection.lock:
                listener_refreshed = any(
                    n.startswith("distbreaker-listener") and n.endswith(" FCALL")
                    for n in CountingConnection.names)
            time.sleep(0.01)
        time.sleep(0.2)
        executed = 0

        def backend() -> int:
            nonlocal executed
            executed += 1
            return executed

        for _ in range(self.p["warmup"]):  # loads the scripts (NOSCRIPT path) first
            b.call(backend)
        n = self.p["calls"]
        before = command_calls(self.r)
        mark = CountingConnection.mark()
        for _ in range(n):
            b.call(backend)
        sent, names = CountingConnection.since(mark)
        after = command_calls(self.r)
        self.result(calls=n, executed=executed, client_sent=sent,
                    client_names=sorted(set(names)), client_name_count=len(names),
                    listener_commands=[n for n in CountingConnection.names
                                       if n.startswith("distbreaker-listener")],
                    server_delta=delta(before, after), listener_refreshed=listener_refreshed,
                    state=str(b.get_state()))

    def mode_skew(self) -> None:
        """Call until admitted (or `deadline` s) on a host whose wall clock is off; report
        Redis times of the first rejection and of the admitted call."""
        b = self.breaker
        assert b is not None
        skew_seen = time.time() - _real_time()
        skew_ns_seen = (time.time_ns() - _real_time_ns()) / 1e9
        first_reject_ms = last_reject_ms = None
        rejected = 0
        admitted = None
        end = time.monotonic() + self.p["deadline"]
        while time.monotonic() < end:
            try:
                with b.protect() as permit:
                    t = self.server_ms()
                    self.exec_incr()
                    with CountingConnection.lock:
                        scripts = [n for n in CountingConnection.names
                                   if n in ("MainThread FCALL", "MainThread EVALSHA")]
                    admitted = {"is_probe": permit.is_probe, "at_ms": t,
                                "main_thread_scripts": len(scripts)}
                break
            except CircuitOpenError:
                rejected += 1
                now_ms = self.server_ms()
                if first_reject_ms is None:
                    first_reject_ms = now_ms
                last_reject_ms = now_ms
                time.sleep(0.002)
        self.result(skew_seen=skew_seen, skew_ns_seen=skew_ns_seen, rejected=rejected,
                    first_reject_ms=first_reject_ms, last_reject_ms=last_reject_ms,
                    admitted=admitted, state=str(b.get_state()))


def main() -> None:
    spec = json.loads(sys.argv[1])
    signal.alarm(int(spec.get("timeout", 60)))  # default action of SIGALRM: terminate
    Worker(spec).run()


if __name__ == "__main__":
    main()
