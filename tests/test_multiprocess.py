"""Real multi-process tests: fresh worker processes (tests/support/mp_worker.py) share one breaker
through a real redis-server.

Workers start with `subprocess.Popen([sys.executable, "tests/support/mp_worker.py", spec])`, build
their breaker, RPUSH themselves on `<ns>:ready` and block on BLPOP `<ns>:go` until the test
LPUSHes one item per worker, so they all start at the same moment. Every backend execution
is an INCR on `<ns>:exec`, so counts are exact; times compared across processes are Redis
server times (TIME, lease scores, `opened_at_ms`), never a worker's wall clock. Every worker
has its own SIGALRM deadline, and every process a test starts is killed when it ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from distbreaker import CircuitBreaker, CircuitBreakerConfig

from redis_server import RedisServer

pytestmark = pytest.mark.multiprocess

WORKER = Path(__file__).parent / "support" / "mp_worker.py"
CHANNEL = "distbreaker:v1:events"

# Commands the Lua scripts issue themselves; INFO commandstats counts those too, so the
# "which commands did a client send" checks below look only at the others.
SCRIPT_INTERNAL = {
    f"cmdstat_{c}"
    for c in ("time", "hmget", "hget", "hset", "hdel", "del", "pexpire", "publish",
              "zremrangebyscore", "zcard", "zrange", "zadd", "zrem", "zcount")
}


def state_key(name: str) -> str:
    return f"distbreaker:v1:{{{name}}}"


def probes_key(name: str) -> str:
    return f"distbreaker:v1:{{{name}}}:probes"


def hgetall(r: redis.Redis, name: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(state_key(name)).items()}


def server_ms(r: redis.Redis) -> int:
    s, us = r.time()
    return int(s) * 1000 + int(us) // 1000


def unique(tag: str) -> str:
    return f"mp-{tag}-{uuid.uuid4().hex[:8]}"


class Boom(Exception):
    pass


def trip_from_here(r: redis.Redis, name: str, cfg: CircuitBreakerConfig) -> dict[str, str]:
    """Open the breaker from the test process (failure_threshold failing calls); return the
    state hash right after."""
    port = r.connection_pool.connection_kwargs["port"]

    def boom() -> None:
        raise Boom("down")

    with CircuitBreaker(name, cfg, redis=redis.Redis(port=port)) as b:
        for _ in range(cfg.failure_threshold):
            with pytest.raises(Boom):
                b.call(boom)
    h = hgetall(r, name)
    assert h["state"] == "open", h
    return h


def wait_until_server_ms(r: redis.Redis, target_ms: int, timeout: float = 30.0) -> int:
    end = time.monotonic() + timeout
    while True:
        now = server_ms(r)
        if now >= target_ms:
            return now
        assert time.monotonic() < end, "Redis clock did not reach the target"
        time.sleep(min(0.01, (target_ms - now) / 1000))


@dataclass(repr=False)
class Proc:
    wid: int
    popen: subprocess.Popen[bytes]
    stderr_path: str
    out: bytes = b""
    done: bool = False

    def __repr__(self) -> str:
        return f"<worker {self.wid} rc={self.popen.returncode}>"

    def stderr(self) -> str:
        try:
            return Path(self.stderr_path).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def lines(self) -> list[dict[str, Any]]:
        res = []
        # only complete lines: a running worker may be in the middle of one
        for line in self.out.decode(errors="replace").split("\n")[:-1]:
            line = line.strip()
            if line.startswith("{"):
                res.append(json.loads(line))
        return res

    def events(self) -> list[tuple[str, str]]:
        return [(x["old"], x["new"]) for x in self.lines() if x["kind"] == "event"]

    def result(self) -> dict[str, Any]:
        res = [x for x in self.lines() if x["kind"] == "result"]
        assert len(res) == 1, (
            f"worker {self.wid} rc={self.popen.returncode} gave no result\n"
            f"stdout: {self.out.decode(errors='replace')[-2000:]}\nstderr: {self.stderr()}"
        )
        return res[0]


@dataclass(repr=False)
class Fleet:
    """The worker processes of one test, on one Redis; `close()` kills whatever is left."""

    r: redis.Redis
    name: str
    ns: str
    procs: list[Proc] = field(default_factory=list)
    tmp: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="distbreaker-mp-"))

    def __repr__(self) -> str:
        return f"<Fleet {self.name} {self.procs}>"

    @property
    def port(self) -> int:
        return int(self.r.connection_pool.connection_kwargs["port"])

    def key(self, suffix: str) -> str:
        return f"{self.ns}:{suffix}"

    def spawn(self, mode: str, cfg: dict[str, Any], *, go: str = "go",
              counting_client: bool = False, env: dict[str, str] | None = None,
              timeout: int = 40, **params: Any) -> Proc:
        wid = len(self.procs)
        spec = {"port": self.port, "name": self.name, "ns": self.ns, "wid": wid, "mode": mode,
                "config": cfg, "params": params, "go": go, "timeout": timeout,
                "counting_client": counting_client, "barrier_timeout": 30}
        err = os.path.join(self.tmp, f"worker-{wid}.err")
        with open(err, "wb") as ef:
            popen = subprocess.Popen(
                [sys.executable, str(WORKER), json.dumps(spec)],
                stdout=subprocess.PIPE, stderr=ef, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )
        p = Proc(wid, popen, err)
        self.procs.append(p)
        return p

    def wait_ready(self, n: int | None = None, timeout: float = 30.0) -> None:
        n = len(self.procs) if n is None else n
        end = time.monotonic() + timeout
        while self.r.llen(self.key("ready")) < n:
            for p in self.procs:
                if p.popen.poll() is not None:
                    self.finish(p)
                    pytest.fail(f"worker {p.wid} exited early (rc={p.popen.returncode}):\n"
                                f"{p.stderr()}")
            assert time.monotonic() < end, "workers did not get ready in time"
            time.sleep(0.01)

    def release(self, n: int, which: str = "go") -> None:
        self.r.lpush(self.key(which), *["go"] * n)

    def finish(self, p: Proc, timeout: float = 30.0) -> Proc:
        if not p.done:
            try:
                out, _ = p.popen.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                out, _ = p.popen.communicate()
                p.out += out
                p.done = True
                pytest.fail(f"worker {p.wid} did not finish in {timeout}s:\n{p.stderr()}")
            p.out += out
            p.done = True
        return p

    def finish_all(self, procs: list[Proc] | None = None, timeout: float = 30.0) -> list[
            dict[str, Any]]:
        procs = self.procs if procs is None else procs
        for p in procs:
            self.finish(p, timeout)
        for p in procs:
            assert p.popen.returncode == 0, (
                f"worker {p.wid} rc={p.popen.returncode}\n{p.stderr()}")
        return [p.result() for p in procs]

    def all_events(self) -> Counter[tuple[str, str]]:
        c: Counter[tuple[str, str]] = Counter()
        for p in self.procs:
            c.update(p.events())
        return c

    def exec_count(self) -> int:
        return int(self.r.get(self.key("exec")) or 0)

    def close(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.kill()
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.popen.communicate(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def fleet(redis_client: redis.Redis, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    name = unique(request.node.name.split("[")[0].removeprefix("test_")[:30])
    f = Fleet(redis_client, name, f"test:{name}")
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def private_redis() -> Iterator[redis.Redis]:
    """A redis-server of its own, for tests that count every command the server receives."""
    server = RedisServer().start()
    c = server.client()
    try:
        yield c
    finally:
        c.close()
        server.stop()


@pytest.fixture
def private_fleet(private_redis: redis.Redis, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    name = unique(request.node.name.split("[")[0].removeprefix("test_")[:30])
    f = Fleet(private_redis, name, f"test:{name}")
    try:
        yield f
    finally:
        f.close()


# -- 1 ---------------------------------------------------------------------------------------


def test_consecutive_threshold_trips_once_fleet_wide(fleet: Fleet) -> None:
    cfg = dict(failure_threshold=20, minimum_calls=1_000_000, recovery_timeout=60.0)
    for _ in range(8):
        fleet.spawn("hammer", cfg, outcome="fail", duration=2.0)
    fleet.wait_ready()
    fleet.release(8)
    results = fleet.finish_all()

    events = fleet.all_events()
    executed = fleet.exec_count()
    h = hgetall(fleet.r, fleet.name)
    print(f"\nthreshold 20, 8 processes: {executed} backend executions, events {dict(events)}, "
          f"per worker executed {[x['executed'] for x in results]}")
    assert events == Counter({("closed", "open"): 1}), events
    assert 20 <= executed <= 20 + 7, f"{executed} backend executions (20 + at most 7 in flight)"
    assert sum(x["executed"] for x in results) == executed
    assert h["state"] == "open", h
    assert h["forced"] == "", h
    for x in results:
        assert x["state"] == "open", x
        assert x["rejected"] > 0, x  # every process learned it and stopped calling


def test_batched_mode_trips_once_within_its_overshoot_bound(fleet: Fleet) -> None:
    """Batched mode: each process stops at its own projection (the shared counters of its
    last reply plus its unsent outcomes), so the fleet executes at most P x threshold
    calls in the worst case (every process projecting from a stale zero), and still
    exactly one transition happens, in Redis."""
    cfg = dict(failure_threshold=20, minimum_calls=1_000_000, recovery_timeout=60.0,
               consistency="batched")
    for _ in range(8):
        fleet.spawn("hammer", cfg, outcome="fail", duration=2.0)
    fleet.wait_ready()
    fleet.release(8)
    results = fleet.finish_all()

    events = fleet.all_events()
    executed = fleet.exec_count()
    print(f"\nbatched, threshold 20, 8 processes: {executed} backend executions, "
          f"per worker {[x['executed'] for x in results]}, "
          f"script calls {[x['batches'] for x in results]}")
    assert events == Counter({("closed", "open"): 1}), events
    assert 20 <= executed <= 8 * 20, executed
    assert hgetall(fleet.r, fleet.name)["state"] == "open"
    for x in results:
        assert x["flushed"] and x["lost"] == 0, x
        assert x["executed"] <= 20, x  # no process passes its own projection
        assert x["state"] == "open" and x["rejected"] > 0, x


def test_batched_mode_failure_rate_trips_once(fleet: Fleet) -> None:
    cfg = dict(failure_rate_threshold=0.4, minimum_calls=20, failure_threshold=1000,
               recovery_timeout=60.0, consistency="batched")
    for i in range(8):
        fleet.spawn("hammer", cfg, outcome="fail" if i % 2 else "ok", duration=1.5,
                    rate_hz=1000)
    fleet.wait_ready()
    fleet.release(8)
    results = fleet.finish_all()
    events = fleet.all_events()
    calls = sum(x["failed"] + x["succeeded"] for x in results)
    batches = sum(x["batches"] for x in results)
    print(f"\nbatched rate rule: {calls} calls in {batches} script calls, events {dict(events)}")
    assert hgetall(fleet.r, fleet.name)["state"] == "open"
    assert events == Counter({("closed", "open"): 1}), events
    assert batches <= calls
    for x in results:
        assert x["state"] == "open", x


# -- 2 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("half_open_max_calls", [1, 2])
def test_half_open_admits_exactly_max_calls_fleet_wide(
    fleet: Fleet, half_open_max_calls: int
) -> None:
    cfg = dict(failure_threshold=1, minimum_calls=1_000_000, recovery_timeout=2.0,
               success_threshold=50, half_open_max_calls=half_open_max_calls)
    h = trip_from_here(fleet.r, fleet.name, CircuitBreakerConfig(**cfg))
    open_until = int(h["open_until_ms"])
    for _ in range(8):
        # each tries for 0.3 s; an admitted one holds its probe until the test releases it
        fleet.spawn("probe_once", cfg, attempt_window=0.3)
    fleet.wait_ready()
    wait_until_server_ms(fleet.r, open_until + 100)
    fleet.release(8)

    end = time.monotonic() + 20
    while fleet.r.llen(fleet.key("probing")) + fleet.r.llen(fleet.key("attempts_done")) < 8:
        assert time.monotonic() < end, "workers did not finish their attempts"
        for p in fleet.procs:
            assert p.popen.poll() is None or p.popen.returncode == 0, p.stderr()
        time.sleep(0.01)
    # Every worker has finished trying while the probes were still held.
    holding = fleet.r.llen(fleet.key("probing"))
    executed_while_held = fleet.exec_count()
    h_mid = hgetall(fleet.r, fleet.name)
    if holding:
        fleet.release(holding, "release")
    results = fleet.finish_all()

    events = fleet.all_events()
    admitted = [x for x in results if x["admitted"] is not None]
    print(f"\nhalf_open_max_calls={half_open_max_calls}: {executed_while_held} backend calls, "
          f"attempts {[x['attempts'] for x in results]}")
    assert executed_while_held == half_open_max_calls
    assert holding == half_open_max_calls
    assert fleet.exec_count() == half_open_max_calls
    assert len(admitted) == half_open_max_calls
    assert all(x["admitted"]["is_probe"] for x in admitted), admitted
    assert all(x["admitted"]["at_ms"] >= open_until for x in admitted), admitted
    assert all(x["rejected"] > 0 for x in results if x["admitted"] is None), results
    assert events == Counter({("open", "half_open"): 1}), events
    assert h_mid["state"] == "half_open", h_mid
    assert hgetall(fleet.r, fleet.name)["state"] == "half_open"


# -- 3 ---------------------------------------------------------------------------------------


def test_probe_lease_of_a_killed_process_expires(fleet: Fleet) -> None:
    cfg = dict(failure_threshold=1, minimum_calls=1_000_000, recovery_timeout=1.0,
               probe_lease=1.0, success_threshold=50, half_open_max_calls=1)
    prober = fleet.spawn("hang_probe", cfg, go="go_a", deadline=10.0)
    others = [fleet.spawn("probe_after", cfg, deadline=6.0) for _ in range(3)]
    fleet.wait_ready()
    h = trip_from_here(fleet.r, fleet.name, CircuitBreakerConfig(**cfg))
    wait_until_server_ms(fleet.r, int(h["open_until_ms"]) + 20)
    fleet.release(1, "go_a")

    got = fleet.r.blpop([fleet.key("inprobe")], timeout=10)
    assert got is not None, f"the prober never got its probe\n{prober.stderr()}"
    inprobe = json.loads(got[1])
    leases = fleet.r.zrange(probes_key(fleet.name), 0, -1, withscores=True)
    prober.popen.send_signal(signal.SIGKILL)
    prober.popen.wait(10)
    killed_at = server_ms(fleet.r)
    fleet.release(len(others))

    assert inprobe["is_probe"], inprobe
    assert len(leases) == 1, leases
    expiry = int(leases[0][1])
    assert expiry - 1000 <= inprobe["at_ms"] < expiry, (leases, inprobe)  # lease = 1.0 s
    assert killed_at < expiry, "the prober must die while its lease is still held"

    results = fleet.finish_all(others)
    fleet.finish(prober)
    times = sorted(int(t) for t in fleet.r.lrange(fleet.key("probe_times"), 0, -1))
    admitted = [x["admitted"] for x in results if x["admitted"] is not None]
    print(f"\nlease expiry {expiry}, killed {expiry - killed_at} ms before it; next probe "
          f"{[t - expiry for t in times]} ms after expiry")
    assert times, f"no process got a probe after the lease expired: {results}"
    assert all(t >= expiry for t in times), f"probe admitted before the lease expired: {times}"
    assert times[0] <= expiry + 3000, f"next probe {times[0] - expiry} ms after the lease end"
    assert all(a["is_probe"] for a in admitted), admitted
    # they were kept out while the dead process's lease was alive
    assert any(x["first_reject_ms"] is not None and x["first_reject_ms"] < expiry
               for x in results), results
    assert fleet.exec_count() == 1 + len(times)
    assert hgetall(fleet.r, fleet.name)["state"] == "half_open"


# -- 4 ---------------------------------------------------------------------------------------


def test_failure_rate_trips_once_with_mixed_outcomes(fleet: Fleet) -> None:
    cfg = dict(failure_rate_threshold=0.4, minimum_calls=20, failure_threshold=1000,
               recovery_timeout=60.0)
    for i in range(8):
        fleet.spawn("hammer", cfg, outcome="fail" if i % 2 else "ok", duration=1.5,
                    rate_hz=1000)
    fleet.wait_ready()
    fleet.release(8)
    results = fleet.finish_all()

    events = fleet.all_events()
    h = hgetall(fleet.r, fleet.name)
    failed = sum(x["failed"] for x in results)
    succeeded = sum(x["succeeded"] for x in results)
    print(f"\nrate rule: {failed} failed, {succeeded} succeeded, events {dict(events)}")
    assert h["state"] == "open", h
    assert events == Counter({("closed", "open"): 1}), events
    assert failed + succeeded >= 20  # minimum_calls
    assert failed < 1000  # so the consecutive rule cannot have done it
    for x in results:
        assert x["state"] == "open", x
        assert x["rejected"] > 0, x


# -- 5 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["trip", "force_open"])
def test_open_propagates_without_calls_and_rejections_are_local(
    private_fleet: Fleet, how: str
) -> None:
    fleet = private_fleet
    # max_staleness is long so only the pub/sub push can tell the pollers in time
    cfg = dict(failure_threshold=1, minimum_calls=1_000_000, recovery_timeout=60.0,
               max_staleness=30.0)
    tripper = fleet.spawn("trip", cfg, how=how)
    measurer = fleet.spawn("poll", cfg, deadline=5.0, measure=10_000, counting_client=True)
    pollers = [fleet.spawn("poll", cfg, deadline=5.0) for _ in range(6)]
    fleet.wait_ready()
    end = time.monotonic() + 10
    while fleet.r.pubsub_numsub(CHANNEL)[0][1] < 8:
        assert time.monotonic() < end, "listeners did not subscribe"
        time.sleep(0.01)
    fleet.release(8)

    trip = fleet.finish_all([tripper])[0]
    polled = fleet.finish_all(pollers)
    end = time.monotonic() + 10
    while not any(x["kind"] == "seen" for x in _peek_lines(measurer)):
        assert time.monotonic() < end and measurer.popen.poll() is None, measurer.stderr()
        time.sleep(0.01)
    # Everybody else has exited: from here on the measurer is the only client of this server.
    fleet.release(1, "measure")
    m = fleet.finish_all([measurer])[0]
    polled.append(m)

    latencies = [x["seen_ms"] - trip["before_ms"] if x["seen_ms"] else None for x in polled]
    print(f"\n{how}: the 7 other processes saw is_available() False after {latencies} ms "
          f"(Redis time, from just before the {how})")
    assert trip["available"] is False and trip["state"] == "open", trip
    for x in polled:
        assert x["initially_available"] is True, x
        assert x["seen_ms"] is not None, f"never saw the breaker open: {x}"
        assert x["state"] == "open", x
    assert all(lat is not None and lat <= 2000 for lat in latencies), latencies
    h = hgetall(fleet.r, fleet.name)
    assert (h["state"], h["forced"]) == (("open", "") if how == "trip" else ("closed", "open")), h
    assert fleet.all_events() == Counter({("closed", "open"): 1}), fleet.all_events()
    assert tripper.events() == [("closed", "open")]
    assert fleet.exec_count() == (1 if how == "trip" else 0)

    meas = m["measure"]
    other = {k: v for k, v in meas["server_delta"].items() if k != "cmdstat_info"}
    print(f"10,000 rejected calls: client sent {meas['client_sent']} commands, server "
          f"commandstats delta {meas['server_delta']}")
    assert meas["rejected"] == 10_000 and meas["executed"] == 0, meas
    assert meas["client_sent"] == 0, meas
    assert other == {}, meas


def _peek_lines(p: Proc) -> list[dict[str, Any]]:
    """Read what a still-running worker has printed so far (non-blocking)."""
    fd = p.popen.stdout.fileno()  # type: ignore[union-attr]
    os.set_blocking(fd, False)
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        chunk = b""
    finally:
        os.set_blocking(fd, True)
    p.out += chunk
    return p.lines()


# -- 6 ---------------------------------------------------------------------------------------


def test_successful_call_costs_one_command(private_fleet: Fleet) -> None:
    fleet = private_fleet
    cfg = dict(failure_threshold=5, max_staleness=60.0)
    w = fleet.spawn("cost", cfg, counting_client=True, warmup=50, calls=1000)
    fleet.wait_ready()
    fleet.release(1)
    x = fleet.finish_all([w])[0]

    sd = x["server_delta"]
    print(f"\n1000 successful calls: client sent {x['client_sent']} ({x['client_names']}), "
          f"server commandstats delta {sd}")
    assert x["listener_refreshed"], x
    assert x["executed"] == 1050 and x["state"] == "closed", x
    assert x["client_sent"] == 1000, x
    assert x["client_name_count"] == 1000, x
    assert x["client_names"] == ["MainThread FCALL"], x
    assert sd.get("cmdstat_fcall") == 1000, sd
    top_level = {k: v for k, v in sd.items()
                 if k not in SCRIPT_INTERNAL and k not in ("cmdstat_info", "cmdstat_fcall")}
    assert top_level == {}, sd


# -- 7 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("skew_s", [300.0, -300.0])
def test_wall_clock_skew_neither_admits_early_nor_keeps_out_late(
    fleet: Fleet, skew_s: float
) -> None:
    cfg = dict(failure_threshold=1, minimum_calls=1_000_000, recovery_timeout=1.0,
               success_threshold=50)
    w = fleet.spawn("skew", cfg, env={"MP_CLOCK_SKEW_S": str(skew_s)}, counting_client=True,
                    build_after_barrier=True, deadline=5.0)
    fleet.wait_ready()
    h = trip_from_here(fleet.r, fleet.name, CircuitBreakerConfig(**cfg))
    fleet.release(1)
    x = fleet.finish_all([w])[0]

    opened_at, open_until = int(h["opened_at_ms"]), int(h["open_until_ms"])
    adm = x["admitted"]
    print(f"\nskew {skew_s:+.0f}s: first rejection {x['first_reject_ms'] - opened_at} ms, "
          f"admitted {adm and adm['at_ms'] - opened_at} ms after opening "
          f"(open period {open_until - opened_at} ms), {x['rejected']} rejections")
    assert abs(x["skew_seen"] - skew_s) < 1 and abs(x["skew_ns_seen"] - skew_s) < 1, x
    assert open_until - opened_at == 1000, h
    assert x["first_reject_ms"] is not None and x["first_reject_ms"] < open_until, x
    assert adm is not None, f"never admitted: {x}"
    assert adm["is_probe"], x
    assert open_until <= adm["at_ms"] <= opened_at + 1500, (adm["at_ms"] - opened_at, x)
    # The open period was measured locally, not re-asked of Redis on every rejected call:
    # the main thread ran only the constructor's snapshot and the admitting acquire (each
    # at most twice, for the library reload after the fixture's FUNCTION FLUSH).
    assert x["rejected"] > 10 and adm["main_thread_scripts"] <= 4, x
    assert fleet.exec_count() == 1
    assert x["events"] == [{"old": "open", "new": "half_open", "name": fleet.name}], x
