"""The provider layer: ProviderType, ProviderCircuitBreaker, managers, globals, decorator."""

from __future__ import annotations

import json
import logging
from typing import Any

import fakeredis
import pytest
from fake import fake_server

import distbreaker
from distbreaker import (
    AllProvidersUnavailableError,
    AsyncCircuitBreakerManager,
    AsyncProviderCircuitBreaker,
    CircuitBreakerConfig,
    CircuitBreakerManager,
    CircuitOpenError,
    CircuitState,
    ProviderCircuitBreaker,
    ProviderType,
    circuit_breaker_protect,
    configure,
    get_circuit_breaker_manager,
    initialize_provider_circuit_breakers,
)
from distbreaker import providers as providers_mod

CFG = CircuitBreakerConfig(failure_threshold=2, recovery_timeout=30, max_staleness=60)


class VendorDown(Exception):
    pass


def test_provider_types_and_names() -> None:
    for v in ("openai", "google", "azure", "yandex", "elevenlabs", "deepgram"):
        assert ProviderType(v).value == v
    b = ProviderCircuitBreaker(ProviderType.OPENAI, CFG)
    assert b.name == "provider_openai" and b.provider == "openai"
    assert ProviderCircuitBreaker("my_vendor").name == "provider_my_vendor"
    with pytest.raises(ValueError):
        ProviderCircuitBreaker("")


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_protect_with_and_records(backend: str, request: pytest.FixtureRequest) -> None:
    client = None if backend == "memory" else request.getfixturevalue("redis_client")
    b = ProviderCircuitBreaker(ProviderType.AZURE, CFG, redis=client)
    with b.protect():
        pass
    for _ in range(2):
        with pytest.raises(VendorDown), b.protect():
            raise VendorDown
    assert b.get_state() is CircuitState.OPEN
    with pytest.raises(CircuitOpenError), b.protect():
        pytest.fail("must not run")
    b.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_protect_async_with_on_a_sync_breaker(backend: str,
                                                    request: pytest.FixtureRequest) -> None:
    client = None if backend == "memory" else request.getfixturevalue("redis_client")
    b = ProviderCircuitBreaker("deepgram", CFG, redis=client)
    async with b.protect() as permit:
        assert not permit.is_probe
    for _ in range(2):
        with pytest.raises(VendorDown):
            async with b.protect():
                raise VendorDown
    with pytest.raises(CircuitOpenError):
        async with b.protect():
            pytest.fail("must not run")
    m = b.get_metrics()
    assert (m.successful_calls, m.failed_calls, m.rejected_calls) == (1, 2, 1)
    b.close()


def test_manager_registration_order_and_availability() -> None:
    m = CircuitBreakerManager(default_config=CFG)
    m.register_provider(ProviderType.OPENAI)
    m.register_provider("google")
    m.register_provider(ProviderType.AZURE, priority=-1)
    assert m.providers == [ProviderType.AZURE, ProviderType.OPENAI, "google"]
    assert m.get_breaker("openai") is m.get_breaker(ProviderType.OPENAI)
    m.get_breaker(ProviderType.OPENAI).force_open()
    assert m.get_all_available_providers() == [ProviderType.AZURE, "google"]
    h = m.get_system_health()
    json.dumps(h)
    assert h["status"] == "degraded"
    assert h["providers"]["openai"]["override"] == "open"
    assert h["providers"]["openai"]["available"] is False
    assert h["providers"]["google"]["state"] == "closed"
    for p in m.providers:
        m.get_breaker(p).force_open()
    assert m.get_system_health()["status"] == "critical"
    m.reset_all()
    assert m.get_system_health()["status"] == "healthy"
    # re-registering with another config replaces the breaker
    other = CircuitBreakerConfig(failure_threshold=9)
    assert m.register_provider("google", other).config.failure_threshold == 9


def test_call_with_fallback_records_and_moves_on(redis_client: Any) -> None:
    m = CircuitBreakerManager(redis_client, CFG)
    calls: list[str] = []

    def stt(p: Any) -> str:
        calls.append(str(p))
        if str(p) == "openai":
            raise VendorDown("503")
        return f"text from {p}"

    order = [ProviderType.OPENAI, ProviderType.GOOGLE]
    assert m.call_with_fallback(order, stt) == "text from google"
    assert m.call_with_fallback(order, stt) == "text from google"
    assert m.get_breaker("openai").get_state() is CircuitState.OPEN
    assert m.call_with_fallback(order, stt) == "text from google"
    assert calls == ["openai", "google", "openai", "google", "google"]  # no 3rd openai call
    m.get_breaker("google").force_open()
    with pytest.raises(AllProvidersUnavailableError) as ei:
        m.call_with_fallback(order, stt)
    assert set(ei.value.causes) == {"openai", "google"}
    assert all(isinstance(e, CircuitOpenError) for e in ei.value.causes.values())
    m.close()


async def test_async_manager(redis_client: Any) -> None:
    import redis.asyncio as aioredis

    c = aioredis.Redis(port=redis_client.connection_pool.connection_kwargs["port"])
    m = AsyncCircuitBreakerManager(c, CFG)
    assert isinstance(m.register_provider("openai"), AsyncProviderCircuitBreaker)

    async def tts(p: Any) -> str:
        if str(p) == "openai":
            raise VendorDown
        return str(p)

    for _ in range(3):
        assert await m.call_with_fallback(["openai", ProviderType.ELEVENLABS], tts) == "elevenlabs"
    assert m.get_breaker("openai").get_state() is CircuitState.OPEN
    h = await m.get_system_health()
    assert h["status"] == "degraded" and h["store"] == "redis"
    await m.reset_all()
    with pytest.raises(AllProvidersUnavailableError):
        await m.call_with_fallback(["openai"], tts)
    await m.close()
    await c.aclose()


async def test_sync_manager_async_fallback() -> None:
    m = CircuitBreakerManager(default_config=CFG)

    async def fn(p: Any) -> str:
        if p == "a":
            raise VendorDown
        return str(p)

    assert await m.acall_with_fallback(["a", "b"], fn) == "b"


@pytest.fixture
def fresh_global(monkeypatch: pytest.MonkeyPatch) -> Any:
    from distbreaker._process import PROCESS

    monkeypatch.setattr(PROCESS, "manager", None)
    monkeypatch.delenv("DISTBREAKER_REDIS_URL", raising=False)
    return providers_mod


def test_global_manager_without_redis_warns(fresh_global: Any,
                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "distbreaker"):
        m = get_circuit_breaker_manager()
    assert m is get_circuit_breaker_manager()
    assert "in-process store" in caplog.text
    m2 = initialize_provider_circuit_breakers()
    assert m2 is m and {str(p) for p in m.providers} == {p.value for p in ProviderType}


def test_global_manager_from_env(fresh_global: Any, redis_server: Any,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTBREAKER_REDIS_URL", redis_server.url)
    m = get_circuit_breaker_manager()
    assert m.get_system_health()["store"] == "redis"
    with pytest.raises(ValueError, match="Redis URL"):
        configure(url="localhost:6379")


def test_decorator_sync_and_async(fresh_global: Any) -> None:
    configure(redis=fakeredis.FakeRedis(server=fake_server()), default_config=CFG)

    @circuit_breaker_protect(ProviderType.YANDEX)
    def recognize(x: int) -> int:
        if x < 0:
            raise VendorDown
        return x

    @circuit_breaker_protect("yandex")
    async def arecognize(x: int) -> int:
        if x < 0:
            raise VendorDown
        return x

    import asyncio

    assert recognize(3) == 3
    assert asyncio.run(arecognize(4)) == 4
    with pytest.raises(VendorDown):
        recognize(-1)
    with pytest.raises(VendorDown):
        asyncio.run(arecognize(-1))
    with pytest.raises(CircuitOpenError):
        recognize(1)
    with pytest.raises(CircuitOpenError):
        asyncio.run(arecognize(1))
    assert recognize.__name__ == "recognize"


def test_every_public_name_imports() -> None:
    for name in distbreaker.__all__:
        assert getattr(distbreaker, name) is not None


def test_a_forked_child_gets_its_own_global_manager(fresh_global: Any, redis_server: Any
                                                   ) -> None:
    """The parent's manager (its listener thread, its connections) does not work in a
    forked child: the child's first get_circuit_breaker_manager() builds its own."""
    import os

    parent = configure(url=redis_server.url)
    parent_breaker = parent.get_breaker("openai")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        code = 1
        try:
            os.environ["DISTBREAKER_REDIS_URL"] = redis_server.url
            child = get_circuit_breaker_manager()
            ok = child is not parent and child is get_circuit_breaker_manager()
            ok = ok and child.get_breaker("openai").call(lambda: 7) == 7
            code = 0 if ok else 3
        finally:
            os.write(w, bytes([code]))
            os._exit(code)
    os.close(w)
    got = os.read(r, 1)
    os.waitpid(pid, 0)
    assert got == b"\x00"
    assert get_circuit_breaker_manager() is parent  # the parent's is untouched
    assert parent_breaker.call(lambda: 1) == 1
    parent.close()
