"""Shared fixtures: a private redis-server per session, flushed before each test.

No test skips for lack of Redis: if redis-server cannot start, the fixture fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis
from fake import fake_server

from redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis_server.client()
    c.flushall()
    c.script_flush()  # every test also walks the reload paths (NOSCRIPT,
    c.function_flush()  # "Function not found")
    yield c
    c.close()


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, redis_client: redis.Redis) -> Iterator[Any]:
    """The `redis=` argument of a breaker: None (the in-process store) or a real client."""
    yield None if request.param == "memory" else redis_client


@pytest.fixture
def fake_client() -> Iterator[fakeredis.FakeRedis]:
    server = fake_server()
    c = fakeredis.FakeRedis(server=server)
    yield c
    c.close()
