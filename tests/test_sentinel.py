"""Breakers over Redis Sentinel: a primary, one replica and three sentinels (quorum 2),
started by tests/support/redis_topology.py.

The breakers get ``Sentinel([...]).master_for("mymaster")`` clients. The failover tests run
worker processes that call a guarded function about 200 times a second while the primary
is killed (SIGKILL; the sentinels agree it is down and promote the replica) or while
``SENTINEL FAILOVER`` promotes the replica. No Redis exception may reach a caller, no
guarded call may take more than 100 ms longer than the function, and afterwards the
breakers run on the new primary: a force_open() through Sentinel reaches every worker
within a few seconds and is stored on the new primary.

Run as ``python tests/test_sentinel.py '<json spec>'`` this file is the worker process (see
`_worker_main`).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.sentinel import Sentinel

from distbreaker import CircuitBreaker, CircuitBreakerConfig, CircuitOpenError, CircuitState

if __name__ == "__main__":  # run as a worker process: its helpers are in tests/support
    sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from redis_topology import SentinelTopology, Worker, pids_alive, stdin_closed_event

SERVICE = "mymaster"


class Boom(Exception):
    pass


def boom() -> None:
    raise Boom


def state_key(name: str) -> str:
    return f"distbreaker:v1:{{{name}}}"


def unique(tag: str) -> str:
    return f"sn-{tag}-{uuid.uuid4().hex[:8]}"


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.01)


def master_client(topo: SentinelTopology) -> redis.Redis:
    return Sentinel(topo.sentinel_addrs, socket_timeout=0.5).master_for(SERVICE)


def hget(topo: SentinelTopology, port: int, name: str, field: str) -> str | None:
    c = topo.server(port).client(decode_responses=True)
    try:
        return c.hget(state_key(name), field)  # type: ignore[return-value]
    finally:
        c.close()


@pytest.fixture(scope="module")
def topo() -> Iterator[SentinelTopology]:
    t = SentinelTopology().start()
    pids = t.pids
    yield t
    t.stop()
    assert pids_alive(pids) == [], "a redis-server or sentinel survived stop()"


def test_breaker_through_sentinel(topo: SentinelTopology) -> None:
    # redis_timeout is generous: this test is about behaviour, not about a loaded machine
    cfg = CircuitBreakerConfig(failure_threshold=3, recovery_timeout=0.3, success_threshold=1,
                               half_open_max_calls=1, minimum_calls=1000, max_staleness=60.0,
                               redis_timeout=1.0)
    name = unique("basic")
    c1, c2 = master_client(topo), master_client(topo)  # two clients: two listeners
    a = CircuitBreaker(name, cfg, redis=c1)
    b = CircuitBreaker(name, cfg, redis=c2)
    try:
        assert a.call(lambda: 1) == 1
        for _ in range(3):
            with pytest.raises(Boom):
                a.call(boom)
        assert a.get_state() is CircuitState.OPEN
        with pytest.raises(CircuitOpenError):
            a.call(lambda: 1)
        assert hget(topo, topo.primary.port, name, "state") == "open"
        wait_for(lambda: hget(topo, topo.replica.port, name, "state") == "open", 5,
                 "the state to replicate")
        # the other breaker heard it through pub/sub (max_staleness is 60 s)
        wait_for(lambda: not b.is_available(), 5, "the trip to reach the other client")
        assert b.get_state() is CircuitState.OPEN

        seen: dict[str, Any] = {}

        def probe() -> int:
            seen["state"] = hget(topo, topo.primary.port, name, "state")
            return 2

        deadline = time.monotonic() + 5
        while True:
            try:
                assert b.call(probe) == 2
                break
            except CircuitOpenError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert seen == {"state": "half_open"}
        assert b.get_state() is CircuitState.CLOSED
        wait_for(lambda: a.get_state() is CircuitState.CLOSED, 5, "the close to reach a")
        assert hget(topo, topo.primary.port, name, "state") == "closed"

        b.force_open()
        wait_for(lambda: not a.is_available(), 5, "force_open to reach a")
        assert hget(topo, topo.primary.port, name, "forced") == "open"
        with pytest.raises(CircuitOpenError):
            a.call(lambda: 1)
        b.force_closed()
        wait_for(lambda: a.snapshot.forced == "closed", 5, "force_closed to reach a")
        for _ in range(5):  # outcomes are not counted under force_closed
            with pytest.raises(Boom):
                a.call(boom)
        assert a.is_available()
        b.release()
        wait_for(lambda: a.snapshot.forced == "" and a.is_available(), 5, "release to reach a")
        assert hget(topo, topo.primary.port, name, "forced") == ""
        assert a.call(lambda: 3) == 3
        m = a.get_metrics()
        assert m.fleet is not None and m.fleet.calls == 1
        assert not a.store_degraded and not b.store_degraded
        assert topo.master_addr()[1] == topo.primary.port  # nothing failed over meanwhile
    finally:
        a.close()
        b.close()
        c1.close()
        c2.close()


# -- failover under load ---------------------------------------------------------------------

WORKERS = 3
RATE = 200
CFG = dict(failure_threshold=5, recovery_timeout=1.0, minimum_calls=1000, max_staleness=1.0)


@pytest.mark.multiprocess
@pytest.mark.parametrize("how", ["kill", "failover"])
def test_failover_under_load(how: str) -> None:
    topo = SentinelTopology().start()
    pids = topo.pids
    name = unique(how)
    old, new = topo.primary.port, topo.replica.port
    spec = {"sentinels": topo.sentinel_addrs, "name": name, "config": CFG, "rate": RATE}
    workers: list[Worker] = []
    try:
        workers = [Worker([sys.executable, str(Path(__file__)), json.dumps(spec)])
                   for _ in range(WORKERS)]
        for w in workers:
            w.expect("ready", 30)
        start = time.monotonic() + 0.3
        for w in workers:
            w.send(repr(start))
        time.sleep(max(start + 1.5 - time.monotonic(), 0))
        t_fault = time.monotonic() - start
        sen = topo.sentinels[0].client(decode_responses=True)
        if how == "kill":
            topo.primary.kill()
        else:
            assert sen.execute_command("SENTINEL", "FAILOVER", SERVICE) == "OK"
        # the sentinels promote the replica ...
        wait_for(lambda: all(topo.master_addr(i)[1] == new for i in range(3)), 30,
                 "every sentinel to name the replica as the new primary")
        wait_for(lambda: topo.role(new) == "master", 10, "the replica to be promoted")
        t_promoted = time.monotonic() - start
        if how == "failover":
            # ... and, a while later, turn the old primary into a replica of the new one
            # (until then clients that are still connected to it keep using it)
            wait_for(lambda: topo.role(old) == "slave", 40, "the old primary to be demoted")
        t_settled = time.monotonic() - start
        # the workers use the new primary on their own: their calls arrive there
        direct_new = topo.server(new).client()

        def evalsha_on_new() -> int:  # the breaker's calls: FCALL, or EVALSHA
            st = direct_new.info("commandstats")
            return sum(int(st[k]["calls"]) for k in ("cmdstat_fcall", "cmdstat_evalsha")
                       if k in st)

        before = evalsha_on_new()
        wait_for(lambda: evalsha_on_new() > before + 2 * RATE * WORKERS // 10, 10,
                 "worker calls to reach the new primary")
        # an operator forces the breaker open through Sentinel, from another process
        t_force = time.monotonic() - start
        forcer_client = master_client(topo)
        forcer = CircuitBreaker(name, CircuitBreakerConfig(**CFG, redis_timeout=1.0),
                                redis=forcer_client)
        forcer.force_open()
        assert not forcer.store_degraded
        assert direct_new.hget(state_key(name), "forced") == b"open"
        forcer.close()
        forcer_client.close()
        direct_new.close()
        sen.close()
        time.sleep(3.0)
        results = [w.finish() for w in workers]
    finally:
        for w in workers:
            w.kill()
        topo.stop()
    assert pids_alive(pids) == [], "a redis-server or sentinel survived stop()"

    timeline = dict(fault=t_fault, promoted=t_promoted, settled=t_settled, force=t_force)
    print(how, {k: round(v, 2) for k, v in timeline.items()})
    for r in results:
        seen = next((t for t, a in r["avail"] if t >= t_force and not a), None)
        print(f"  calls={r['calls']} max_overhead={r['max_overhead_s'] * 1000:.1f}ms "
              f"at {r['worst_at']}s degraded={r['degraded_spans']} force_seen_at={seen}")
    for w, r in zip(workers, results, strict=True):
        info = (timeline, {k: v for k, v in r.items() if k != "avail"})
        assert r["unexpected_count"] == 0, (r["unexpected"], info)
        assert r["max_overhead_s"] < 0.1, info
        assert r["calls"] > RATE * (t_force + 2), info  # it kept calling throughout
        # Redis errors (if any) were absorbed by the fallback, and it recovered. With a
        # SIGKILL there are errors: the primary is gone until the replica is promoted.
        # (On a loaded machine a 50 ms redis_timeout may also expire at other times, so
        # degraded spans elsewhere are allowed.)
        if how == "kill":
            assert any(a < t_force and (b is None or b >= t_fault)
                       for a, b in r["degraded_spans"]), info
            assert "Redis unavailable" in w.stderr and "Redis is back" in w.stderr, w.stderr
        assert r["degraded_at_end"] is False, info
        # available until the force, unavailable within a few seconds after it, and stays so
        before_force = [a for t, a in r["avail"] if t < t_force]
        assert before_force and before_force[-1] is True, (r["avail"], info)
        after = [(t, a) for t, a in r["avail"] if t >= t_force]
        assert after and after[0][1] is False and after[0][0] <= t_force + 3.0, (after, info)
        assert after[-1][1] is False, (after, info)
        assert any(t >= t_force for t in r["rejected_at"]), info


# -- the worker process ----------------------------------------------------------------------


def _worker_main(spec: dict[str, Any]) -> int:
    """Build a breaker over Sentinel, make one call, print ``ready``; read the start time
    (monotonic, shared by every process on the host) from stdin; then call a guarded
    function every 1/rate s until stdin closes, and print one ``result`` line."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    stop = stdin_closed_event()
    sentinel = Sentinel([tuple(a) for a in spec["sentinels"]], socket_timeout=0.5)
    b = CircuitBreaker(spec["name"], CircuitBreakerConfig(**spec["config"]),
                       redis=sentinel.master_for(SERVICE))
    b.call(lambda: 0)

    def emit(**obj: Any) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    emit(kind="ready")
    start = float(stop.lines.get(timeout=60))  # type: ignore[attr-defined]
    period = 1.0 / spec["rate"]
    unexpected: list[str] = []
    max_overhead = worst_at = 0.0
    rejected_at: list[float] = []
    avail: list[tuple[float, bool]] = []
    degraded_spans: list[tuple[float, float | None]] = []
    last_avail: bool | None = None
    calls = 0
    nxt = start
    while time.monotonic() < start:
        time.sleep(0.001)
    deadline = start + 90
    while not stop.is_set() and time.monotonic() < deadline:
        now = time.monotonic()
        t = round(now - start, 4)
        a = b.is_available()
        if a != last_avail:
            avail.append((t, a))
            last_avail = a
        d = b.store_degraded
        if d and (not degraded_spans or degraded_spans[-1][1] is not None):
            degraded_spans.append((t, None))
        elif not d and degraded_spans and degraded_spans[-1][1] is None:
            degraded_spans[-1] = (degraded_spans[-1][0], t)
        spent = [0.0]

        def backend(spent: list[float] = spent) -> int:
            t0 = time.perf_counter()
            try:
                return 1
            finally:
                spent[0] = time.perf_counter() - t0

        t0 = time.perf_counter()
        try:
            b.call(backend)
        except CircuitOpenError:
            rejected_at.append(t)
        except BaseException as e:  # anything else reached the caller: a bug
            unexpected.append(f"{t} {type(e).__module__}.{type(e).__name__}: {e}")
        overhead = time.perf_counter() - t0 - spent[0]
        calls += 1
        if overhead > max_overhead:
            max_overhead, worst_at = overhead, t
        nxt += period
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    emit(kind="result", unexpected=unexpected[:20], unexpected_count=len(unexpected),
         max_overhead_s=max_overhead, worst_at=worst_at, calls=calls,
         rejected_at=rejected_at[:50], avail=avail, degraded_spans=degraded_spans,
         degraded_at_end=b.store_degraded)
    b.close()
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(json.loads(sys.argv[1])))


def test_cli_through_sentinel(topo: SentinelTopology) -> None:
    """The operator CLI reaches the primary through the sentinels."""
    import json
    import subprocess
    import sys

    name = f"cli-sn-{uuid.uuid4().hex[:6]}"
    spec = ",".join(f"{h}:{p}" for h, p in topo.sentinel_addrs)
    master = Sentinel(topo.sentinel_addrs).master_for(topo.service)
    b = CircuitBreaker(name, CircuitBreakerConfig(max_staleness=60), redis=master)
    b.call(lambda: 1)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "distbreaker", *args, "--sentinel", spec,
                               "--service", topo.service], capture_output=True,
                              text=True, timeout=60)

    p = cli("open", name)
    assert p.returncode == 0, p.stderr
    assert master.hget(f"distbreaker:v1:{{{name}}}", "forced") == b"open"
    p = cli("list", "--json")
    assert p.returncode == 0, p.stderr
    assert {x["name"]: x["state"] for x in json.loads(p.stdout)}[name] == "open"
    assert cli("release", name).returncode == 0
    bad = subprocess.run([sys.executable, "-m", "distbreaker", "list", "--sentinel",
                          "nonsense"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
    b.close()
