"""The shared breaker under load and under small Redis faults, with real worker processes.

Every test starts its own private redis-servers on free ports: the breaker's Redis, which
the test disturbs (CLIENT PAUSE, CLIENT KILL, FLUSHALL, garbage, SIGSTOP), and a control
Redis for start barriers and switches, which nothing disturbs. Workers are fresh
processes (tests/support/load_worker.py) that print their result as one JSON line on stdout.
Times compared across processes are `time.monotonic()` (one clock for the machine).

A failover is Redis being given up for the local fallback. It is counted three ways in
every worker (see load_worker.py): the `store_failovers` metric,
StoreEvent(degraded=True) heard by a listener, and "distbreaker.store_down" warnings.

Durations: DISTBREAKER_LOAD_S sets both load phases (default 8 s, so that the file runs
in about a minute on a 2-CPU machine); DISTBREAKER_LOAD_PAUSE_S and DISTBREAKER_LOAD_HOG_S
set one each. The acceptance runs use 20 s (pauses) and 30 s (CPU hogs).

The outage checks of the first fault work (Redis SIGKILLed, or paused with CLIENT PAUSE,
for 2-3 s under load) are tests/test_faults.py::test_workers_ride_out_a_redis_outage; the
SIGSTOP variant below runs its worker (tests/support/fault_worker.py) with the same checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import redis

from distbreaker import CircuitBreaker, CircuitBreakerConfig
from distbreaker._keys import BreakerKeys, channel_for
from distbreaker._protocol import decode_push
from distbreaker.events import TransitionEvent

from redis_server import RedisServer

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).parent / "support" / "load_worker.py"
FAULT_WORKER = Path(__file__).parent / "support" / "fault_worker.py"
CHANNEL = channel_for("distbreaker")


def _seconds(var: str, default: float) -> float:
    raw = os.environ.get(var)
    return float(raw) if raw else default


LOAD_S = _seconds("DISTBREAKER_LOAD_S", 8.0)
PAUSE_S = _seconds("DISTBREAKER_LOAD_PAUSE_S", LOAD_S)
HOG_S = _seconds("DISTBREAKER_LOAD_HOG_S", LOAD_S)

# A big time window (nothing slides out during a run) and thresholds the always
# succeeding backend never reaches; everything else is the default config.
STEADY_CFG: dict[str, Any] = dict(window_size=3600.0, failure_threshold=1_000_000,
                                  minimum_calls=1_000_000)
OVERHEAD_LIMIT_S = CircuitBreakerConfig().redis_timeout + 0.1


def sleep_until(t: float) -> None:
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class Proc:
    """A worker process; its stdout and stderr go to files (a full pipe would stall it)."""

    def __init__(self, argv: list[str], wid: int) -> None:
        self.wid = wid
        self._out: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.popen = subprocess.Popen(argv, stdout=self._out, stderr=self._err)

    def _read(self, f: IO[bytes]) -> str:
        f.seek(0)
        return f.read().decode(errors="replace")

    def stderr(self) -> str:
        return self._read(self._err)

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.wid} still running after {timeout} s\n"
                                 f"{self.stderr()[-3000:]}") from None
        lines = [ln for ln in self._read(self._out).splitlines() if ln.strip()]
        assert rc == 0 and lines, f"worker {self.wid} exited {rc}\n{self.stderr()[-3000:]}"
        out: dict[str, Any] = json.loads(lines[-1])
        return out

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        self._out.close()
        self._err.close()


class Fleet:
    """The breaker's Redis (`data`), the control Redis, and every process a test starts;
    `close()` stops exactly those."""

    def __init__(self, tag: str) -> None:
        self.data = RedisServer().start()
        try:
            self.control = RedisServer().start()
        except BaseException:
            self.data.stop()
            raise
        self.name = f"load-{tag}-{uuid.uuid4().hex[:6]}"
        self.ns = f"ctl:{self.name}"
        self.ctl = self.control.client(socket_timeout=30)
        self.procs: list[Proc] = []
        self.others: list[subprocess.Popen[bytes]] = []

    def spawn(self, mode: str, config: dict[str, Any], timeout: float = 120,
              **params: Any) -> Proc:
        wid = len(self.procs)
        spec = {"mode": mode, "wid": wid, "url": self.data.url,
                "control_url": self.control.url, "name": self.name, "ns": self.ns,
                "config": config, "params": params, "timeout": timeout}
        p = Proc([sys.executable, str(WORKER), json.dumps(spec)], wid)
        self.procs.append(p)
        return p

    def spawn_fault_worker(self, spec: dict[str, Any]) -> Proc:
        p = Proc([sys.executable, str(FAULT_WORKER), json.dumps(spec)], len(self.procs))
        self.procs.append(p)
        return p

    def wait_ready(self, n: int | None = None, timeout: float = 60) -> None:
        n = len(self.procs) if n is None else n
        end = time.monotonic() + timeout
        while self.ctl.llen(f"{self.ns}:ready") < n:
            for p in self.procs:
                assert p.popen.poll() is None, f"worker {p.wid} died\n{p.stderr()[-3000:]}"
            assert time.monotonic() < end, "workers did not start"
            time.sleep(0.02)

    def wait_subscribed(self, n: int, timeout: float = 30) -> None:
        """Until `n` listeners are subscribed to the breakers' channel on the data Redis."""
        r = self.data.client()
        try:
            wait_until(lambda: int(r.pubsub_numsub(CHANNEL)[0][1]) >= n, timeout,
                       f"{n} listeners on {CHANNEL}")
        finally:
            r.close()

    def go(self, n: int | None = None, lead: float = 0.3) -> float:
        """Release the workers; returns the common start time (monotonic)."""
        n = len(self.procs) if n is None else n
        start = time.monotonic() + lead
        self.ctl.lpush(f"{self.ns}:go", *[repr(start)] * n)
        return start

    def results(self, timeout: float, procs: list[Proc] | None = None) -> list[dict[str, Any]]:
        end = time.monotonic() + timeout
        return [p.result(max(1.0, end - time.monotonic())) for p in (procs or self.procs)]

    def hog(self, n: int, seconds: float) -> None:
        """`n` busy-looping processes (each ends itself after `seconds` at the latest)."""
        code = f"import signal\nsignal.alarm({int(seconds) + 1})\nwhile True:\n    pass\n"
        for _ in range(n):
            self.others.append(subprocess.Popen([sys.executable, "-c", code]))

    def stop_others(self) -> None:
        for p in self.others:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        self.others.clear()

    def close(self) -> None:
        for p in self.procs:
            p.stop()
        self.stop_others()
        proc = self.data.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a SIGSTOPped server cannot be terminated
        self.ctl.close()
        self.data.stop()
        self.control.stop()


@pytest.fixture
def fleet(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    f = Fleet(request.node.name.split("[")[0].removeprefix("test_")[:24])
    try:
        yield f
    finally:
        f.close()


def failovers(r: dict[str, Any]) -> dict[str, Any]:
    """A worker's three failover counts."""
    return {k: r.get(k) for k in ("store_failovers", "store_down_events", "store_down_logs")}


def no_failovers(r: dict[str, Any]) -> bool:
    return all(v == 0 for v in failovers(r).values())


def fleet_calls(fleet: Fleet, cfg: dict[str, Any]) -> int:
    """The shared window's call count, read through a breaker like the workers' own."""
    b = CircuitBreaker(fleet.name, CircuitBreakerConfig(**cfg),
                       redis=fleet.data.client(socket_timeout=10))
    try:
        fw = b.get_metrics().fleet
        assert fw is not None and not b.store_degraded
        return fw.calls
    finally:
        b.close()


# -- 1, 2: no failover from a short pause or a busy machine ----------------------------------


def _steady_fleet(fleet: Fleet, duration: float) -> None:
    for _ in range(8):
        fleet.spawn("steady", STEADY_CFG, timeout=duration + 90, threads=2, rate=100,
                    duration=duration, overhead_limit=OVERHEAD_LIMIT_S)
    fleet.wait_ready()
    fleet.wait_subscribed(8)


def _shared(fleet: Fleet, results: list[dict[str, Any]]) -> tuple[int, int, float]:
    for r in results:
        assert r["metrics_error"] is None, r
    # total_calls counts outcomes only (rejections are rejected_calls); ignored outcomes
    # never reach a window
    recorded = sum(r["total_calls"] - r["ignored_calls"] for r in results)
    shared = fleet_calls(fleet, STEADY_CFG)
    return recorded, shared, shared / recorded if recorded else 0.0


def _summary(results: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"  worker {i}: {r['ok']} ok, {r['rejected']} rejected, {r['exceptions']} exceptions "
        f"{r['exception_types']}, failovers {failovers(r)}, unshared "
        f"{r.get('unshared_outcomes')}, lost {r.get('lost_outcomes')}, max overhead "
        f"{r['max_overhead_s'] * 1000:.1f} ms at {r['worst_at']} s, {r['over_limit']} calls "
        f"over {OVERHEAD_LIMIT_S * 1000:.0f} ms, {r['over_50ms']} over 50 ms"
        for i, r in enumerate(results))


@pytest.mark.timeout(int(PAUSE_S) + 120)
def test_pause_120ms_every_second_no_failover(fleet: Fleet) -> None:
    """8 processes x 2 threads at 100 calls/s each, strict; CLIENT PAUSE 120 ALL once a
    second. A pause shorter than what the library tolerates is not an outage: no process
    fails over, every outcome reaches the shared window exactly once, and no call waits
    more than redis_timeout + 0.1 s beyond its backend."""
    duration = PAUSE_S
    _steady_fleet(fleet, duration)
    start = fleet.go()
    pauser = fleet.data.client(socket_timeout=5)
    pauses = []
    t = start + 0.5
    while t + 0.12 < start + duration - 0.3:
        sleep_until(t)
        pauser.execute_command("CLIENT", "PAUSE", 120, "ALL")
        pauses.append(round(time.monotonic() - start, 3))
        t += 1.0
    pauser.close()
    results = fleet.results(duration + 60)
    recorded, shared, ratio = _shared(fleet, results)

    print(f"\n{len(pauses)} pauses of 120 ms at {pauses} s; {recorded} outcomes recorded, "
          f"{shared} in the shared window ({ratio:.4%})\n{_summary(results)}")
    assert len(pauses) >= duration - 2, pauses
    for i, r in enumerate(results):
        assert no_failovers(r), f"worker {i} failed over: {failovers(r)}\n{_summary(results)}"
    for i, r in enumerate(results):
        assert r["exceptions"] == 0, (i, r["exception_types"])
    assert ratio <= 1.0, f"{shared} shared > {recorded} recorded: outcomes counted twice"
    assert ratio >= 0.999, f"only {ratio:.4%} of the outcomes reached the shared window"
    for i, r in enumerate(results):
        assert r["max_overhead_s"] <= OVERHEAD_LIMIT_S, (
            f"worker {i}: a call waited {r['max_overhead_s'] * 1000:.1f} ms beyond its "
            f"backend (at {r['worst_at']} s; worst {r['worst']})")


@pytest.mark.timeout(int(HOG_S) + 150)
def test_cpu_hogs_no_failover(fleet: Fleet) -> None:
    """The same fleet beside 6 busy-looping processes, Redis healthy: a slow machine is
    not a Redis outage."""
    duration = HOG_S
    _steady_fleet(fleet, duration)
    fleet.hog(6, duration + 5)
    start = fleet.go(lead=0.5)
    sleep_until(start + duration)
    results = fleet.results(duration + 90)
    fleet.stop_others()
    recorded, shared, ratio = _shared(fleet, results)

    print(f"\n6 CPU hogs; {recorded} outcomes recorded, {shared} in the shared window "
          f"({ratio:.4%})\n{_summary(results)}")
    for i, r in enumerate(results):
        assert no_failovers(r), f"worker {i} failed over: {failovers(r)}\n{_summary(results)}"
    for i, r in enumerate(results):
        assert r["exceptions"] == 0, (i, r["exception_types"])
    assert ratio >= 0.999, f"only {ratio:.4%} of the outcomes reached the shared window"


# -- 3: every transition heard once by every process -----------------------------------------


class Subscriber:
    """Every transition message Redis publishes for one breaker (its own connection)."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self.name = name
        self.ps = client.pubsub()
        self.ps.subscribe(CHANNEL)
        wait_until(lambda: (m := self.ps.get_message(timeout=0.5)) is not None
                   and m["type"] == "subscribe", 5, "the subscription")
        self.lock = threading.Lock()
        self.all: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="subscriber", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            msg = self.ps.get_message(timeout=0.2)
            if msg is None or msg["type"] != "message":
                continue
            p = decode_push(msg["data"])
            if p is None or p.name != self.name:
                continue
            with self.lock:
                self.all.append({"ev": p.event, "from": p.from_state.value,
                                 "to": p.to_state.value, "gen": p.generation,
                                 "now": p.now_ms, "forced": p.forced or "-"})

    def transitions(self) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.all if m["from"] != m["to"]]

    def count(self) -> int:
        return len(self.transitions())

    def more_than(self, n: int) -> Callable[[], bool]:
        return lambda: self.count() > n

    def last_to(self) -> str | None:
        t = self.transitions()
        return t[-1]["to"] if t else None

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.ps.close()


@pytest.mark.timeout(120)
def test_every_process_hears_every_transition_once(fleet: Fleet) -> None:
    """4 processes call all the time; the test makes 60 transitions (trips, probes that
    close, force_open / release from a controller breaker) with a FLUSHALL halfway. Every
    process's listener hears each published transition exactly once, and on_state_change
    fires exactly once per transition fleet-wide."""
    cfg: dict[str, Any] = dict(failure_threshold=2, recovery_timeout=0.3, success_threshold=1,
                               half_open_max_calls=1, minimum_calls=1_000_000,
                               backoff_multiplier=1.0, backoff_jitter=0.0,
                               max_recovery_timeout=1.0)
    workers = [fleet.spawn("flip", cfg, interval=0.003) for _ in range(4)]
    fleet.wait_ready()
    data = fleet.data.client(socket_timeout=10)
    sub = Subscriber(data, fleet.name)
    flushed_at: int | None = None  # transitions published before the FLUSHALL
    flushed_t = float("inf")  # when (monotonic)
    heard: list[tuple[tuple[int, str, str], bool]] = []  # (gen, old, new), before the flush
    hooks: list[tuple[str, str]] = []

    def on_event(e: Any) -> None:
        if isinstance(e, TransitionEvent):
            heard.append(((e.generation, str(e.old_state), str(e.new_state)),
                          flushed_at is None))

    ctl_b = CircuitBreaker(fleet.name, CircuitBreakerConfig(**cfg), redis=data,
                           on_state_change=lambda _n, o, n: hooks.append((str(o), str(n))))
    ctl_b.add_listener(on_event)
    fail_key = f"{fleet.ns}:fail"
    try:
        fleet.wait_subscribed(4 + 2)
        start = fleet.go()
        sleep_until(start + 0.5)
        while sub.count() < 60:
            n0 = sub.count()
            # a trip by the workers' failures, then a probe that closes it
            fleet.ctl.set(fail_key, 1)
            wait_until(sub.more_than(n0), 5, "the workers' trip")
            fleet.ctl.delete(fail_key)
            wait_until(lambda: sub.last_to() == "closed", 10, "the probe closing it")
            time.sleep(0.1)
            # an operator's override from the controller breaker
            n1 = sub.count()
            ctl_b.force_open()
            wait_until(sub.more_than(n1), 5, "force_open's push")
            time.sleep(0.1)
            ctl_b.release()
            wait_until(lambda: sub.last_to() == "closed", 5, "release's push")
            time.sleep(0.1)
            if flushed_at is None and sub.count() >= 30:
                flushed_at = sub.count()
                flushed_t = time.monotonic()
                data.flushall()  # Redis lost its data: generations start over
                time.sleep(0.5)
        time.sleep(1.0)  # late pushes land
        fleet.ctl.set(f"{fleet.ns}:stop", 1)
        results = fleet.results(30, workers)
    finally:
        fleet.ctl.delete(fail_key)
        ctl_b.close()
        sub.close()
        data.close()

    published = [(t["gen"], t["from"], t["to"]) for t in sub.transitions()]
    want = Counter(published)
    print(f"\n{len(published)} transitions published (FLUSHALL after {flushed_at}); "
          f"generations {[g for g, _, _ in published]}")
    assert flushed_at is not None and len(published) > flushed_at, (flushed_at, published)
    problems = []
    before = Counter(published[:flushed_at])
    views = [(f"worker {i}", [((h["gen"], h["old"], h["new"]), h["at"] < flushed_t)
                              for h in r["heard"]]) for i, r in enumerate(results)]
    views.append(("controller", heard))
    for who, seen in views:
        got = Counter(t for t, _ in seen)
        missing, extra = want - got, got - want
        if missing or extra:
            got_before = Counter(t for t, pre in seen if pre)
            problems.append(
                f"{who} heard {len(seen)} of {len(published)} (before the FLUSHALL: "
                f"{sum((before - got_before).values())} missing, "
                f"{sum((got_before - before).values())} extra; after it: "
                f"{sum((want - before - (got - got_before)).values())} missing): missing "
                f"{sorted(missing.elements())[:12]}, extra {sorted(extra.elements())[:12]}")
    for i, line in enumerate(results):
        if line["exceptions"] or not no_failovers(line):
            problems.append(f"worker {i}: exceptions {line['exception_types']}, "
                            f"failovers {failovers(line)}")
    fired = Counter(tuple(h) for r in results for h in r["hooks"]) + Counter(hooks)
    want_pairs = Counter((f, t) for _, f, t in published)
    print(f"on_state_change fired {sum(fired.values())} times: {dict(fired)}; "
          f"published {dict(want_pairs)}")
    if fired != want_pairs:
        problems.append(f"on_state_change fired {dict(fired)}, published {dict(want_pairs)}"
                        f" (per worker {[len(r['hooks']) for r in results]}, controller "
                        f"{len(hooks)})")
    assert not problems, "\n".join(problems)


# -- 4: concurrent failures never leave the snapshot behind ----------------------------------


@pytest.mark.timeout(120)
def test_concurrent_trips_never_leave_snapshot_behind(fleet: Fleet) -> None:
    """40 runs, a fresh breaker each: 10 threads of one process are admitted together and
    fail together (threshold 5). Right after the last call returns, the process's state
    is not behind Redis. redis_timeout is long here so that no call meets the fallback:
    this is about the order in which replies are applied."""
    cfg: dict[str, Any] = dict(failure_threshold=5, minimum_calls=1_000_000,
                               recovery_timeout=60.0, redis_timeout=1.0)
    w = fleet.spawn("trips", cfg, runs=40, threads=10)
    fleet.wait_ready()
    fleet.go()
    r = fleet.results(90, [w])[0]
    runs = r["runs"]
    behind = [x for x in runs if x["behind"]]
    print(f"\n{len(behind)} of {len(runs)} runs left the snapshot behind Redis: {behind[:5]}")
    assert r["exceptions"] == {}, r["exceptions"]
    assert no_failovers(r), failovers(r)
    assert len(runs) == 40
    for x in runs:  # the scenario happened: 10 admitted, 10 failed, Redis tripped
        assert x["outcomes"] == ["failed"] * 10 and x["redis"] == "open", x
    assert not behind, f"{len(behind)} of 40 runs behind Redis: {behind[:5]}"


# -- 5: killing the pub/sub connection is not an outage --------------------------------------


@pytest.mark.timeout(90)
def test_pubsub_kills_do_not_fail_over(fleet: Fleet) -> None:
    """A worker calls steadily while its listener's connection is killed 5 times, a
    second apart (CLIENT KILL TYPE pubsub). That is no Redis outage: no failover. And the
    listener is back: a force_open from another client reaches the worker, which only
    polls is_available() by then, within 1 s (max_staleness is long, so only the push can
    tell it in time)."""
    cfg: dict[str, Any] = dict(max_staleness=30.0)
    w = fleet.spawn("kills", cfg, rate=100, quiet_at=5.8, deadline=9.0)
    fleet.wait_ready()
    fleet.wait_subscribed(1)
    start = fleet.go()
    killer = fleet.data.client(socket_timeout=5)
    killed = []
    for k in range(5):
        sleep_until(start + 1.0 + k)
        killed.append(int(killer.execute_command("CLIENT", "KILL", "TYPE", "pubsub")))
    killer.close()
    sleep_until(start + 6.5)
    ctl_b = CircuitBreaker(fleet.name, CircuitBreakerConfig(**cfg),
                           redis=fleet.data.client(socket_timeout=10))
    t_force = time.monotonic()
    ctl_b.force_open()
    ctl_b.close()
    r = fleet.results(30, [w])[0]

    seen = None if r["unavailable_at"] is None else r["unavailable_at"] - t_force
    print(f"\nkilled {killed} pub/sub connections; {r['calls']} calls; failovers "
          f"{failovers(r)}; force_open seen after {seen} s")
    assert r["exceptions"] == 0, r["exception_types"]
    assert no_failovers(r), f"the worker failed over: {failovers(r)}"
    assert all(k >= 1 for k in killed), f"the listener was not connected at a kill: {killed}"
    assert r["available_at_quiet"] is True, r
    assert seen is not None and seen <= 1.0, f"force_open seen after {seen} s: {r}"


# -- 6: a garbage lease far in the future does not wedge HALF_OPEN ---------------------------


@pytest.mark.timeout(90)
def test_garbage_far_future_lease_does_not_wedge_half_open(fleet: Fleet) -> None:
    """Trip, go HALF_OPEN, then a garbage lease (score 99999999999999, year 5138) is
    written into the probes set, as a bug elsewhere or an operator might. A fresh process
    still gets a probe within a few seconds, and its success closes the breaker."""
    cfg: dict[str, Any] = dict(failure_threshold=1, recovery_timeout=0.3, success_threshold=1,
                               half_open_max_calls=1, minimum_calls=1_000_000,
                               probe_lease=1.0)
    keys = BreakerKeys.for_name(fleet.name)
    r = fleet.data.client(socket_timeout=10)
    b = CircuitBreaker(fleet.name, CircuitBreakerConfig(**cfg), redis=r)
    with pytest.raises(KeyError):
        b.call(lambda: {}[0])
    assert r.hget(keys.state, "state") == b"open"
    time.sleep(0.4)
    with b.protect() as permit:  # OPEN -> HALF_OPEN; the probe's lease goes straight back
        assert permit.is_probe
        permit.mark_ignored()
    assert r.hget(keys.state, "state") == b"half_open"
    assert r.zcard(keys.probes) == 0
    b.close()
    r.zadd(keys.probes, {"garbage": 99999999999999})
    assert r.zscore(keys.probes, "garbage") == 99999999999999

    w = fleet.spawn("probe", cfg, build_after_go=True, deadline=10.0, interval=0.02)
    fleet.wait_ready()
    fleet.go()
    x = fleet.results(40, [w])[0]
    state = r.hget(keys.state, "state")
    r.close()
    print(f"\nfresh process: admitted after {x['admitted_after']} s, {x['rejections']} "
          f"rejections (retry_after {x['retry_afters']}); Redis state {state!r}")
    assert x["exceptions"] == {}, x
    assert x["admitted_after"] is not None and x["admitted_after"] <= 3.0, x
    assert x["executed"] == 1 and x["state_after"] == "closed", x
    assert state == b"closed"


# -- 7: Redis SIGSTOPped under load (SIGKILL and CLIENT PAUSE: tests/test_faults.py) ----------


@pytest.mark.timeout(120)
def test_workers_ride_out_a_sigstopped_redis(fleet: Fleet) -> None:
    """The outage checks of tests/test_faults.py with the server stopped (SIGSTOP) for 2 s
    instead of killed or paused: 4 workers at 200 calls/s; no Redis exception reaches a
    caller, no call takes more than 100 ms beyond its backend, a backend that fails during
    the outage still trips, one warning when it starts and one when it ends, the workers
    adopt the shared (CLOSED) state within 2 s of Redis returning, and a later force_open
    reaches every worker within 2 s."""
    cfg: dict[str, Any] = dict(failure_threshold=5, recovery_timeout=1.0, minimum_calls=1000,
                               max_staleness=1.0)
    down, up, fail_window = 3.0, 5.0, [3.2, 4.8]
    spec = {"url": fleet.data.url, "control_url": fleet.control.url, "name": fleet.name,
            "ns": fleet.ns, "config": cfg, "rate": 200, "duration": 10.0,
            "fail_window": fail_window}
    for _ in range(4):
        fleet.spawn_fault_worker(spec)
    fleet.wait_ready()
    start = fleet.go()
    proc = fleet.data.proc
    assert proc is not None
    sleep_until(start + down)
    proc.send_signal(signal.SIGSTOP)
    try:
        sleep_until(start + up)
    finally:
        proc.send_signal(signal.SIGCONT)
    sleep_until(start + 7.5)
    t_force = time.monotonic() - start
    ctl_b = CircuitBreaker(fleet.name, CircuitBreakerConfig(**cfg),
                           redis=fleet.data.client(socket_timeout=10))
    ctl_b.force_open()
    ctl_b.close()
    outs = [(p.result(60), p.stderr()) for p in fleet.procs]

    for r, err in outs:
        assert r["unexpected_count"] == 0, r["unexpected"]
        assert r["max_overhead_s"] < 0.1, (r["max_overhead_s"], r["worst_at"])
        assert any(fail_window[0] <= t < up for t in r["rejected_at"]), r["rejected_at"]
        assert err.count("Redis unavailable") == 1, err
        assert err.count("Redis is back") == 1, err
        # back on the shared state (CLOSED: nothing tripped in Redis) within 2 s
        at_up = [a for t, a in r["avail"] if t < up]
        after_up = [t for t, a in r["avail"] if t >= up and a]
        back = up if at_up and at_up[-1] else (after_up[0] if after_up else None)
        assert back is not None and back <= up + 2.0, (back, r["avail"])
        before = [a for t, a in r["avail"] if t < t_force]
        assert before and before[-1] is True, r["avail"]
        after = [(t, a) for t, a in r["avail"] if t >= t_force]
        assert after and after[0][1] is False and after[0][0] <= t_force + 2.0, (t_force, after)
        assert after[-1][1] is False
        assert r["degraded_at_end"] is False
