"""The seed's own test categories, written the way a seed user writes them (asyncio first,
the seed's names, nothing distbreaker-specific beyond the imports and a Redis client),
run on the in-process store and on a real redis-server.

Config, metrics, interface, base breaker, provider breaker, manager, globals,
performance (as counts: Redis commands on the fast path), error scenarios.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
import redis

from distbreaker import (
    BaseCircuitBreaker,
    CircuitBreakerConfig,
    CircuitBreakerInterface,
    CircuitBreakerManager,
    CircuitBreakerMetrics,
    CircuitOpenError,
    CircuitState,
    ProviderCircuitBreaker,
    ProviderType,
    circuit_breaker_protect,
    configure,
    get_circuit_breaker_manager,
    initialize_provider_circuit_breakers,
)


@pytest.fixture
def store(backend: Any) -> Any:
    """None: the in-process store; else a real Redis client (the only distbreaker-specific
    line a migrating user adds)."""
    return backend


class VendorError(Exception):
    pass


async def ok() -> str:
    await asyncio.sleep(0)
    return "ok"


async def bad() -> str:
    await asyncio.sleep(0)
    raise VendorError("vendor down")


async def hang() -> str:
    await asyncio.sleep(1.0)
    return "never"


def config(**kw: Any) -> CircuitBreakerConfig:
    base = dict(failure_threshold=3, recovery_timeout=0.2, success_threshold=2,
                timeout_duration=0.1, redis_timeout=2.0)  # semantics, not deadlines
    base.update(kw)
    return CircuitBreakerConfig(**base)


# -- TestCircuitBreakerConfig ------------------------------------------------------------


class TestCircuitBreakerConfig:
    def test_defaults(self) -> None:
        c = CircuitBreakerConfig()
        assert c.failure_threshold > 0 and c.recovery_timeout > 0
        assert c.success_threshold > 0 and c.timeout_duration is None

    def test_custom_values(self) -> None:
        c = CircuitBreakerConfig(failure_threshold=10, recovery_timeout=600,
                                 success_threshold=3, timeout_duration=30.0)
        assert (c.failure_threshold, c.recovery_timeout, c.success_threshold,
                c.timeout_duration) == (10, 600, 3, 30.0)


# -- TestCircuitBreakerMetrics -----------------------------------------------------------


class TestCircuitBreakerMetrics:
    def test_initial_metrics(self) -> None:
        m = CircuitBreakerMetrics()
        assert m.total_requests == 0 and m.failed_requests == 0
        assert m.successful_requests == 0
        assert m.failure_rate == 0.0 and m.success_rate == 1.0

    async def test_rates_are_computed(self, store: Any) -> None:
        b = BaseCircuitBreaker("metrics", config(failure_threshold=100), redis=store)
        for fn in (ok, ok, ok, bad):
            with contextlib.suppress(VendorError):
                await b.call(fn)
        m = b.get_metrics()
        assert (m.total_requests, m.successful_requests, m.failed_requests) == (4, 3, 1)
        assert m.failure_rate == 0.25 and m.success_rate == 0.75
        assert len(m.request_history) == 4 and m.mean_latency_s >= 0
        b.close()


# -- TestCircuitBreakerInterface ---------------------------------------------------------


class TestCircuitBreakerInterface:
    def test_base_breaker_implements_the_interface(self) -> None:
        b = BaseCircuitBreaker("iface", config())
        assert isinstance(b, CircuitBreakerInterface)
        for name in ("call", "is_available", "get_state", "get_metrics", "reset"):
            assert callable(getattr(b, name))
        b.close()


# -- TestBaseCircuitBreaker --------------------------------------------------------------


class TestBaseCircuitBreaker:
    async def test_starts_closed(self, store: Any) -> None:
        b = BaseCircuitBreaker("base-start", config(), redis=store)
        assert b.get_state() is CircuitState.CLOSED and b.state is CircuitState.CLOSED
        assert b.is_available()
        b.close()

    async def test_success_passes_the_result(self, store: Any) -> None:
        b = BaseCircuitBreaker("base-ok", config(), redis=store)
        assert await b.call(ok) == "ok"
        b.close()

    async def test_opens_after_consecutive_failures(self, store: Any) -> None:
        b = BaseCircuitBreaker("base-open", config(), redis=store)
        for _ in range(3):
            with pytest.raises(VendorError):
                await b.call(bad)
        assert b.get_state() is CircuitState.OPEN and not b.is_available()
        b.close()

    async def test_rejects_while_open(self, store: Any) -> None:
        b = BaseCircuitBreaker("base-reject", config(), redis=store)
        for _ in range(3):
            with pytest.raises(VendorError):
                await b.call(bad)
        with pytest.raises(CircuitOpenError):
            await b.call(ok)
        b.close()

    async def test_half_open_then_closed(self, store: Any) -> None:
        b = BaseCircuitBreaker("base-recover", config(), redis=store)
        for _ in range(3):
            with pytest.raises(VendorError):
                await b.call(bad)
        await asyncio.sleep(0.25)
        assert await b.call(ok) == "ok"
        assert b.get_state() is CircuitState.HALF_OPEN
        assert await b.call(ok) == "ok"
        assert b.get_state() is CircuitState.CLOSED
        b.close()

    async def test_half_open_failure_reopens(self, store: Any) -> None:
        b = BaseCircuitBreaker("base-reopen", config(), redis=store)
        for _ in range(3):
            with pytest.raises(VendorError):
                await b.call(bad)
        await asyncio.sleep(0.25)
        with pytest.raises(VendorError):
            await b.call(bad)
        assert b.get_state() is CircuitState.OPEN
        b.close()

    async def test_timeout_counts_as_failure(self, store: Any) -> None:
        b = BaseCircuitBreaker("base-timeout", config(failure_threshold=2), redis=store)
        for _ in range(2):
            with pytest.raises(asyncio.TimeoutError):
                await b.call(hang)
        assert b.get_state() is CircuitState.OPEN
        assert b.get_metrics().failed_requests == 2
        b.close()

    async def test_success_resets_consecutive_failures(self, store: Any) -> None:
        b = BaseCircuitBreaker("base-consec", config(), redis=store)
        for fn in (bad, bad, ok, bad, bad):
            with contextlib.suppress(VendorError):
                await b.call(fn)
        assert b.get_state() is CircuitState.CLOSED
        b.close()

    async def test_reset(self, store: Any) -> None:
        b = BaseCircuitBreaker("base-reset", config(), redis=store)
        for _ in range(3):
            with pytest.raises(VendorError):
                await b.call(bad)
        await b.reset()
        assert b.get_state() is CircuitState.CLOSED
        assert b.get_metrics().total_requests == 0
        b.close()


# -- TestProviderCircuitBreaker ----------------------------------------------------------


class TestProviderCircuitBreaker:
    def test_name_from_provider_type(self, store: Any) -> None:
        pb = ProviderCircuitBreaker(provider_type=ProviderType.OPENAI, config=config(),
                                    redis=store)
        assert pb.name == "provider_openai" and pb.provider_type is ProviderType.OPENAI
        pb.close()

    async def test_protect_records_success(self, store: Any) -> None:
        pb = ProviderCircuitBreaker(ProviderType.GOOGLE, config(), redis=store)
        async with pb.protect():
            await ok()
        assert pb.get_metrics().successful_requests == 1
        pb.close()

    async def test_protect_records_failure_and_opens(self, store: Any) -> None:
        pb = ProviderCircuitBreaker(ProviderType.AZURE, config(), redis=store)
        for _ in range(3):
            with pytest.raises(VendorError):
                async with pb.protect():
                    await bad()
        assert pb.get_state() is CircuitState.OPEN
        with pytest.raises(CircuitOpenError):
            async with pb.protect():
                await ok()
        pb.close()

    async def test_call_awaits_the_coroutine(self, store: Any) -> None:
        pb = ProviderCircuitBreaker(ProviderType.YANDEX, config(failure_threshold=2),
                                    redis=store)
        for _ in range(3):
            with pytest.raises((VendorError, CircuitOpenError)):
                await pb.call(bad)
        m = pb.get_metrics()
        assert (m.successful_requests, m.failed_requests) == (0, 2)
        assert pb.get_state() is CircuitState.OPEN
        pb.close()


# -- TestCircuitBreakerManager -----------------------------------------------------------


class TestCircuitBreakerManager:
    def manager(self, store: Any) -> CircuitBreakerManager:
        m = CircuitBreakerManager(store, config())
        for p in (ProviderType.OPENAI, ProviderType.GOOGLE, ProviderType.AZURE):
            m.register_provider(p)
        return m

    def test_registration_initialises_breakers(self, store: Any) -> None:
        m = self.manager(store)
        b = m.get_breaker(ProviderType.OPENAI)
        assert isinstance(b, ProviderCircuitBreaker) and b.get_state() is CircuitState.CLOSED
        m.close()

    async def test_health_when_all_closed(self, store: Any) -> None:
        m = self.manager(store)
        h = await m.get_system_health()
        assert h["status"] == "healthy" and h["total_providers"] == 3
        m.close()

    async def test_health_degraded_when_one_open(self, store: Any) -> None:
        m = self.manager(store)
        b = m.get_breaker(ProviderType.OPENAI)
        for _ in range(3):
            with pytest.raises(VendorError):
                await b.call(bad)
        h = m.get_system_health()
        assert h["status"] == "degraded" and h["available_providers"] == 2
        m.close()

    async def test_available_providers(self, store: Any) -> None:
        m = self.manager(store)
        b = m.get_breaker(ProviderType.GOOGLE)
        for _ in range(3):
            with pytest.raises(VendorError):
                await b.call(bad)
        avail = await m.get_all_available_providers()
        assert ProviderType.GOOGLE not in avail and len(avail) == 2
        m.close()

    async def test_health_critical_when_none_available(self, store: Any) -> None:
        m = self.manager(store)
        for p in m.providers:
            for _ in range(3):
                with pytest.raises(VendorError):
                    await m.get_breaker(p).call(bad)
        assert (await m.get_system_health())["status"] == "critical"
        m.close()

    async def test_reset_all(self, store: Any) -> None:
        m = self.manager(store)
        for p in m.providers:
            for _ in range(3):
                with pytest.raises(VendorError):
                    await m.get_breaker(p).call(bad)
        await m.reset_all()
        assert all(m.get_breaker(p).get_state() is CircuitState.CLOSED for p in m.providers)
        m.close()


# -- TestGlobalFunctions -----------------------------------------------------------------


class TestGlobalFunctions:
    def test_global_manager_is_a_singleton(self, store: Any) -> None:
        configure(store)
        assert get_circuit_breaker_manager() is get_circuit_breaker_manager()
        configure()

    def test_initialize_registers_every_provider(self, store: Any) -> None:
        configure(store)
        m = initialize_provider_circuit_breakers()
        assert {str(p) for p in m.providers} >= {p.value for p in ProviderType}
        configure()

    async def test_decorator_protects_async_functions(self, store: Any) -> None:
        configure(store, default_config=config(failure_threshold=2))

        @circuit_breaker_protect(ProviderType.DEEPGRAM)
        async def transcribe(fail: bool) -> str:
            if fail:
                raise VendorError("down")
            return "text"

        assert await transcribe(False) == "text"
        for _ in range(2):
            with pytest.raises(VendorError):
                await transcribe(True)
        with pytest.raises(CircuitOpenError):
            await transcribe(False)
        configure()


# -- TestPerformanceRequirements (as counts: timings belong in benchmarks/) -------------


def commands(r: redis.Redis) -> int:
    return int(r.info("stats")["total_commands_processed"])


def one_refresh_in_commands(b: BaseCircuitBreaker, r: redis.Redis) -> int:
    """What one INFO plus one snapshot read cost in Redis commands (a script's inner
    commands count too): the listener re-reads every snapshot once after it subscribes,
    which may fall inside a measurement. Measured, since it is the script's business."""
    before = commands(r)
    b.refresh()
    return commands(r) - before


class TestPerformanceRequirements:
    async def test_availability_check_touches_no_store(self, redis_client: redis.Redis
                                                       ) -> None:
        b = BaseCircuitBreaker("perf-avail", config(), redis=redis_client)
        await b.call(ok)
        allowance = one_refresh_in_commands(b, redis_client)
        before = commands(redis_client)
        for _ in range(10_000):
            assert b.is_available()
        assert commands(redis_client) - before <= allowance
        b.close()

    async def test_rejections_while_open_touch_no_store(self, redis_client: redis.Redis
                                                        ) -> None:
        b = BaseCircuitBreaker("perf-open", config(recovery_timeout=60), redis=redis_client)
        for _ in range(3):
            with pytest.raises(VendorError):
                await b.call(bad)
        allowance = one_refresh_in_commands(b, redis_client)
        before = commands(redis_client)
        for _ in range(1000):
            with pytest.raises(CircuitOpenError):
                await b.call(ok)
        assert commands(redis_client) - before <= allowance
        b.close()


# -- TestErrorScenarios ------------------------------------------------------------------


class TestErrorScenarios:
    async def test_ten_concurrent_operations(self, store: Any) -> None:
        b = BaseCircuitBreaker("err-concurrent", config(failure_threshold=100), redis=store)
        results = await asyncio.gather(*(b.call(ok) for _ in range(10)))
        assert results == ["ok"] * 10
        m = b.get_metrics()
        assert m.total_requests == 10 and m.successful_requests == 10
        b.close()

    async def test_alternating_success_and_failure(self, store: Any) -> None:
        # never 3 failures in a row, and a 50% rate stays under the 60% threshold
        b = BaseCircuitBreaker("err-alternate", config(failure_rate_threshold=0.6),
                               redis=store)
        for i in range(10):
            with contextlib.suppress(VendorError):
                await b.call(bad if i % 2 else ok)
        assert b.get_state() is CircuitState.CLOSED
        m = b.get_metrics()
        assert (m.successful_requests, m.failed_requests) == (5, 5)
        b.close()
