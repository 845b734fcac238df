"""The stores' own idle connections (`_clients.IdleConnections`), on a real redis-server.

A strict call takes its connection from a deque the store keeps, not from redis-py's pool
(whose get and release cost about a tenth of the call). What the pool guaranteed must
still hold: one connection serves calls one after another, a connection the server closed
while idle costs no call anything (no failure, no failover), and a forked child never
touches its parent's sockets.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aredis
from polling import until

from distbreaker import AsyncCircuitBreaker, CircuitBreaker, CircuitBreakerConfig

from redis_server import RedisServer

CFG = CircuitBreakerConfig(consistency="strict", redis_timeout=2.0, max_staleness=60.0)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    s = RedisServer().start()
    yield s
    s.stop()


def _conns(admin: redis.Redis) -> set[int]:
    """The ids of the connections that ran a script call (the callers' and the
    listener's re-reads), the admin's own left out."""
    return {int(c["id"]) for c in admin.client_list(_type="normal") if c.get("cmd") == "fcall"}


def _kill_callers(admin: redis.Redis) -> None:
    for i in _conns(admin):
        admin.client_kill_filter(_id=i)


def test_sequential_strict_calls_share_one_connection(server: RedisServer) -> None:
    admin = server.client()
    b = CircuitBreaker("one-conn", CFG, redis=redis.Redis(port=server.port))
    try:
        for _ in range(10):
            assert b.call(lambda: 1) == 1
        before = _conns(admin)
        for _ in range(300):
            assert b.call(lambda: 1) == 1
        assert _conns(admin) == before  # not one connection more
        assert len(before) <= 2  # the caller's, and the listener's first re-read
    finally:
        b.close()


def test_a_connection_the_server_closed_while_idle_costs_no_call(server: RedisServer) -> None:
    admin = server.client()
    b = CircuitBreaker("killed-idle", CFG, redis=redis.Redis(port=server.port))
    try:
        assert b.call(lambda: 1) == 1
        for _ in range(5):
            _kill_callers(admin)
            for _ in range(10):
                assert b.call(lambda: 1) == 1
        m = b.get_metrics()
        assert (m.successful_calls, m.store_failovers, m.unshared_outcomes,
                m.lost_outcomes) == (51, 0, 0, 0)
    finally:
        b.close()


def test_the_asyncio_store_keeps_its_connections_the_same_way(server: RedisServer) -> None:
    admin = server.client()

    async def ok() -> int:
        return 1

    async def go() -> None:
        b = AsyncCircuitBreaker("a-killed-idle", CFG, redis=aredis.Redis(port=server.port))
        try:
            for _ in range(10):
                assert await b.call(ok) == 1
            before = _conns(admin)
            for _ in range(90):
                assert await b.call(ok) == 1
            assert _conns(admin) == before
            assert len(before) <= 2
            for _ in range(5):
                _kill_callers(admin)
                for _ in range(10):
                    assert await b.call(ok) == 1
            m = b.get_metrics()
            assert (m.successful_calls, m.store_failovers, m.unshared_outcomes,
                    m.lost_outcomes) == (150, 0, 0, 0)
        finally:
            await b.close()

    asyncio.run(go())


@pytest.mark.multiprocess
def test_a_forked_child_never_uses_its_parents_connection(server: RedisServer) -> None:
    """Parent and child call at the same time after the fork; on a shared socket their
    requests and replies would interleave (wrong replies, timeouts, failovers)."""
    b = CircuitBreaker("forked-idle", CFG, redis=redis.Redis(port=server.port))
    try:
        for _ in range(10):
            assert b.call(lambda: 1) == 1  # the parent's idle connection exists
        admin = server.client()
        parents = _conns(admin)
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                for _ in range(300):
                    b.call(lambda: 1)
                m = b.get_metrics()
                code = 0 if (m.store_failovers, m.lost_outcomes) == (0, 0) else 2
            finally:
                os._exit(code)
        for _ in range(300):
            assert b.call(lambda: 1) == 1
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        m = b.get_metrics()
        assert (m.successful_calls, m.store_failovers, m.lost_outcomes) == (310, 0, 0)
        assert until(lambda: _conns(admin) == parents, 5.0)  # the child's went with it
    finally:
        b.close()


def test_more_requests_in_flight_than_redis_py_s_default_cap(server: RedisServer) -> None:
    """Our clients have no connection cap: a request whose caller went on holds its
    connection until the reply. redis-py 8 reads max_connections=None as 100, so 150
    calls in flight during a pause failed over with "Too many connections" while Redis
    was merely paused."""
    admin = server.client()
    cfg = CircuitBreakerConfig(consistency="strict", redis_timeout=3.0, max_staleness=60.0,
                               failure_threshold=1000, minimum_calls=100_000)

    async def ok() -> int:
        return 1

    async def go() -> None:
        b = AsyncCircuitBreaker("many-in-flight", cfg, redis=aredis.Redis(port=server.port))
        try:
            assert await b.call(ok) == 1
            admin.client_pause(500, all=False)  # writes wait: every record is in flight
            got = await asyncio.gather(*(b.call(ok) for _ in range(150)))
            assert got == [1] * 150
            m = b.get_metrics()
            assert (m.successful_calls, m.store_failovers, m.unshared_outcomes,
                    m.lost_outcomes) == (151, 0, 0, 0)
        finally:
            await b.close()

    asyncio.run(go())
