"""A transition storm: many breakers on one client, all tripped at once.

The listener's cost per message must not grow with the number of breakers it holds: it
once walked every breaker (and scanned every snapshot's age) for each message, so 200
trips arriving together cost 200 walks of 200 breakers, and a fleet saw the last trip
seconds late. Counts, not timings: the walks a storm costs, and that every breaker saw
its trip. (benchmarks/bench_storm.py measures the latency across processes.)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis
import redis.asyncio as aredis
from polling import until

from distbreaker import AsyncCircuitBreaker, CircuitBreaker, CircuitBreakerConfig
from distbreaker._listener import Hub

from redis_server import RedisServer

N = 200
CFG = CircuitBreakerConfig(max_staleness=2.0)  # a tick of 0.5 s


def _count_walks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    walks = [0]
    orig = Hub.members

    def counted(self: Hub) -> Any:
        walks[0] += 1
        return orig(self)

    monkeypatch.setattr(Hub, "members", counted)
    return walks


def _operator(server: RedisServer, names: list[str]) -> None:
    """Another process's view (its own client, so its own listener): force all open."""
    r = redis.Redis(port=server.port)
    ops = [CircuitBreaker(n, CFG, redis=r) for n in names]
    for b in ops:
        b.force_open()
    for b in ops:
        b.close()
    r.close()


def test_a_storm_costs_the_sync_listener_no_walk_per_message(
        redis_server: RedisServer, redis_client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"storm-{i}" for i in range(N)]
    fleet = [CircuitBreaker(n, CFG, redis=redis_client) for n in names]
    assert until(lambda: redis_client.pubsub_numsub("distbreaker:v1:events")[0][1] >= 1, 10)
    time.sleep(0.6)  # the subscription's first re-read of every breaker is done
    walks = _count_walks(monkeypatch)
    t0 = time.monotonic()
    _operator(redis_server, names)
    assert until(lambda: not any(b.is_available() for b in fleet), 10)
    took = time.monotonic() - t0
    # two listeners (the fleet's, the operator's): a walk per tick each while the storm
    # lasts, and the operator's subscription; before, one walk per message (400 here)
    assert walks[0] <= 4 + 4 * (took / 0.5), (walks[0], took)
    for b in fleet:
        b.close()


async def test_a_storm_costs_the_asyncio_listener_no_walk_per_message(
        redis_server: RedisServer, redis_client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"astorm-{i}" for i in range(N)]
    client = aredis.Redis(port=redis_server.port)
    fleet = [AsyncCircuitBreaker(n, CFG, redis=client) for n in names]
    await fleet[0].refresh()  # starts the listener task
    deadline = time.monotonic() + 10
    while redis_client.pubsub_numsub("distbreaker:v1:events")[0][1] < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.6)
    walks = _count_walks(monkeypatch)
    t0 = time.monotonic()
    await asyncio.to_thread(_operator, redis_server, names)
    deadline = time.monotonic() + 10
    while any(b.is_available() for b in fleet):
        assert time.monotonic() < deadline, "not every breaker saw its trip"
        await asyncio.sleep(0.01)
    took = time.monotonic() - t0
    # two listeners (the fleet's, the operator's): a walk per tick each while the storm
    # lasts, and the operator's subscription; before, one walk per message (400 here)
    assert walks[0] <= 4 + 4 * (took / 0.5), (walks[0], took)
    for b in fleet:
        await b.close()
    await client.aclose()
