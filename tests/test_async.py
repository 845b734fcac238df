"""AsyncCircuitBreaker: the same logic through the asyncio shell, on every store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis
from fake import fake_server

from distbreaker import (
    AsyncCircuitBreaker,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitOpenError,
    CircuitState,
    MemoryStore,
)

T0 = 1_700_000_000_000

Factory = Callable[..., AsyncCircuitBreaker]


@pytest.fixture(params=["memory", "fakeredis", "redis"])
async def amake(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    made: list[AsyncCircuitBreaker] = []
    clients: list[Any] = []
    if request.param == "memory":
        store = MemoryStore()

        def backend() -> Any:
            return store
    elif request.param == "fakeredis":
        server = fake_server()

        def backend() -> Any:
            c = fakeredis.FakeAsyncRedis(server=server)
            clients.append(c)
            return c
    else:
        port = request.getfixturevalue("redis_client").connection_pool.connection_kwargs["port"]

        def backend() -> Any:
            c = aioredis.Redis(port=port)
            clients.append(c)
            return c

    def factory(name: str = "asvc", cfg: CircuitBreakerConfig | None = None,
                **kw: Any) -> AsyncCircuitBreaker:
        b = AsyncCircuitBreaker(name, cfg or CircuitBreakerConfig(), redis=backend(), **kw)
        b.set_test_clock(T0)
        made.append(b)
        return b

    factory.kind = request.param  # type: ignore[attr-defined]
    yield factory
    for b in made:
        await b.close()
    await asyncio.sleep(0)
    for c in clients:
        await c.aclose()


def cfg(**kw: Any) -> CircuitBreakerConfig:
    base: dict[str, Any] = dict(failure_threshold=3, recovery_timeout=10.0, success_threshold=1,
                                minimum_calls=100, backoff_jitter=0.0, max_staleness=60.0,
                                redis_timeout=2.0)  # semantics, not deadlines (see test_contract)
    base.update(kw)
    return CircuitBreakerConfig(**base)


async def boom() -> None:
    raise RuntimeError("boom")


async def one() -> int:
    return 1


async def at(ms: int, *bs: AsyncCircuitBreaker) -> None:
    for b in bs:
        b.set_test_clock(T0 + ms)
        await b.refresh()


async def test_trip_reject_probe_close(amake: Factory) -> None:
    changes: list[tuple[Any, ...]] = []
    b = amake(cfg=cfg(), on_state_change=lambda *a: changes.append(a))
    for _ in range(3):
        with pytest.raises(RuntimeError):
            await b.call(boom)
    assert b.get_state() is CircuitState.OPEN and not b.is_available()
    with pytest.raises(CircuitOpenError) as ei:
        await b.call(one)
    assert ei.value.retry_after is not None and 9 < ei.value.retry_after <= 10
    await at(10_000, b)
    assert await b.call(one) == 1
    assert b.get_state() is CircuitState.CLOSED
    assert [c[2] for c in changes] == [CircuitState.OPEN, CircuitState.HALF_OPEN,
                                       CircuitState.CLOSED]


async def test_first_call_asks_the_store(amake: Factory) -> None:
    a = amake(cfg=cfg())
    await a.force_open()
    late = amake(cfg=cfg())
    assert not late.snapshot.known
    with pytest.raises(CircuitOpenError) as ei:
        await late.call(one)
    assert ei.value.retry_after is None
    assert not late.is_available()
    await a.release()
    await at(0, late)
    assert await late.call(one) == 1


async def test_timeout_cancels_and_counts_as_failure(amake: Factory) -> None:
    cancelled = []

    async def slow() -> None:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    b = amake(cfg=cfg(failure_threshold=1, timeout_duration=0.05))
    with pytest.raises(asyncio.TimeoutError):
        await b.call(slow)
    assert cancelled == [True]
    assert b.get_state() is CircuitState.OPEN
    assert (await b.get_metrics()).timeouts == 1


async def test_cancelled_probe_returns_the_lease(amake: Factory) -> None:
    a, b = amake(cfg=cfg(probe_lease=60)), amake(cfg=cfg(probe_lease=60))
    await a.force_open()
    await a.release()  # underlying state closed; trip it properly instead
    for _ in range(3):
        with pytest.raises(RuntimeError):
            await a.call(boom)
    await at(10_000, a, b)
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(a.call(hang))
    await started.wait()
    with pytest.raises(CircuitOpenError):
        await b.call(one)  # the one permit is held
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await at(10_000, b)
    assert await b.call(one) == 1  # the lease came back on cancellation
    assert b.get_state() is CircuitState.CLOSED


async def test_protect_and_decorator(amake: Factory) -> None:
    b = amake(cfg=cfg())

    @b
    async def double(x: int) -> int:
        return 2 * x

    assert await double(4) == 8
    async with b.protect() as permit:
        permit.mark_failure()
    with pytest.raises(KeyError):
        async with b.protect():
            raise KeyError("x")
    m = await b.get_metrics()
    assert (m.successful_calls, m.failed_calls) == (1, 2)
    assert m.fleet is not None and m.fleet.consecutive_failures == 2
    with pytest.raises(TypeError):
        b(lambda: 1)  # type: ignore[arg-type, return-value]


async def test_reset_and_force_closed(amake: Factory) -> None:
    b = amake(cfg=cfg())
    await b.force_closed()
    for _ in range(5):
        with pytest.raises(RuntimeError):
            await b.call(boom)
    assert b.get_state() is CircuitState.CLOSED
    await b.reset()
    m = await b.get_metrics()
    assert m.total_calls == 0 and m.fleet is not None and m.fleet.calls == 0


async def test_sync_and_async_breakers_share_state(redis_client: Any) -> None:
    port = redis_client.connection_pool.connection_kwargs["port"]
    c = aioredis.Redis(port=port)
    s = CircuitBreaker("mixed", cfg(), redis=redis_client)
    a = AsyncCircuitBreaker("mixed", cfg(), redis=c)
    s.force_open()
    await a.refresh()
    assert a.get_state() is CircuitState.OPEN
    await a.release()
    assert s.refresh() is CircuitState.CLOSED
    s.close()
    await a.close()
    await c.aclose()


async def test_push_reaches_an_idle_async_breaker(redis_client: Any) -> None:
    port = redis_client.connection_pool.connection_kwargs["port"]
    c = aioredis.Redis(port=port)
    a = AsyncCircuitBreaker("pushed", cfg(), redis=c)
    await a.refresh()  # starts the listener
    await asyncio.sleep(0.1)
    s = CircuitBreaker("pushed", cfg(), redis=redis_client)
    s.force_open()
    for _ in range(200):
        if not a.is_available():
            break
        await asyncio.sleep(0.01)
    assert not a.is_available() and a.get_state() is CircuitState.OPEN
    s.close()
    await a.close()
    await asyncio.sleep(0.05)
    await c.aclose()


async def test_cancelled_during_acquire_gives_the_lease_back(amake: Factory) -> None:
    a, b = amake(cfg=cfg(probe_lease=60)), amake(cfg=cfg(probe_lease=60))
    for _ in range(3):
        with pytest.raises(RuntimeError):
            await a.call(boom)
    await at(10_000, a, b)
    gate = asyncio.Event()
    admin = None
    if amake.kind == "redis":  # type: ignore[attr-defined]
        # a real late reply: Redis holds the acquire (a write) for 300 ms
        admin = redis.Redis(port=a._store.client.connection_pool.connection_kwargs["port"])
        admin.client_pause(300, all=False)
    else:
        real_run = a._store.run

        async def slow_run(call: Any) -> Any:
            if call.op == "acquire":
                raw = await real_run(call)  # the lease is granted in the store...
                await gate.wait()  # ...but the reply is late
                return raw
            return await real_run(call)

        a._store.run = slow_run  # type: ignore[method-assign]
    task = asyncio.create_task(a.call(one))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    if admin is not None:  # the pause ends, the acquire runs, its late reply gives it back
        await asyncio.sleep(0.4)
        for _ in range(200):
            if admin.zcard(a.keys.probes) == 0:
                break
            await asyncio.sleep(0.01)
        admin.close()
    for _ in range(100):  # the reply lands, the lease goes back
        await asyncio.sleep(0.01)
        if not a._engine.background:
            break
    await at(10_000, b)
    assert await b.call(one) == 1  # b got the probe: a's lease was returned


async def test_two_step_admit_finish(amake: Factory) -> None:
    b = amake(cfg=cfg())
    p = await b.admit()
    await b.finish(p, RuntimeError("x"))
    p = await b.admit()
    p.mark_ignored()
    await b.finish(p)
    m = await b.get_metrics()
    assert (m.failed_calls, m.ignored_calls) == (1, 1)


async def test_strict_call_after_function_flush_loads_once_and_counts_once(
        redis_client: redis.Redis) -> None:
    """A request written at once whose reply says the library is gone (FUNCTION FLUSH,
    SCRIPT FLUSH, a restart without persistence): it did not run, so it is loaded and
    sent again, and the outcome is counted once."""
    port = redis_client.connection_pool.connection_kwargs["port"]
    c = aioredis.Redis(port=port)
    b = AsyncCircuitBreaker("aflush", cfg(), redis=c)
    try:
        for _ in range(3):
            assert await b.call(one) == 1
        redis_client.function_flush()
        redis_client.script_flush()
        redis_client.config_resetstat()
        assert await b.call(one) == 1
        stats = redis_client.info("commandstats")
        assert stats["cmdstat_function|load"]["calls"] == 1
        w = redis_client.hgetall("distbreaker:v1:{aflush}:window")
        assert w[b"c"] == b"4", w
        assert b.get_metrics().store_failovers == 0
    finally:
        await b.close()
        await c.aclose()
