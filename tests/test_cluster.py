"""Breakers on a real 3-primary Redis Cluster (tests/support/redis_topology.py starts it).

Every key of a breaker carries the hash tag ``{<name>}``, so each script touches one slot on
one primary; the transition message is PUBLISHed inside the script on that primary and
reaches subscribers on every other node over the cluster bus (classic, not sharded,
pub/sub). Breaker names are chosen so that breakers live on each of the three primaries, and
the propagation test picks one whose primary is neither the one the channel hashes to (where
the listeners subscribe) nor the one the tripping process starts from.

Run as ``python tests/test_cluster.py '<json spec>'`` this file is the worker process of the
multi-process test (see `_worker_main`).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from distbreaker import (
    AsyncCircuitBreaker,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitOpenError,
    CircuitState,
)
from distbreaker.providers import CircuitBreakerManager

if __name__ == "__main__":  # run as a worker process: its helpers are in tests/support
    sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from redis_topology import HOST, ClusterTopology, Worker, pids_alive, stdin_closed_event

CHANNEL = "distbreaker:v1:events"
# Commands the Lua scripts issue themselves; INFO commandstats counts them too.
SCRIPT_INTERNAL = {
    f"cmdstat_{c}"
    for c in ("time", "hmget", "hget", "hset", "hdel", "del", "pexpire", "publish",
              "zremrangebyscore", "zcard", "zrange", "zadd", "zrem", "zcount")
}
# max_staleness is long everywhere: a state change seen quickly came through pub/sub,
# and no background refresh disturbs the command counts. redis_timeout is generous, as in
# the Sentinel tests: these tests are about where the keys live and what the fleet sees,
# not about a loaded machine (a 50 ms read timeout on a 2-CPU VM running 3 nodes sent a
# call to the local fallback in 2 of about 10 CI runs); test_redis_timeout_applies_to_
# cluster_clients checks the short timeout itself.
LIFECYCLE = dict(failure_threshold=3, recovery_timeout=0.3, success_threshold=1,
                 half_open_max_calls=1, minimum_calls=1000, max_staleness=60.0,
                 redis_timeout=1.0)


class Boom(Exception):
    pass


def boom() -> None:
    raise Boom


def keys_of(name: str) -> list[str]:
    base = f"distbreaker:v1:{{{name}}}"
    return [base, f"{base}:window", f"{base}:probes"]


def slot_of(name: str) -> int:
    return key_slot(keys_of(name)[0].encode())


def names_per_node(cluster: ClusterTopology, tag: str,
                   fmt: Callable[[str], str] = lambda s: s) -> dict[int, str]:
    """One fresh breaker name per primary port: ``fmt(candidate)`` lives on that port."""
    out: dict[int, str] = {}
    for i in range(10000):
        cand = f"{tag}-{uuid.uuid4().hex[:6]}-{i}"
        port = cluster.slot_owner(slot_of(fmt(cand)))
        out.setdefault(port, cand)
        if len(out) == len(cluster.nodes):
            return out
    raise AssertionError("could not place a name on every primary")


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.01)


def direct(cluster: ClusterTopology, port: int) -> redis.Redis:
    """A plain (non-cluster) client to one node: reads there, or a MOVED error."""
    return cluster.node(port).client(decode_responses=True)


def hget_on(cluster: ClusterTopology, port: int, key: str, field: str) -> str | None:
    c = direct(cluster, port)
    try:
        return c.hget(key, field)  # type: ignore[return-value]
    finally:
        c.close()


def check_placement(cluster: ClusterTopology, name: str, port: int, present: list[str]) -> None:
    """All three keys hash to one slot served by `port`; the `present` ones are there."""
    slot = slot_of(name)
    c = direct(cluster, port)
    try:
        assert {c.execute_command("CLUSTER", "KEYSLOT", k) for k in keys_of(name)} == {slot}
        assert cluster.slot_owner(slot) == port
        in_slot = set(c.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100))
        for k in present:
            assert k in in_slot, (k, in_slot)
            assert c.exists(k) == 1
    finally:
        c.close()
    for other in cluster.ports:
        if other != port:
            o = direct(cluster, other)
            try:
                with pytest.raises(redis.exceptions.MovedError, match=f"^{slot} .*:{port}$"):
                    o.exists(keys_of(name)[0])
            finally:
                o.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterTopology]:
    topo = ClusterTopology().start()
    pids = topo.pids
    yield topo
    topo.stop()
    assert pids_alive(pids) == [], "a cluster node survived stop()"


@pytest.fixture
def rc(cluster: ClusterTopology) -> Iterator[RedisCluster]:
    c = RedisCluster(host=HOST, port=cluster.ports[0])
    yield c
    c.close()


# -- sync breaker ----------------------------------------------------------------------------


def test_sync_breaker_lifecycle_on_every_primary(cluster: ClusterTopology,
                                                 rc: RedisCluster) -> None:
    for port, name in names_per_node(cluster, "sync").items():
        _sync_lifecycle(cluster, rc, port, name)


def _sync_lifecycle(cluster: ClusterTopology, rc: RedisCluster, port: int, name: str) -> None:
    cfg = CircuitBreakerConfig(**LIFECYCLE)
    changes: list[tuple[str, str]] = []
    b = CircuitBreaker(name, cfg, redis=rc,
                       on_state_change=lambda n, o, s: changes.append((o.value, s.value)))
    node = direct(cluster, port)
    state_key, window_key, probes_key = keys_of(name)
    try:
        assert b.call(lambda: 1) == 1
        check_placement(cluster, name, port, [state_key, window_key])
        for _ in range(3):
            with pytest.raises(Boom):
                b.call(boom)
        assert b.get_state() is CircuitState.OPEN
        assert node.hget(state_key, "state") == "open"
        with pytest.raises(CircuitOpenError):
            b.call(lambda: 1)

        seen: dict[str, Any] = {}

        def probe() -> int:  # runs while this call holds the one probe lease
            seen["state"] = node.hget(state_key, "state")
            seen["probes"] = node.zcard(probes_key)
            check_placement(cluster, name, port, [state_key, probes_key])
            return 2

        deadline = time.monotonic() + 5
        while True:
            try:
                assert b.call(probe) == 2
                break
            except CircuitOpenError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert seen == {"state": "half_open", "probes": 1}
        assert b.get_state() is CircuitState.CLOSED
        assert node.hget(state_key, "state") == "closed"
        assert node.zcard(probes_key) == 0
        assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
        assert not b.store_degraded
    finally:
        b.close()
        node.close()


def test_force_and_reset_reach_a_breaker_started_from_another_node(
        cluster: ClusterTopology, rc: RedisCluster) -> None:
    cfg = CircuitBreakerConfig(**LIFECYCLE)
    other = RedisCluster(host=HOST, port=cluster.ports[2])
    made: list[CircuitBreaker] = []
    try:
        for port, name in names_per_node(cluster, "force").items():
            a = CircuitBreaker(name, cfg, redis=rc)
            b = CircuitBreaker(name, cfg, redis=other)
            made += [a, b]
            assert b.call(lambda: 1) == 1
            a.force_open()
            wait_for(lambda b=b: not b.is_available(), 5, "force_open to arrive")
            assert b.get_state() is CircuitState.OPEN
            assert hget_on(cluster, port, keys_of(name)[0], "forced") == "open"
            with pytest.raises(CircuitOpenError):
                b.call(lambda: 1)
            a.release()
            wait_for(lambda b=b: b.is_available(), 5, "release to arrive")
            assert b.call(lambda: 3) == 3
    finally:
        for m in made:
            m.close()
        other.close()


# -- asyncio breaker --------------------------------------------------------------------------


async def test_async_breaker_lifecycle_on_every_primary(cluster: ClusterTopology) -> None:
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    c1 = AsyncRedisCluster(host=HOST, port=cluster.ports[1])
    c2 = AsyncRedisCluster(host=HOST, port=cluster.ports[2])
    # The async cluster client discovers the slots on its first command; initialise it up
    # front (see test_async_cluster_breaker_idle_before_its_first_call for why).
    await c1.initialize()
    await c2.initialize()
    try:
        for port, name in names_per_node(cluster, "async").items():
            await _async_lifecycle(cluster, c1, c2, port, name)
    finally:
        await c1.aclose()
        await c2.aclose()


async def _async_lifecycle(cluster: ClusterTopology, c1: Any, c2: Any, port: int,
                           name: str) -> None:
    cfg = CircuitBreakerConfig(**LIFECYCLE)
    b = AsyncCircuitBreaker(name, cfg, redis=c1)
    watcher = AsyncCircuitBreaker(name, cfg, redis=c2)  # another client, same loop
    node = direct(cluster, port)
    state_key, _, probes_key = keys_of(name)

    async def ok(v: int = 1) -> int:
        return v

    async def fail() -> None:
        raise Boom

    seen: dict[str, Any] = {}

    async def probe() -> int:
        seen["probes"] = node.zcard(probes_key)
        seen["state"] = node.hget(state_key, "state")
        return 2

    async def until(cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 5
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    try:
        assert await watcher.refresh() is CircuitState.CLOSED
        assert await b.call(ok) == 1
        check_placement(cluster, name, port, keys_of(name)[:2])
        for _ in range(3):
            with pytest.raises(Boom):
                await b.call(fail)
        assert b.get_state() is CircuitState.OPEN
        assert node.hget(state_key, "state") == "open"
        with pytest.raises(CircuitOpenError):
            await b.call(ok)
        # the other client heard it through pub/sub (max_staleness is 60 s)
        await until(lambda: watcher.get_state() is CircuitState.OPEN, "the trip to arrive")
        assert not watcher.is_available()

        deadline = time.monotonic() + 5
        while True:
            try:
                assert await b.call(probe) == 2
                break
            except CircuitOpenError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        assert seen == {"probes": 1, "state": "half_open"}
        assert b.get_state() is CircuitState.CLOSED
        assert node.hget(state_key, "state") == "closed"
        await until(lambda: watcher.get_state() is CircuitState.CLOSED, "the close to arrive")
        m = await watcher.get_metrics()
        assert m.fleet is not None and m.fleet.generation >= 2
        assert not b.store_degraded and not watcher.store_degraded
    finally:
        await b.close()
        await watcher.close()
        node.close()


# Regression: the listener subscribed through an asyncio Cluster client before it had
# discovered its slots (KeyError from ClusterPubSub), and reported that as a Redis outage.
async def test_async_cluster_breaker_idle_before_its_first_call(
        cluster: ClusterTopology) -> None:
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    client = AsyncRedisCluster(host=HOST, port=cluster.ports[0])  # not initialised yet
    name = f"idle-{uuid.uuid4().hex[:6]}"
    b = AsyncCircuitBreaker(name, CircuitBreakerConfig(on_redis_error="deny"), redis=client)
    try:
        await asyncio.sleep(0.5)  # e.g. built at application start, first request later
        assert not b.store_degraded
        assert b.is_available()

        async def ok() -> int:
            return 1

        assert await b.call(ok) == 1
    finally:
        await b.close()
        await client.aclose()


# -- commands per call -----------------------------------------------------------------------


def test_one_evalsha_per_successful_call_on_the_owning_node(cluster: ClusterTopology,
                                                            rc: RedisCluster) -> None:
    cfg = CircuitBreakerConfig(**LIFECYCLE)
    # An anchor breaker keeps the client's listener subscribed for the whole test: each
    # time a subscription is established the listener refreshes every breaker (one
    # snapshot EVALSHA each), and that may land inside a measurement. Such a sporadic
    # extra is why a measurement may be repeated; one extra per call would never pass.
    anchor = CircuitBreaker(f"anchor-{uuid.uuid4().hex[:6]}", cfg, redis=rc)
    try:
        for port, name in names_per_node(cluster, "cmds").items():
            _count_commands(cluster, rc, cfg, port, name)
    finally:
        anchor.close()


def _count_commands(cluster: ClusterTopology, rc: RedisCluster, cfg: CircuitBreakerConfig,
                    port: int, name: str, n: int = 50) -> None:
    b = CircuitBreaker(name, cfg, redis=rc)
    nodes = {p: direct(cluster, p) for p in cluster.ports}
    attempts = []
    try:
        b.call(lambda: 1)  # scripts loaded, snapshot known: the steady state
        for _ in range(3):
            for c in nodes.values():
                c.config_resetstat()
            for _ in range(n):
                assert b.call(lambda: 1) == 1
            stats = {p: {k: int(v["calls"]) for k, v in c.info("commandstats").items()}
                     for p, c in nodes.items()}
            attempts.append(stats)
            evalsha = {p: st.get("cmdstat_evalsha", 0) for p, st in stats.items()}
            if evalsha == {p: (n if p == port else 0) for p in cluster.ports}:
                break
            # a repeated measurement saw at most one extra, from the listener
            assert sum(evalsha.values()) <= n + 1, attempts
        else:
            raise AssertionError(f"not one EVALSHA per call on {port}: {attempts}")
        client_side = set(stats[port]) - SCRIPT_INTERNAL - {
            "cmdstat_evalsha", "cmdstat_config|resetstat", "cmdstat_info"}
        assert client_side == set(), stats[port]
    finally:
        b.close()
        for c in nodes.values():
            c.close()


# -- manager ----------------------------------------------------------------------------------


def test_manager_on_the_cluster(cluster: ClusterTopology, rc: RedisCluster) -> None:
    placed = names_per_node(cluster, "vendor", fmt=lambda p: f"provider_{p}")
    order = [placed[p] for p in cluster.ports]  # primary, secondary, tertiary: one per node
    cfg = CircuitBreakerConfig(**{**LIFECYCLE, "recovery_timeout": 30.0})
    mgr = CircuitBreakerManager(rc, cfg)
    other_client = RedisCluster(host=HOST, port=cluster.ports[1])
    other = CircuitBreakerManager(other_client, cfg)
    try:
        for i, p in enumerate(order):
            mgr.register_provider(p, priority=i)
            other.register_provider(p, priority=i)
        assert mgr.get_system_health()["status"] == "healthy"
        used: list[str] = []

        def synth(provider: Any) -> str:
            used.append(str(provider))
            if provider == order[0]:
                raise Boom
            return f"audio from {provider}"

        for _ in range(3):  # the first provider fails each time; the second serves
            assert mgr.call_with_fallback(None, synth) == f"audio from {order[1]}"
        assert used == [order[0], order[1]] * 3
        assert mgr.get_breaker(order[0]).get_state() is CircuitState.OPEN
        used.clear()
        assert mgr.call_with_fallback(None, synth) == f"audio from {order[1]}"
        assert used == [order[1]]  # open: not even tried

        # another process's manager (another client, another startup node) sees it
        wait_for(lambda: other.get_all_available_providers() == order[1:], 5,
                 "the trip to reach the other manager")
        h = other.get_system_health()
        assert h["status"] == "degraded" and h["store"] == "redis"
        assert not h["store_degraded"]
        first = h["providers"][order[0]]
        assert first["state"] == "open" and first["available"] is False
        assert first["consecutive_failures"] is not None
        assert h["providers"][order[1]]["window_calls"] == 4
        assert h["providers"][order[2]]["state"] == "closed"
        assert h["available_providers"] == 2 and h["total_providers"] == 3
        json.dumps(h)
        # each provider's state lives on its own primary (the third was never called,
        # and reads do not create keys)
        want = {order[0]: "open", order[1]: "closed", order[2]: None}
        for port, p in placed.items():
            assert hget_on(cluster, port, keys_of(f"provider_{p}")[0], "state") == want[p]

        for p in order:
            mgr.get_breaker(p).force_open()
        wait_for(lambda: other.get_all_available_providers() == [], 5, "force_open to arrive")
        assert other.get_system_health()["status"] == "critical"
        mgr.reset_all()
        wait_for(lambda: other.get_all_available_providers() == order, 5, "reset to arrive")
        assert other.get_system_health()["status"] == "healthy"
    finally:
        mgr.close()
        other.close()
        other_client.close()


# -- many processes --------------------------------------------------------------------------


def _worker_argv(spec: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__)), json.dumps(spec)]


@pytest.mark.multiprocess
def test_a_trip_in_one_process_reaches_pollers_connected_through_every_primary(
        cluster: ClusterTopology) -> None:
    chan_port = cluster.slot_owner(key_slot(CHANNEL.encode()))
    placed = names_per_node(cluster, "mp")
    breaker_port = next(p for p in cluster.ports if p != chan_port)
    trip_port = next(p for p in cluster.ports if p not in (chan_port, breaker_port))
    name = placed[breaker_port]
    cfg = dict(LIFECYCLE, recovery_timeout=30.0)
    # let this process's own listeners (of breakers closed by earlier tests) wind down,
    # so that the subscriber count below moves only with the pollers
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(
            t.name.startswith("distbreaker-listener") for t in threading.enumerate()):
        time.sleep(0.05)
    numsub = direct(cluster, chan_port)
    base = dict(numsub.pubsub_numsub(CHANNEL))[CHANNEL]
    pollers: list[Worker] = []
    tripper: Worker | None = None
    try:
        for port in cluster.ports:
            pollers.append(Worker(_worker_argv(
                {"mode": "poll", "port": port, "name": name, "config": cfg})))
        for w in pollers:
            assert w.expect("ready", 30)["a"] is True
        # every poller's listener is subscribed, on the node the channel hashes to
        wait_for(lambda: dict(numsub.pubsub_numsub(CHANNEL))[CHANNEL] >= base + 3, 10,
                 "the pollers to subscribe")
        # ... and nobody listens on the breaker's own primary, where the script publishes
        on_breaker = direct(cluster, breaker_port)
        assert dict(on_breaker.pubsub_numsub(CHANNEL))[CHANNEL] == 0
        on_breaker.close()
        tripper = Worker(_worker_argv(
            {"mode": "trip", "port": trip_port, "name": name, "config": cfg}))
        tripped = tripper.expect("tripped", 30)
        assert tripped["state"] == "open"
        assert hget_on(cluster, breaker_port, keys_of(name)[0], "state") == "open"
        for w in pollers:
            ev = w.expect("avail", 5)
            assert ev["a"] is False and ev["state"] == "open", ev
            assert ev["t"] - tripped["t"] < 3.0, (ev, tripped)
        tripper.send("reset")
        reset = tripper.expect("reset", 10)
        for w in pollers:
            ev = w.expect("avail", 5)
            assert ev["a"] is True and ev["state"] == "closed", ev
            assert ev["t"] - reset["t"] < 3.0, (ev, reset)
        tripper.finish()
        results = [w.finish() for w in pollers]
    finally:
        for w in [*pollers, *([tripper] if tripper else [])]:
            w.kill()
        numsub.close()
    for w, r in zip(pollers, results, strict=True):
        assert r["unexpected"] == [], r
        assert r["degraded"] is False, w.stderr
        assert r["startup_port"] in cluster.ports
        assert "Traceback" not in w.stderr, w.stderr
    assert sorted(r["startup_port"] for r in results) == sorted(cluster.ports)


# -- the worker process ----------------------------------------------------------------------


def _emit(**obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _worker_main(spec: dict[str, Any]) -> int:
    """``poll``: watch is_available() every 2 ms, print each change, until stdin closes.
    ``trip``: fail `failure_threshold` calls, print when done; on ``reset`` from stdin,
    reset the breaker. Both connect through the primary on `port` as startup node."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    stop = stdin_closed_event()
    client = RedisCluster(host=HOST, port=spec["port"])
    cfg = CircuitBreakerConfig(**spec["config"])
    b = CircuitBreaker(spec["name"], cfg, redis=client)
    unexpected: list[str] = []
    if spec["mode"] == "poll":
        last = b.is_available()
        _emit(kind="ready", a=last, state=b.get_state().value)
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            a = b.is_available()
            if a != last:
                _emit(kind="avail", t=time.monotonic(), a=a, state=b.get_state().value)
                last = a
            time.sleep(0.002)
    else:
        for _ in range(cfg.failure_threshold):
            try:
                b.call(boom)
            except Boom:
                pass
            except Exception as e:
                unexpected.append(repr(e))
        _emit(kind="tripped", t=time.monotonic(), state=b.get_state().value)
        while not stop.is_set():
            try:
                line = stop.lines.get(timeout=0.05)  # type: ignore[attr-defined]
            except Exception:
                continue
            if line == "reset":
                t = time.monotonic()
                b.reset()
                _emit(kind="reset", t=t)
    _emit(kind="result", unexpected=unexpected, degraded=b.store_degraded,
          startup_port=spec["port"])
    b.close()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(json.loads(sys.argv[1])))


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_redis_timeout_applies_to_cluster_clients(cluster: ClusterTopology,
                                                        kind: str) -> None:
    """A paused shard costs a caller at most redis_timeout, then the fallback answers."""
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    name = f"paused-{kind}-{uuid.uuid4().hex[:6]}"
    # failover_after below redis_timeout: the first unanswered call is evidence enough
    cfg = CircuitBreakerConfig(failure_threshold=3, redis_timeout=0.05, failover_after=0.01)
    if kind == "sync":
        c: Any = RedisCluster(host=HOST, port=cluster.ports[0])
        b: Any = CircuitBreaker(name, cfg, redis=c)
        b.call(lambda: 1)
    else:
        c = AsyncRedisCluster(host=HOST, port=cluster.ports[0])
        b = AsyncCircuitBreaker(name, cfg, redis=c)

        async def one() -> int:
            return 1

        await b.call(one)
    assert b._store.client is not c  # a short-timeout copy, not the user's client
    owner = RedisCluster(host=HOST, port=cluster.ports[0]).get_node_from_key(keys_of(name)[0])
    direct(cluster, owner.port).execute_command("CLIENT", "PAUSE", 1000, "ALL")
    t0 = time.perf_counter()
    if kind == "sync":
        b.call(lambda: 1)
    else:
        await b.call(one)
    assert time.perf_counter() - t0 < 0.5
    assert b.store_degraded
    time.sleep(1.2)
    for _ in range(3):
        if kind == "sync":
            b.call(lambda: 1)
        else:
            await b.call(one)
        time.sleep(0.3)
    assert not b.store_degraded
    if kind == "sync":
        b.close()
    else:
        await b.close()
        await c.aclose()
