"""The seed's asyncio usage on the sync breakers (issue 11, first part): an outcome is
recorded only after the work it describes was awaited, and timeouts apply.

Run against the in-process store and a real redis-server.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import pytest

import distbreaker
from distbreaker import (
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitOpenError,
    CircuitState,
    ProviderCircuitBreaker,
    ProviderType,
)


class Boom(Exception):
    pass


async def failing() -> None:
    await asyncio.sleep(0.001)
    raise Boom("vendor down")


async def slow() -> str:
    await asyncio.sleep(0.3)
    return "late"


async def test_sync_breaker_records_an_awaited_failure_not_a_success(backend: Any) -> None:
    pb = ProviderCircuitBreaker(ProviderType.OPENAI, CircuitBreakerConfig(
        failure_threshold=2, max_staleness=60), redis=backend)
    for _ in range(2):
        with pytest.raises(Boom):
            await pb.call(failing)
    assert pb.get_state() is CircuitState.OPEN
    m = pb.get_metrics()
    assert (m.successful_calls, m.failed_calls) == (0, 2)
    with pytest.raises(CircuitOpenError):
        await pb.call(failing)
    pb.close()


async def test_a_callable_returning_a_coroutine_is_awaited_before_recording(
        backend: Any) -> None:
    b = CircuitBreaker("wrapped", CircuitBreakerConfig(failure_threshold=2, max_staleness=60),
                       redis=backend)
    for fn in (lambda: failing(), functools.partial(failing)):
        with pytest.raises(Boom):
            await b.call(fn)
    m = b.get_metrics()
    assert (m.successful_calls, m.failed_calls) == (0, 2)
    assert b.get_state() is CircuitState.OPEN
    b.close()


async def test_timeout_duration_applies_to_coroutines_on_a_sync_breaker(backend: Any) -> None:
    b = CircuitBreaker("timed", CircuitBreakerConfig(timeout_duration=0.05, max_staleness=60),
                       redis=backend)
    t0 = time.perf_counter()
    with pytest.raises(asyncio.TimeoutError):
        await b.call(slow)
    assert time.perf_counter() - t0 < 0.25  # cancelled at the timeout, not after 0.3 s
    m = b.get_metrics()
    assert (m.failed_calls, m.timeouts) == (1, 1)

    @b
    async def decorated() -> str:
        return await slow()

    with pytest.raises(asyncio.TimeoutError):
        await decorated()
    assert b.get_metrics().failed_calls == 2
    b.close()


async def test_the_seed_decorator_applies_the_timeout(backend: Any) -> None:
    distbreaker.configure(backend, default_config=CircuitBreakerConfig(
        timeout_duration=0.05, failure_threshold=2, max_staleness=60))

    @distbreaker.circuit_breaker_protect(ProviderType.OPENAI)
    async def transcribe() -> str:
        return await slow()

    t0 = time.perf_counter()
    with pytest.raises(asyncio.TimeoutError):
        await transcribe()
    assert time.perf_counter() - t0 < 0.25
    b = distbreaker.get_circuit_breaker_manager().get_breaker(ProviderType.OPENAI)
    assert b.get_metrics().failed_calls == 1
    distbreaker.configure()


async def test_an_unawaited_coroutine_call_records_nothing(backend: Any) -> None:
    b = CircuitBreaker("unawaited", CircuitBreakerConfig(max_staleness=60), redis=backend)
    pending = b.call(failing)  # never awaited: no permit, no outcome
    m = b.get_metrics()
    assert (m.total_calls, m.successful_calls, m.failed_calls) == (0, 0, 0)
    pending.close()  # type: ignore[attr-defined]
    b.close()


def test_a_default_never_makes_a_valid_value_of_another_field_fail() -> None:
    c = CircuitBreakerConfig(recovery_timeout=600)  # the seed's users do this
    assert c.effective_max_recovery_timeout == 600
    c = CircuitBreakerConfig(window_type="count", window_size=5)
    assert c.effective_minimum_calls == 5
    c = CircuitBreakerConfig(max_recovery_timeout=2 * 86400.0)
    assert c.effective_key_ttl == 2 * 86400.0
    # explicit values that conflict are still refused, naming both fields
    with pytest.raises(ValueError, match=r"max_recovery_timeout.*recovery_timeout"):
        CircuitBreakerConfig(recovery_timeout=600, max_recovery_timeout=300)
    with pytest.raises(ValueError, match="minimum_calls"):
        CircuitBreakerConfig(window_type="count", window_size=5, minimum_calls=10)
    # the defaults encode as before: processes of older versions see no config drift
    assert CircuitBreakerConfig().script_arg == (
        "5,30000,2,0.5,10,0,10,6000,1.0,1,300000,2.0,0.1,10000,86400000")


def _boom() -> None:
    raise Boom("down")


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_retry_after_in_half_open(backend: Any, timeout: float | None) -> None:
    cfg = CircuitBreakerConfig(failure_threshold=1, recovery_timeout=0.1, max_staleness=60,
                               timeout_duration=timeout)
    a = CircuitBreaker("ho-retry", cfg, redis=backend)
    b = CircuitBreaker("ho-retry", cfg, redis=backend if backend is not None else a._store)
    with pytest.raises(Boom):
        a.call(_boom)
    time.sleep(0.15)
    with a.protect():  # the only probe is out
        for who in (b, b):  # from Redis, then from b's snapshot
            with pytest.raises(CircuitOpenError) as ei:
                who.call(lambda: 1)
            assert ei.value.state is CircuitState.HALF_OPEN
            r = ei.value.retry_after
            assert r is not None
            if timeout is None:
                assert r == 0.0  # not known when the probe's result comes
            else:
                assert 0.0 < r <= timeout  # by the end of its lease at the latest
    a.close()
    b.close()


async def test_an_unawaited_async_reset_still_happens(backend: Any) -> None:
    import redis.asyncio as aredis

    from distbreaker import AsyncCircuitBreaker

    kw = backend.connection_pool.connection_kwargs if backend is not None else {}
    client = None if backend is None else aredis.Redis(host=kw["host"], port=kw["port"])
    b = AsyncCircuitBreaker("forgot-await", CircuitBreakerConfig(max_staleness=60),
                            redis=client)
    await b.force_open()
    assert b.get_state() is CircuitState.OPEN
    b.release()  # a forgotten await: the release happens anyway
    b.reset()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if b.get_state() is CircuitState.CLOSED:
            break
    assert b.get_state() is CircuitState.CLOSED
    assert await b.refresh() is CircuitState.CLOSED  # in the store too
    await b.close()


def test_async_operator_actions_outside_a_loop_say_what_to_use() -> None:
    from distbreaker import AsyncCircuitBreaker

    b = AsyncCircuitBreaker("no-loop", CircuitBreakerConfig())
    with pytest.raises(RuntimeError, match="CircuitBreaker"):
        b.reset()


async def test_metrics_the_seed_way(backend: Any) -> None:
    import redis.asyncio as aredis

    from distbreaker import AsyncCircuitBreaker, CircuitBreakerMetrics

    empty = CircuitBreakerMetrics()  # buildable with no arguments
    assert (empty.total_requests, empty.failure_rate, empty.success_rate) == (0, 0.0, 1.0)
    kw = backend.connection_pool.connection_kwargs if backend is not None else {}
    client = None if backend is None else aredis.Redis(host=kw["host"], port=kw["port"])
    b = AsyncCircuitBreaker("seed-metrics", CircuitBreakerConfig(failure_threshold=10,
                                                                 max_staleness=60),
                            redis=client)

    async def ok() -> int:
        return 1

    for i in range(4):
        if i % 2:
            with pytest.raises(Boom):
                await b.call(failing)
        else:
            await b.call(ok)
    m = b.get_metrics()  # a plain call, no I/O
    assert (m.total_requests, m.successful_requests, m.failed_requests) == (4, 2, 2)
    assert m.failure_rate == 0.5 and m.success_rate == 0.5
    assert [r.outcome for r in m.request_history] == ["success", "failure"] * 2
    assert all(r.latency_s >= 0 and r.at > 0 for r in m.request_history)
    full = await b.get_metrics()  # awaited: with the fleet window
    assert full.fleet is not None and full.total_requests == 4
    await b.close()


async def test_the_async_breaker_guards_a_plain_function_too() -> None:
    from distbreaker import AsyncCircuitBreaker

    b = AsyncCircuitBreaker("plain-on-async", CircuitBreakerConfig(failure_threshold=2))
    assert await b.call(lambda: 5) == 5
    for _ in range(2):
        with pytest.raises(Boom):
            await b.call(_boom)
    assert b.get_state() is CircuitState.OPEN
    m = b.get_metrics()
    assert (m.successful_calls, m.failed_calls) == (1, 2)


def test_call_with_fallback_refuses_a_coroutine_function() -> None:
    from distbreaker import CircuitBreakerManager

    m = CircuitBreakerManager()
    m.register_provider(ProviderType.OPENAI)

    async def fn(p: Any) -> str:
        return "x"

    with pytest.raises(TypeError, match="acall_with_fallback"):
        m.call_with_fallback(None, fn)
    m.close()


async def test_review_fixes_of_the_seed_api(backend: Any) -> None:
    import pickle

    from distbreaker import (
        AsyncCircuitBreaker,
        BaseCircuitBreaker,
        CircuitBreakerManager,
        CircuitBreakerMetrics,
    )

    # a plain function returning an awaitable-but-not-coroutine value is a plain result
    b = CircuitBreaker("plain-result", CircuitBreakerConfig(max_staleness=60), redis=backend)
    other = CircuitBreaker("other", CircuitBreakerConfig(max_staleness=60), redis=backend)
    m = b.call(other.get_metrics)
    assert isinstance(m, CircuitBreakerMetrics)
    assert b.get_metrics().successful_calls == 1
    assert isinstance(b, BaseCircuitBreaker)
    # the seed's names build metrics too
    built = CircuitBreakerMetrics(total_requests=10, failed_requests=3, successful_requests=7)
    assert (built.total_calls, built.failure_rate) == (10, 0.3)
    # equivalent configs are equal (a default that follows a field equals its value)
    assert CircuitBreakerConfig() == CircuitBreakerConfig(
        minimum_calls=10, max_recovery_timeout=300.0, key_ttl=86400.0)
    mgr = CircuitBreakerManager(backend)
    first = mgr.register_provider("openai", CircuitBreakerConfig())
    assert mgr.register_provider("openai", CircuitBreakerConfig(minimum_calls=10)) is first
    mgr.close()
    # an OPEN breaker whose open period is over stays OPEN until a call asks Redis
    t = CircuitBreaker("lazy-ho", CircuitBreakerConfig(failure_threshold=1,
                                                       recovery_timeout=0.1), redis=backend)
    with pytest.raises(Boom):
        t.call(_boom)
    assert t.get_state() is CircuitState.OPEN and not t.is_available()
    await asyncio.sleep(0.15)
    assert t.state is CircuitState.OPEN and t.is_available()
    # async metrics views pickle and compare as plain metrics
    a = AsyncCircuitBreaker("view")
    view = a.get_metrics()
    assert pickle.loads(pickle.dumps(view)) == view.plain() == view
    # a pending operator action finishes before close() returns
    await a.force_open()
    a.release()
    await a.close()
    assert a.get_state() is CircuitState.CLOSED
    for x in (b, other, t):
        x.close()


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited")  # the user's, on purpose
async def test_a_lambda_around_a_coroutine_holds_no_probe_until_awaited(
        backend: Any) -> None:
    cfg = CircuitBreakerConfig(failure_threshold=1, recovery_timeout=0.1, max_staleness=60)
    b = CircuitBreaker("lambda-probe", cfg, redis=backend)
    with pytest.raises(Boom):
        b.call(_boom)
    await asyncio.sleep(0.15)

    async def ok() -> int:
        return 1

    never = b.call(lambda: ok())  # created, never awaited: must not keep the probe
    never.close()  # type: ignore[attr-defined]
    assert await b.call(lambda: ok()) == 1  # the probe is still there to take
    b.close()


def test_coroutine_functions_are_told_apart_in_every_shape() -> None:
    """`call()` awaits what returns a coroutine; the check runs on every call, so it has a
    fast path for plain functions and methods that must agree with inspect's answer."""
    import inspect

    from distbreaker.breaker import _is_coroutine_fn

    async def coro() -> None: ...

    def plain() -> None: ...

    class Obj:
        async def am(self) -> None: ...

        def sm(self) -> None: ...

        async def __call__(self) -> None: ...

    class SyncObj:
        def __call__(self) -> None: ...

    yes = [coro, Obj().am, Obj(), functools.partial(coro), functools.partial(Obj().am)]
    no = [plain, Obj().sm, SyncObj(), functools.partial(plain), lambda: 1, int, len, Obj]
    mark = getattr(inspect, "markcoroutinefunction", None)  # Python 3.12+
    if mark is not None:
        def marked() -> Any: ...

        yes.append(mark(marked))
    assert [_is_coroutine_fn(f) for f in yes] == [True] * len(yes)
    assert [_is_coroutine_fn(f) for f in no] == [False] * len(no)
