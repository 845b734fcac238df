"""One scenario table, run against every store: in-process model, fakeredis (Lua), real Redis.

Several breaker objects on one store stand for several processes. Time is the test clock
(`breaker.set_test_clock()`), passed to the scripts instead of Redis TIME; `at()` moves it
and re-reads the snapshot, since the local fast path measures open periods on the
monotonic clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
import redis
from fake import fake_server

from distbreaker import (
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitOpenError,
    CircuitState,
    MemoryStore,
)
from distbreaker._protocol import decode_push

T0 = 1_700_000_000_000


class Boom(Exception):
    pass


class Ignored(Exception):
    pass


class RateLimited(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__("429")
        self.retry_after = retry_after


Factory = Callable[..., CircuitBreaker]


@pytest.fixture(params=["memory", "fakeredis", "redis"])
def make(request: pytest.FixtureRequest) -> Iterator[Factory]:
    made: list[CircuitBreaker] = []
    if request.param == "memory":
        store = MemoryStore()

        def backend() -> Any:
            return store
    elif request.param == "fakeredis":
        server = fake_server()

        def backend() -> Any:
            return fakeredis.FakeRedis(server=server)
    else:
        rs = request.getfixturevalue("redis_client")

        def backend() -> Any:
            return redis.Redis(port=rs.connection_pool.connection_kwargs["port"])

    def factory(name: str = "svc", cfg: CircuitBreakerConfig | None = None,
                **kw: Any) -> CircuitBreaker:
        b = CircuitBreaker(name, cfg or CircuitBreakerConfig(), redis=backend(), **kw)
        b.set_test_clock(T0)
        b._core.cell.forget()
        made.append(b)
        return b

    factory.kind = request.param  # type: ignore[attr-defined]
    yield factory
    for b in made:
        b.close()


def at(ms: int, *breakers: CircuitBreaker) -> None:
    for b in breakers:
        b.set_test_clock(T0 + ms)
        b.refresh()


def fail(b: CircuitBreaker, exc: BaseException | None = None) -> None:
    def boom() -> None:
        raise exc or Boom()

    with pytest.raises(type(exc) if exc else Boom):
        b.call(boom)


def ok(b: CircuitBreaker) -> None:
    assert b.call(lambda: 1) == 1


def rejected(b: CircuitBreaker) -> CircuitOpenError:
    with pytest.raises(CircuitOpenError) as ei:
        b.call(lambda: pytest.fail("a rejected call must not run"))
    return ei.value


def cfg(**kw: Any) -> CircuitBreakerConfig:
    # redis_timeout is generous: the table is about semantics, and on a loaded CI machine a
    # 50 ms reply deadline let a trip's reply land in the background after the assert.
    base: dict[str, Any] = dict(failure_threshold=3, recovery_timeout=10.0, success_threshold=2,
                                minimum_calls=100, backoff_jitter=0.0, max_staleness=60.0,
                                redis_timeout=2.0)
    base.update(kw)
    return CircuitBreakerConfig(**base)


def test_consecutive_failures_trip_exactly_at_threshold(make: Factory) -> None:
    changes: list[tuple[Any, ...]] = []
    b = make(cfg=cfg(), on_state_change=lambda *a: changes.append(a))
    fail(b)
    fail(b)
    assert b.get_state() is CircuitState.CLOSED
    fail(b)
    assert b.get_state() is CircuitState.OPEN
    assert not b.is_available()
    err = rejected(b)
    assert err.state is CircuitState.OPEN and err.name == "svc"
    assert err.retry_after is not None and 9.0 < err.retry_after <= 10.0
    assert changes == [("svc", CircuitState.CLOSED, CircuitState.OPEN)]


def test_success_resets_consecutive_failures(make: Factory) -> None:
    b = make(cfg=cfg())
    for _ in range(5):
        fail(b)
        fail(b)
        ok(b)
    assert b.get_state() is CircuitState.CLOSED


def test_failures_from_two_processes_add_up(make: Factory) -> None:
    a, b = make(cfg=cfg()), make(cfg=cfg())
    fail(a)
    fail(b)
    fail(a)
    assert a.get_state() is CircuitState.OPEN
    at(1, b)
    assert b.get_state() is CircuitState.OPEN
    rejected(b)


def test_failure_rate_rule_waits_for_minimum_calls(make: Factory) -> None:
    b = make(cfg=cfg(failure_threshold=1000, minimum_calls=10, failure_rate_threshold=0.5))
    for _ in range(4):
        ok(b)
        fail(b)
    ok(b)
    assert b.get_state() is CircuitState.CLOSED  # 9 calls: below minimum
    fail(b)  # 10 calls, 5 failed = 0.5
    assert b.get_state() is CircuitState.OPEN


def test_slow_call_rate_rule(make: Factory) -> None:
    b = make(cfg=cfg(minimum_calls=4, slow_call_duration=0.01, slow_call_rate_threshold=0.5))
    import time

    ok(b)
    ok(b)
    b.call(time.sleep, 0.02)
    assert b.get_state() is CircuitState.CLOSED
    b.call(time.sleep, 0.02)  # 2 of 4 slow
    assert b.get_state() is CircuitState.OPEN


def test_count_window_forgets_old_outcomes(make: Factory) -> None:
    b = make(cfg=cfg(failure_threshold=1000, window_type="count", window_size=4,
                     minimum_calls=4, failure_rate_threshold=0.75))
    fail(b)
    fail(b)
    ok(b)
    ok(b)
    ok(b)  # window now: fail ok ok ok
    ok(b)  # ok ok ok ok
    fail(b)
    fail(b)  # ok ok fail fail = 0.5
    assert b.get_state() is CircuitState.CLOSED
    fail(b)  # ok fail fail fail = 0.75
    assert b.get_state() is CircuitState.OPEN
    snap = b.get_metrics().fleet
    assert snap is not None


def test_time_window_forgets_old_buckets(make: Factory) -> None:
    b = make(cfg=cfg(failure_threshold=1000, window_size=10.0, window_buckets=10,
                     minimum_calls=4, failure_rate_threshold=0.75))
    fail(b)
    fail(b)
    fail(b)
    at(5_000, b)
    ok(b)  # 3 of 4 failed would trip... 0.75: trips? fail/calls = 3/4 only on a failure
    assert b.get_state() is CircuitState.CLOSED
    m = b.get_metrics().fleet
    assert m is not None and (m.calls, m.failures) == (4, 3)
    at(10_500, b)  # the three failures (bucket 0) are out of the window
    m = b.get_metrics().fleet
    assert m is not None and (m.calls, m.failures) == (1, 0)
    fail(b)
    fail(b)
    fail(b)  # 3 of 4
    assert b.get_state() is CircuitState.OPEN


def test_time_window_cleared_after_a_long_gap(make: Factory) -> None:
    b = make(cfg=cfg(failure_threshold=1000, window_size=10.0, minimum_calls=3,
                     failure_rate_threshold=0.6))
    fail(b)
    fail(b)
    at(60_000, b)
    fail(b)
    m = b.get_metrics().fleet
    assert m is not None and (m.calls, m.failures) == (1, 1)
    assert b.get_state() is CircuitState.CLOSED


def trip(b: CircuitBreaker, n: int = 3) -> None:
    for _ in range(n):
        fail(b)
    assert b.get_state() is CircuitState.OPEN


def test_half_open_admits_probes_fleet_wide_then_closes(make: Factory) -> None:
    changes: list[tuple[Any, ...]] = []
    a = make(cfg=cfg(half_open_max_calls=1), on_state_change=lambda *x: changes.append(x))
    b = make(cfg=cfg(half_open_max_calls=1), on_state_change=lambda *x: changes.append(x))
    trip(a)
    at(9_999, a, b)
    rejected(a)
    at(10_000, a, b)
    with a.protect() as permit:
        assert permit.is_probe
        rejected(b)  # the only permit is taken, fleet-wide
        assert not b.is_available()  # and b now knows it without asking again
        rejected(b)
    assert a.get_state() is CircuitState.HALF_OPEN
    at(10_000, b)  # (with Redis, b learns it from a pub/sub push a moment later)
    with b.protect() as permit:  # the permit came back
        assert permit.is_probe
    assert b.get_state() is CircuitState.CLOSED
    assert changes == [
        ("svc", CircuitState.CLOSED, CircuitState.OPEN),
        ("svc", CircuitState.OPEN, CircuitState.HALF_OPEN),
        ("svc", CircuitState.HALF_OPEN, CircuitState.CLOSED),
    ]


def test_a_late_transition_push_does_not_forget_that_no_probe_is_free(
    make: Factory,
) -> None:
    """With Redis, the OPEN -> HALF_OPEN message of another process can arrive after this
    process's own rejected acquire (which said: no probe left); it must not make the
    breaker look available again. A probe-freed message does."""
    a = make(cfg=cfg(half_open_max_calls=1))
    b = make(cfg=cfg(half_open_max_calls=1))
    trip(a)
    at(10_000, a, b)
    with a.protect() as permit:
        assert permit.is_probe
        rejected(b)
        s = b.snapshot
        late = decode_push(f"v1 t open half_open {s.generation} 0 {s.server_ms} - x svc")
        assert late is not None
        b._engine.apply_push(late, time.monotonic())
        assert not b.is_available()
        freed = decode_push(f"v1 p half_open half_open {s.generation} 0 {s.server_ms} - x svc")
        assert freed is not None
        b._engine.apply_push(freed, time.monotonic())
        assert b.is_available()


def test_half_open_failure_reopens_with_backoff_capped(make: Factory) -> None:
    b = make(cfg=cfg(recovery_timeout=10.0, backoff_multiplier=2.0, max_recovery_timeout=30.0))
    trip(b)
    t = 10_000
    for expected in (20_000, 30_000, 30_000):
        at(t, b)
        fail(b)
        assert b.get_state() is CircuitState.OPEN
        at(t + expected - 1, b)
        rejected(b)
        t += expected
    at(t, b)
    ok(b)
    ok(b)
    assert b.get_state() is CircuitState.CLOSED


def test_backoff_jitter_stays_within_bounds(make: Factory) -> None:
    b = make(cfg=cfg(recovery_timeout=10.0, backoff_multiplier=2.0, backoff_jitter=0.5,
                     max_recovery_timeout=100.0))
    trip(b)
    at(10_000, b)
    fail(b)
    e = rejected(b)
    assert e.retry_after is not None and 10.0 <= e.retry_after <= 30.0


def test_outcome_of_an_older_generation_never_drives_a_transition(make: Factory) -> None:
    a, b = make(cfg=cfg(success_threshold=1)), make(cfg=cfg(success_threshold=1))
    with a.protect():  # admitted while CLOSED, finishes after trip and half-open
        trip(b)
        at(10_000, b)
        with b.protect() as probe:
            assert probe.is_probe
            probe.mark_failure()
        assert b.get_state() is CircuitState.OPEN
        at(30_000, b)
        at(30_000, a)
    # a's success belongs to generation 0; the breaker is now in a later one
    at(30_000, a)
    assert a.get_state() is CircuitState.OPEN
    assert a.get_metrics().stale_outcomes == 1


def test_probe_lease_expires_when_the_prober_vanishes(make: Factory) -> None:
    a, b = make(cfg=cfg(probe_lease=2.0)), make(cfg=cfg(probe_lease=2.0))
    trip(a)
    at(10_000, a, b)
    permit = a._engine.admit()  # a takes the probe and "dies": never finishes it
    assert permit.is_probe
    at(11_999, b)
    rejected(b)
    at(12_000, b)
    with b.protect() as p2:
        assert p2.is_probe


def test_cancelled_probe_gives_its_lease_back(make: Factory) -> None:
    a, b = make(cfg=cfg(probe_lease=60.0)), make(cfg=cfg(probe_lease=60.0))
    trip(a)
    at(10_000, a, b)

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        a.call(interrupted)
    assert a.get_state() is CircuitState.HALF_OPEN
    with b.protect() as p:
        assert p.is_probe


def test_retry_after_sets_the_open_period(make: Factory) -> None:
    b = make(cfg=cfg(failure_threshold=1))
    fail(b, RateLimited(3.0))
    at(2_999, b)
    rejected(b)
    at(3_000, b)
    ok(b)


def test_ignored_exceptions_count_neither_way(make: Factory) -> None:
    b = make(cfg=cfg(ignore_exceptions=(Ignored,)))
    fail(b)
    fail(b)
    for _ in range(5):
        fail(b, Ignored())
    assert b.get_state() is CircuitState.CLOSED
    m = b.get_metrics()
    assert m.ignored_calls == 5 and m.failed_calls == 2
    fail(b)
    assert b.get_state() is CircuitState.OPEN


def test_unrecorded_exception_counts_as_success(make: Factory) -> None:
    b = make(cfg=cfg(record_exceptions=(Boom,)))
    for _ in range(5):
        fail(b, ValueError())
    assert b.get_state() is CircuitState.CLOSED
    assert b.get_metrics().successful_calls == 5


def test_result_predicate_marks_failures(make: Factory) -> None:
    b = make(cfg=cfg(is_failure_result=lambda r: r >= 500))
    for _ in range(3):
        assert b.call(lambda: 503) == 503
    assert b.get_state() is CircuitState.OPEN


def test_force_open_and_release(make: Factory) -> None:
    changes: list[tuple[Any, ...]] = []
    a = make(cfg=cfg(), on_state_change=lambda *x: changes.append(x))
    b = make(cfg=cfg())
    a.force_open()
    at(0, b)
    assert not b.is_available()
    e = rejected(b)
    assert e.retry_after is None
    at(10**9, b)  # an override does not time out
    rejected(b)
    a.release()
    at(10**9, b)
    ok(b)
    assert changes == [("svc", CircuitState.CLOSED, CircuitState.OPEN),
                       ("svc", CircuitState.OPEN, CircuitState.CLOSED)]


def test_force_closed_admits_and_counts_nothing(make: Factory) -> None:
    b = make(cfg=cfg())
    trip(b)
    b.force_closed()
    assert b.is_available()
    for _ in range(10):
        fail(b)
    assert b.get_state() is CircuitState.CLOSED
    b.release()
    at(0, b)
    assert b.get_state() is CircuitState.OPEN  # the breaker's own state resumes


def test_reset_closes_and_clears(make: Factory) -> None:
    b = make(cfg=cfg())
    trip(b)
    b.force_open()
    b.reset()
    assert b.get_state() is CircuitState.CLOSED
    fail(b)
    fail(b)
    assert b.get_state() is CircuitState.CLOSED
    m = b.get_metrics()
    assert m.fleet is not None and m.fleet.consecutive_failures == 2


def test_decorator_and_protect(make: Factory) -> None:
    b = make(cfg=cfg())

    @b
    def f(x: int) -> int:
        return x * 2

    assert f(21) == 42
    with pytest.raises(Boom), b.protect():
        raise Boom
    with b.protect() as p:
        p.mark_failure()
    m = b.get_metrics()
    assert (m.successful_calls, m.failed_calls) == (1, 2)
    assert m.fleet is not None and m.fleet.consecutive_failures == 2


def test_timeout_is_a_failure_in_sync(make: Factory) -> None:
    import time

    b = make(cfg=cfg(failure_threshold=1, timeout_duration=0.01))
    assert b.call(time.sleep, 0.02) is None  # the result still comes back
    assert b.get_state() is CircuitState.OPEN
    assert b.get_metrics().timeouts == 1


def test_first_call_learns_the_fleet_state(make: Factory) -> None:
    a = make(cfg=cfg())
    trip(a)
    late = make(cfg=cfg())  # a new process: snapshot unknown, must ask before calling
    rejected(late)


def test_two_step_admit_finish(make: Factory) -> None:
    b = make(cfg=cfg())
    p = b.admit()
    b.finish(p, KeyError("x"))
    p = b.admit()
    b.finish(p, result=5)
    p = b.admit()
    p.mark_ignored()
    b.finish(p)
    m = b.get_metrics()
    assert (m.failed_calls, m.successful_calls, m.ignored_calls) == (1, 1, 1)
    assert m.fleet is not None and m.fleet.calls == 2


def test_the_test_clock_is_public_checked_and_moves_open_periods() -> None:
    cfg = CircuitBreakerConfig(failure_threshold=1, recovery_timeout=30)
    b = CircuitBreaker("clock", cfg)
    for bad in (-1, 1.5, "1000", True):
        with pytest.raises(ValueError, match="test clock"):
            b.set_test_clock(bad)  # type: ignore[arg-type]
    assert b.test_clock is None
    b.set_test_clock(T0)
    with pytest.raises(ZeroDivisionError):
        b.call(lambda: 1 / 0)
    assert b.get_state() is CircuitState.OPEN
    b.set_test_clock(T0 + 29_000)
    b._core.cell.forget()
    with pytest.raises(CircuitOpenError):
        b.call(lambda: 1)  # 29 s of Redis-side time: still open
    b.set_test_clock(T0 + 31_000)
    b._core.cell.forget()
    assert b.call(lambda: 1) == 1  # the open period ended on the test clock: a probe
    assert b.test_clock == T0 + 31_000
    b.set_test_clock(None)
    assert b.test_clock is None
    b.close()


def test_in_process_plain_successes_skip_the_script_protocol() -> None:
    """An in-process breaker applies a plain success straight to the model: no script
    call is built or run for it, and the window counts it exactly as record() would (the
    rate rule then trips on the failure that reaches the threshold, not before)."""
    store = MemoryStore()
    runs: list[str] = []
    real_run = store.run

    def counting_run(call: Any, *a: Any, **kw: Any) -> Any:
        runs.append(call.op)
        return real_run(call, *a, **kw)

    store.run = counting_run  # type: ignore[method-assign]
    b = CircuitBreaker("svc", cfg(failure_threshold=100, minimum_calls=10,
                                  failure_rate_threshold=0.5), redis=store)
    b.set_test_clock(T0)
    ok(b)  # the first one creates the state through the full path
    runs.clear()
    for _ in range(4):
        ok(b)
    assert runs == []
    for _ in range(4):
        fail(b)
    assert runs == ["record"] * 4 and b.get_state() is CircuitState.CLOSED  # 4/9
    fail(b)  # 5 of 10: the rate rule trips exactly here
    assert b.get_state() is CircuitState.OPEN
    b.close()
