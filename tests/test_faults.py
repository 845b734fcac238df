"""Redis as a dependency that fails, with real worker processes and a real redis-server.

The outage tests follow the acceptance check: 4 workers call a guarded function about
200 times a second for 10 s; Redis is killed (SIGKILL) at second 3 and restarted at
second 6, or paused with CLIENT PAUSE for 2 s. No Redis exception may reach a caller, no
guarded call may take more than 100 ms longer than the function, a backend that fails
during the outage must still trip the breakers, and after Redis is back a force_open()
from another process must reach every worker within 2 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from distbreaker import CircuitBreaker, CircuitBreakerConfig, CircuitState

from redis_server import RedisServer

WORKER = Path(__file__).parent / "support" / "fault_worker.py"
CFG = dict(failure_threshold=5, recovery_timeout=1.0, minimum_calls=1000, max_staleness=1.0)


def _sleep_until(t: float) -> None:
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)


@pytest.mark.multiprocess
@pytest.mark.parametrize("fault", ["kill", "pause"])
def test_workers_ride_out_a_redis_outage(fault: str) -> None:
    data, control = RedisServer().start(), RedisServer().start()
    name = f"fault-{fault}-{uuid.uuid4().hex[:6]}"
    ns = f"ctl:{name}"
    if fault == "kill":
        down, up, fail_window = 3.0, 6.0, [3.5, 5.5]
    else:
        down, up, fail_window = 3.0, 5.0, [3.2, 4.8]
    spec = {"url": data.url, "control_url": control.url, "name": name, "ns": ns,
            "config": CFG, "rate": 200, "duration": 10.0, "fail_window": fail_window}
    procs = [subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    ctl = control.client()
    try:
        deadline = time.monotonic() + 30
        while ctl.llen(f"{ns}:ready") < 4:
            assert time.monotonic() < deadline, "workers did not start"
            assert all(p.poll() is None for p in procs)
            time.sleep(0.02)
        start = time.monotonic() + 0.3
        ctl.lpush(f"{ns}:go", *[repr(start)] * 4)
        _sleep_until(start + down)
        if fault == "kill":
            data.kill()
            _sleep_until(start + up)
            data.start()
        else:
            data.client().execute_command("CLIENT", "PAUSE", int((up - down) * 1000), "ALL")
        _sleep_until(start + 7.5)
        t_force = time.monotonic() - start
        CircuitBreaker(name, CircuitBreakerConfig(**CFG), redis=data.client()).force_open()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            results.append((json.loads(out.strip().splitlines()[-1]), err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        data.stop()
        control.stop()

    for r, err in results:
        assert r["unexpected_count"] == 0, r["unexpected"]
        assert r["max_overhead_s"] < 0.1, (r["max_overhead_s"], r["worst_at"])
        # the backend failed while Redis was out: the local fallback still tripped
        assert any(fail_window[0] <= t < up for t in r["rejected_at"]), r["rejected_at"]
        # one warning when the outage starts, one when it ends: not one per call
        assert err.count("Redis unavailable") == 1, err
        assert err.count("Redis is back") == 1, err
        # available just before the force, unavailable within 2 s after it, and stays so
        before = [a for t, a in r["avail"] if t < t_force]
        assert before and before[-1] is True, r["avail"]
        after = [(t, a) for t, a in r["avail"] if t >= t_force]
        assert after and after[0][1] is False and after[0][0] <= t_force + 2.0, (t_force, after)
        assert after[-1][1] is False
        assert r["degraded_at_end"] is False


def test_policies_when_redis_is_down() -> None:
    """`local` keeps protecting, `allow` admits everything, `deny` rejects with
    StoreUnavailableError; none raises a Redis error, and none waits long."""
    from distbreaker import StoreUnavailableError

    srv = RedisServer().start()
    client = redis.Redis(port=srv.port)
    made = {}
    for policy in ("local", "allow", "deny"):
        cfg = CircuitBreakerConfig(failure_threshold=2, on_redis_error=policy,  # type: ignore[arg-type]
                                   max_staleness=60)
        made[policy] = CircuitBreaker(f"pol-{policy}", cfg, redis=client)
    srv.kill()
    try:
        def boom() -> None:
            raise KeyError

        b = made["local"]
        for _ in range(2):
            with pytest.raises(KeyError):
                b.call(boom)
        assert b.get_state() is CircuitState.OPEN and b.store_degraded
        assert b.get_metrics().store_degraded

        a = made["allow"]
        t0 = time.perf_counter()
        for _ in range(20):
            with pytest.raises(KeyError):
                a.call(boom)
        assert a.call(lambda: 5) == 5
        assert time.perf_counter() - t0 < 1.0

        d = made["deny"]  # the outage is known to its client: rejects without a round trip
        assert not d.is_available()
        with pytest.raises(StoreUnavailableError):
            d.call(lambda: 1)
        with pytest.raises(StoreUnavailableError):
            d.call(lambda: 1)
        assert not d.is_available()
    finally:
        srv.start()  # same port: the breakers adopt the shared state again
    deadline = time.monotonic() + 5
    while made["deny"].store_degraded and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not made["deny"].store_degraded
    assert made["deny"].call(lambda: 7) == 7
    # local trips were local: Redis (restarted empty) has the breaker closed
    assert made["local"].refresh() is CircuitState.CLOSED
    for b in made.values():
        b.close()
    srv.stop()


def test_flushall_and_script_flush_mid_run(redis_client: redis.Redis) -> None:
    cfg = CircuitBreakerConfig(failure_threshold=3, max_staleness=60)
    b = CircuitBreaker("flushed", cfg, redis=redis_client)
    for _ in range(2):
        with pytest.raises(KeyError):
            b.call(lambda: {}[0])
    b.force_open()
    redis_client.flushall()
    redis_client.script_flush()
    redis_client.function_flush()
    # the first call after the flush may be rejected on the old snapshot; then adopted
    deadline = time.monotonic() + 3
    while b.get_state() is not CircuitState.CLOSED and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.refresh() is CircuitState.CLOSED
    for _ in range(3):
        with pytest.raises(KeyError):
            b.call(lambda: {}[0])
    assert b.get_state() is CircuitState.OPEN
    assert redis_client.hget("distbreaker:v1:{flushed}", "state") == b"open"
    assert not b.store_degraded
    b.close()


# (title, redis-cli command, replace the key first, the scripts log a repair)
GARBAGE: list[tuple[str, list[Any], bool, bool]] = [
    ("state key is a string", ["SET", "{k}", "garbage"], True, True),
    ("state key is a list", ["RPUSH", "{k}", "a", "b"], True, True),
    ("non-numeric fields", ["HSET", "{k}", "generation", "abc", "consecutive_failures", "x",
                            "open_until_ms", "soon", "state", "open"], False, True),
    ("unknown state", ["HSET", "{k}", "state", "melting", "forced", "sideways"], False, True),
    ("negative counters", ["HSET", "{k}", "consecutive_failures", "-5", "generation", "-1"],
     False, True),
    ("window is a string", ["SET", "{k}:window", "nope"], True, True),
    ("window is a set", ["SADD", "{k}:window", "x"], True, True),
    ("window of another shape", ["HSET", "{k}:window", "e", "zz", "c", "-3", "k", "x"],
     False, False),
    ("window totals inconsistent", ["HSET", "{k}:window", "e", "0", "c", "1", "f", "50"],
     False, False),
    ("probes is a hash", ["HSET", "{k}:probes", "a", "b"], True, False),  # a trip clears it
    ("probes garbage scores", ["ZADD", "{k}:probes", "1e300", "stuck"], False, False),
]


@pytest.mark.parametrize(("title", "cmd", "replace", "noted"), GARBAGE,
                         ids=[g[0] for g in GARBAGE])
def test_garbage_in_redis_never_raises(title: str, cmd: list[Any], replace: bool, noted: bool,
                                       redis_server: RedisServer,
                                       redis_client: redis.Redis,
                                       caplog: pytest.LogCaptureFixture) -> None:
    name = "garbled"
    key = f"distbreaker:v1:{{{name}}}"
    cfg = CircuitBreakerConfig(failure_threshold=3, max_staleness=60, half_open_max_calls=1,
                               recovery_timeout=0.05, success_threshold=1)
    b = CircuitBreaker(name, cfg, redis=redis_client)
    b.call(lambda: 1)
    # written with redis-cli, as an operator (or a bug elsewhere) might
    argv = [str(a).replace("{k}", key) for a in cmd]
    cli = ["redis-cli", "-p", str(redis_server.port)]
    if replace:
        subprocess.run([*cli, "DEL", argv[1]], check=True, capture_output=True)
    out = subprocess.run([*cli, *argv], check=True, capture_output=True, text=True)
    assert "ERR" not in out.stdout, out.stdout  # the garbage really is in Redis
    b._core.cell.forget()
    from distbreaker import CircuitOpenError

    # it may start from whatever the garbage left (a repaired OPEN, say); it must trip
    for _ in range(20):
        with pytest.raises((KeyError, CircuitOpenError)):
            b.call(lambda: {}[0])
    assert b.get_state() is CircuitState.OPEN, title
    # and recover: the probe goes out, nothing is wedged
    deadline = time.monotonic() + 5
    while True:
        try:
            assert b.call(lambda: 2) == 2
            break
        except CircuitOpenError:
            assert time.monotonic() < deadline, title
            time.sleep(0.02)
    assert b.get_state() is CircuitState.CLOSED
    b.get_metrics()
    b.force_closed()
    b.reset()
    assert redis_client.type(key) == b"hash"
    assert not b.store_degraded, title  # repaired by the scripts, not failed over
    assert "Redis unavailable" not in caplog.text
    if noted:
        assert "repaired breaker state" in caplog.text, caplog.text
    b.close()


def test_operator_actions_fail_loudly_while_redis_is_down() -> None:
    """force/release/reset must reach the fleet: during an outage they raise, they do not
    quietly change only this process."""
    from distbreaker import StoreUnavailableError

    srv = RedisServer().start()
    b = CircuitBreaker("ops", CircuitBreakerConfig(max_staleness=60), redis=srv.client())
    b.call(lambda: 1)
    srv.kill()
    try:
        for op in (b.force_open, b.force_closed, b.release, b.reset):
            with pytest.raises(StoreUnavailableError):
                op()
        assert b.call(lambda: 3) == 3  # callers are still served by the fallback
    finally:
        srv.start()
    b.force_open()
    assert srv.client().hget("distbreaker:v1:{ops}", "forced") == b"open"
    b.close()
    srv.stop()


def test_recovery_keeps_a_forced_open_breaker_unavailable() -> None:
    """When Redis returns, a breaker that is forced open in Redis must not look available
    while it re-reads the shared state."""
    srv = RedisServer().start()
    client = srv.client()
    # failover_after below redis_timeout: the first unanswered call fails the client over
    a = CircuitBreaker("rec-a", CircuitBreakerConfig(max_staleness=60, failover_after=0.01),
                       redis=client)
    b = CircuitBreaker("rec-b", CircuitBreakerConfig(max_staleness=60), redis=client)
    b.force_open()
    a.call(lambda: 1)
    srv.client().execute_command("CLIENT", "PAUSE", 600, "ALL")
    a.call(lambda: 1)  # times out: the guard opens for every breaker of the client
    assert a.store_degraded and b.store_degraded
    seen = []
    deadline = time.monotonic() + 3
    next_call = 0.0
    while time.monotonic() < deadline:
        seen.append(b.is_available())
        if time.monotonic() >= next_call:  # a's calls find out when Redis is back
            a.call(lambda: 1)
            next_call = time.monotonic() + 0.05
        time.sleep(0.005)
    assert not a.store_degraded
    assert not any(seen), "a forced-open breaker looked available during recovery"
    a.close()
    b.close()
    srv.stop()


def test_sentinel_deployments_do_not_share_a_guard() -> None:
    from redis.sentinel import Sentinel

    from distbreaker._guard import guard_for

    one = Sentinel([("127.0.0.1", 26001)]).master_for("mymaster")
    two = Sentinel([("127.0.0.1", 26002)]).master_for("mymaster")
    replica = Sentinel([("127.0.0.1", 26001)]).slave_for("mymaster")
    assert guard_for(one) is not guard_for(two)
    assert guard_for(one) is not guard_for(replica)
    assert guard_for(one) is guard_for(Sentinel([("127.0.0.1", 26001)]).master_for("mymaster"))
