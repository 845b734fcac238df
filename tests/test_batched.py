"""Batched mode (``consistency="batched"``): outcomes go through this process's writer.

Against the in-process store, fakeredis and a real redis-server: exact counts after
`flush()`, the projection that stops admitting before the round trip, one call in flight
per breaker, the batch cap, no timer when idle, close / interpreter exit / fork, asyncio,
and a Redis outage. The fleet-wide bounds with 8 processes are in test_multiprocess.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio as aredis
from fake import fake_server

from distbreaker import (
    AsyncCircuitBreaker,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitOpenError,
    CircuitState,
)
from distbreaker._protocol import record_outcomes
from distbreaker.stores import MemoryStore

from redis_server import RedisServer

BATCHED = dict(consistency="batched", failure_threshold=20, minimum_calls=100_000,
               recovery_timeout=60.0)


class Boom(Exception):
    pass


def boom() -> None:
    raise Boom


def ok() -> str:
    return "ok"


def name() -> str:
    return f"bt-{uuid.uuid4().hex[:8]}"


def window(r: Any, n: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(f"distbreaker:v1:{{{n}}}:window").items()}


def state(r: Any, n: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(f"distbreaker:v1:{{{n}}}").items()}


@pytest.fixture(params=["redis", "fakeredis"])
def client(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Any]:
    if request.param == "redis":
        c: Any = redis_server.client()
    else:
        c = fakeredis.FakeRedis(server=fake_server())
    yield c
    c.close()


class Spy:
    """Wraps a breaker's store: every record call's outcome count, how many were in
    flight at once, and a gate that holds them."""

    def __init__(self, b: CircuitBreaker) -> None:
        self.sizes: list[int] = []
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        inner = b._store.run

        def run(call: Any, *rest: Any) -> Any:
            if call.op != "record":
                return inner(call, *rest)
            with self.lock:
                self.inflight += 1
                self.max_inflight = max(self.max_inflight, self.inflight)
                self.sizes.append(len(record_outcomes(call.args)))
            self.entered.set()
            try:
                self.gate.wait(10)
                return inner(call, *rest)
            finally:
                with self.lock:
                    self.inflight -= 1

        b._store.run = run  # type: ignore[method-assign]


# -- counting ------------------------------------------------------------------------------


def test_every_outcome_is_applied_after_flush(client: Any) -> None:
    n = name()
    b = CircuitBreaker(n, CircuitBreakerConfig(**BATCHED), redis=client)
    spy = Spy(b)
    for _ in range(3000):
        b.call(ok)
    for _ in range(7):
        with contextlib.suppress(Boom):
            b.call(boom)
    assert b.flush(10)
    w = window(client, n)
    assert (w["c"], w["f"]) == ("3007", "7"), w
    assert state(client, n)["consecutive_failures"] == "7"
    m = b.get_metrics()
    assert m.pending_outcomes == 0 and m.lost_outcomes == 0
    assert m.batches == len(spy.sizes) and sum(spy.sizes) == 3007
    # coalesced: far fewer script calls than outcomes, never two in flight at once
    assert len(spy.sizes) < 3007 / 3, spy.sizes
    assert spy.max_inflight == 1
    assert max(spy.sizes) <= b.config.max_batch
    b.close()


def test_memory_store_batched() -> None:
    store = MemoryStore()
    b = CircuitBreaker("mem", CircuitBreakerConfig(**BATCHED), redis=store)
    for _ in range(500):
        b.call(ok)
    assert b.flush(10)
    assert b.get_metrics().fleet is not None
    assert b.get_metrics().fleet.calls == 500  # type: ignore[union-attr]
    b.close()


def test_first_outcome_goes_out_without_flush_or_timer(redis_client: redis.Redis) -> None:
    n = name()
    b = CircuitBreaker(n, CircuitBreakerConfig(**BATCHED), redis=redis_client)
    b.call(ok)
    deadline = time.monotonic() + 5
    while window(redis_client, n).get("c") != "1" and time.monotonic() < deadline:
        time.sleep(0.001)
    assert window(redis_client, n).get("c") == "1"  # the writer sent it on its own
    assert b.get_metrics().batches == 1
    b.close()


def test_batch_cap_and_one_call_in_flight(redis_client: redis.Redis) -> None:
    n = name()
    b = CircuitBreaker(n, CircuitBreakerConfig(**{**BATCHED, "max_batch": 10}),
                       redis=redis_client)
    spy = Spy(b)
    spy.gate.clear()  # hold the first call in flight: everything else piles up
    b.call(ok)
    assert spy.entered.wait(10)
    for _ in range(94):
        b.call(ok)
    assert spy.max_inflight == 1 and spy.sizes == [1]
    assert b.get_metrics().pending_outcomes == 95
    spy.gate.set()
    assert b.flush(10)
    assert spy.sizes[0] == 1 and all(s == 10 for s in spy.sizes[1:-1]), spy.sizes
    assert sum(spy.sizes) == 95 and spy.max_inflight == 1
    assert window(redis_client, n)["c"] == "95"
    b.close()


def test_flush_timeout_and_strict_flush() -> None:
    strict = CircuitBreaker("strict", CircuitBreakerConfig())
    assert strict.flush() is True  # nothing is ever pending in strict mode
    store = MemoryStore()
    b = CircuitBreaker("t", CircuitBreakerConfig(**BATCHED), redis=store)
    spy = Spy(b)
    spy.gate.clear()
    b.call(ok)
    b.call(ok)
    assert b.flush(0.05) is False
    spy.gate.set()
    assert b.flush(10) is True
    b.close()


def test_linger_coalesces_and_flush_cuts_it_short(redis_client: redis.Redis) -> None:
    n = name()
    b = CircuitBreaker(n, CircuitBreakerConfig(**{**BATCHED, "batch_linger": 0.5}),
                       redis=redis_client)
    spy = Spy(b)
    for _ in range(200):
        b.call(ok)
    assert spy.sizes == []  # lingering: nothing sent yet
    deadline = time.monotonic() + 5
    while window(redis_client, n).get("c") != "200" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert spy.sizes == [200]  # one script call for the whole linger
    for _ in range(30):
        b.call(ok)
    assert b.flush(10)  # does not wait for the linger
    assert spy.sizes == [200, 30] and window(redis_client, n)["c"] == "230"
    b.close()


def test_linger_sends_a_full_batch_at_once(redis_client: redis.Redis) -> None:
    n = name()
    b = CircuitBreaker(n, CircuitBreakerConfig(**{**BATCHED, "batch_linger": 1.0,
                                                  "max_batch": 10}), redis=redis_client)
    spy = Spy(b)
    t0 = time.monotonic()
    for _ in range(35):
        b.call(ok)
    while len(spy.sizes) < 3 and time.monotonic() - t0 < 5:
        time.sleep(0.005)
    assert spy.sizes[:3] == [10, 10, 10]
    assert time.monotonic() - t0 < 0.9  # full batches do not wait for the linger
    assert b.flush(10) and sum(spy.sizes) == 35
    b.close()


def test_flush_timeout_forgets_its_waiter() -> None:
    b = CircuitBreaker("w", CircuitBreakerConfig(**BATCHED), redis=MemoryStore())
    spy = Spy(b)
    spy.gate.clear()
    b.call(ok)
    assert spy.entered.wait(10)
    assert b.flush(0.05) is False
    assert b._core.batch is not None and b._core.batch.waiters == []
    spy.gate.set()
    assert b.flush(10)
    b.close()


def test_linger_does_not_delay_a_trip(redis_client: redis.Redis) -> None:
    n = name()
    b = CircuitBreaker(n, CircuitBreakerConfig(**{**BATCHED, "batch_linger": 1.0}),
                       redis=redis_client)
    t0 = time.monotonic()
    for _ in range(20):
        with contextlib.suppress(Boom):
            b.call(boom)
    assert not b.is_available()
    while state(redis_client, n).get("state") != "open" and time.monotonic() - t0 < 5:
        time.sleep(0.005)
    assert state(redis_client, n)["state"] == "open"
    assert time.monotonic() - t0 < 0.9  # sent when the projection tripped, not at 1 s
    b.close()


async def test_async_linger(redis_server: RedisServer) -> None:
    r = aredis.Redis(port=redis_server.port)
    sync_r = redis_server.client()
    n = name()
    b = AsyncCircuitBreaker(n, CircuitBreakerConfig(**{**BATCHED, "batch_linger": 0.3}),
                            redis=r)

    async def aok() -> int:
        return 1

    for _ in range(100):
        await b.call(aok)
    assert window(sync_r, n).get("c") is None
    await asyncio.sleep(0.6)
    assert window(sync_r, n)["c"] == "100"
    assert (await b.get_metrics()).batches == 1
    for _ in range(10):
        await b.call(aok)
    assert await b.flush(10)
    assert window(sync_r, n)["c"] == "110"
    await b.close()
    await r.aclose()
    sync_r.close()


# -- projection --------------------------------------------------------------------------


def test_projection_stops_admitting_before_the_reply(redis_client: redis.Redis) -> None:
    """The writer is held: no reply comes back, yet the 20th failure stops admission."""
    n = name()
    changes: list[tuple[str, str]] = []
    b = CircuitBreaker(n, CircuitBreakerConfig(**BATCHED), redis=redis_client,
                       on_state_change=lambda _n, o, w: changes.append((o.value, w.value)))
    b.call(ok)
    assert b.flush(10)
    spy = Spy(b)
    spy.gate.clear()
    executed = 0

    def failing() -> None:
        nonlocal executed
        executed += 1
        raise Boom

    rejected = None
    for _ in range(50):
        try:
            b.call(failing)
        except Boom:
            pass
        except CircuitOpenError as e:
            rejected = e
            break
    assert executed == 20
    assert rejected is not None and rejected.retry_after == 60.0
    assert not b.is_available()
    assert state(redis_client, n)["state"] == "closed"  # the fleet does not know yet
    spy.gate.set()
    assert b.flush(10)
    assert state(redis_client, n)["state"] == "open"
    assert b.get_state() is CircuitState.OPEN
    assert changes == [("closed", "open")]
    b.close()


def test_projection_counts_the_shared_window(redis_client: redis.Redis) -> None:
    """Failures another process applied count toward this one's projection."""
    n = name()
    cfg = CircuitBreakerConfig(**BATCHED)
    other = CircuitBreaker(n, CircuitBreakerConfig(failure_threshold=20,
                                                   minimum_calls=100_000,
                                                   recovery_timeout=60.0),
                           redis=redis_client)
    for _ in range(15):
        with contextlib.suppress(Boom):
            other.call(boom)
    b = CircuitBreaker(n, cfg, redis=redis_client)  # reads cf=15 from Redis
    spy = Spy(b)
    spy.gate.clear()
    executed = 0
    for _ in range(20):
        try:
            b.call(boom)
            executed += 1
        except Boom:
            executed += 1
        except CircuitOpenError:
            break
    assert executed == 5
    spy.gate.set()
    assert b.flush(10) and b.get_state() is CircuitState.OPEN
    other.close()
    b.close()


def test_a_false_projection_is_lifted_by_the_reply(redis_client: redis.Redis) -> None:
    """Another process's success reset the consecutive count: the reply lifts the hold."""
    n = name()
    b = CircuitBreaker(n, CircuitBreakerConfig(**{**BATCHED, "failure_threshold": 3}),
                       redis=redis_client)
    other = CircuitBreaker(n, CircuitBreakerConfig(failure_threshold=3,
                                                   minimum_calls=100_000,
                                                   recovery_timeout=60.0),
                           redis=redis_client)
    with contextlib.suppress(Boom):
        b.call(boom)
    assert b.flush(10)  # Redis: cf 1
    spy = Spy(b)
    spy.gate.clear()  # the next two are held back
    for _ in range(2):
        with contextlib.suppress(Boom):
            b.call(boom)
    assert not b.is_available()  # projected: 1 + 2 = 3
    # meanwhile the fleet saw a success between them
    other.call(ok)
    spy.gate.set()
    assert b.flush(10)
    # Redis counted: fail (cf 1), [other's ok], fail, fail -> cf 2: still closed
    assert state(redis_client, n)["state"] == "closed"
    assert b.is_available() and b.get_state() is CircuitState.CLOSED
    b.call(ok)
    other.close()
    b.close()


def test_probe_outcomes_are_sent_at_once(redis_client: redis.Redis) -> None:
    n = name()
    b = CircuitBreaker(n, CircuitBreakerConfig(**{**BATCHED, "failure_threshold": 2,
                                                  "recovery_timeout": 1.0}),
                       redis=redis_client)
    b.set_test_clock(1_000_000)
    for _ in range(2):
        with contextlib.suppress(Boom, CircuitOpenError):
            b.call(boom)
    assert b.flush(10) and state(redis_client, n)["state"] == "open"
    time.sleep(0.3)  # the trip's own push arrives (it would re-install OPEN after _forget)
    b.set_test_clock((b.test_clock or 0) + 1_500)
    b._core.cell.forget()
    spy = Spy(b)
    spy.gate.clear()
    threading.Timer(0.2, spy.gate.set).start()
    b.call(ok)  # the probe: its outcome is recorded before call() returns
    assert state(redis_client, n)["half_open_successes"] == "1"
    assert b.get_metrics().batches == 1  # only the two failures went through the writer
    b.close()


# -- close, exit, fork --------------------------------------------------------------------


def test_close_flushes(redis_client: redis.Redis) -> None:
    n = name()
    b = CircuitBreaker(n, CircuitBreakerConfig(**BATCHED), redis=redis_client)
    spy = Spy(b)
    spy.gate.clear()
    for _ in range(40):
        b.call(ok)
    threading.Timer(0.2, spy.gate.set).start()
    b.close()
    assert window(redis_client, n)["c"] == "40"


def _run_child(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_interpreter_exit_flushes(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    n = name()
    p = _run_child(f"""
        import redis
        from distbreaker import CircuitBreaker, CircuitBreakerConfig
        b = CircuitBreaker({n!r}, CircuitBreakerConfig(consistency="batched",
                           minimum_calls=100000), redis=redis.Redis(port={redis_server.port}))
        for _ in range(2000):
            b.call(lambda: None)
        print(b.get_metrics().pending_outcomes > 0 or "none pending")
        # no flush, no close: exit must send what is pending
    """)
    assert p.returncode == 0, p.stderr
    assert window(redis_client, n)["c"] == "2000", p.stdout + p.stderr


def test_async_loop_end_flushes(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    n = name()
    p = _run_child(f"""
        import asyncio
        import redis.asyncio as aredis
        from distbreaker import AsyncCircuitBreaker, CircuitBreakerConfig

        async def ok():
            await asyncio.sleep(0)  # a real backend call yields to the loop
            return 1

        async def main():
            b = AsyncCircuitBreaker({n!r}, CircuitBreakerConfig(consistency="batched",
                                    minimum_calls=100000),
                                    redis=aredis.Redis(port={redis_server.port}))
            for _ in range(1500):
                await b.call(ok)
            # returns with outcomes pending: the loop's shutdown cancels the writer task

        asyncio.run(main())
    """)
    assert p.returncode == 0, p.stderr
    w = window(redis_client, n)
    # at most the batch in flight when the loop cancelled the writer is unconfirmed
    assert 1500 - 256 <= int(w["c"]) <= 1500, (w, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr


def _count_sends(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """Count what asyncio stores send: the size of every pipeline, and record calls sent
    alone."""
    from distbreaker.stores.redis import AsyncRedisStore

    rounds: list[int] = []
    singles = [0]
    many, one = AsyncRedisStore._send_many, AsyncRedisStore._send

    async def counted_many(self: AsyncRedisStore, payloads: list[bytes]) -> list[Any]:
        rounds.append(len(payloads))
        return await many(self, payloads)

    async def counted_one(self: AsyncRedisStore, payload: bytes) -> Any:
        if b"_record\r\n" in payload:
            singles[0] += 1
        return await one(self, payload)

    monkeypatch.setattr(AsyncRedisStore, "_send_many", counted_many)
    monkeypatch.setattr(AsyncRedisStore, "_send", counted_one)
    return rounds, singles


def test_async_loop_end_sends_every_lingering_breakers_outcomes(
        redis_server: RedisServer, redis_client: redis.Redis) -> None:
    """The loop ends while 100 breakers linger (nothing in flight), dropped by the code
    that made them: its writer, cancelled, sends every one of them without waiting out the
    linger, so none is lost (a breaker is freed once what it holds is sent)."""
    names = [name() for _ in range(100)]
    p = _run_child(f"""
        import asyncio, time
        import redis.asyncio as aredis
        from distbreaker import AsyncCircuitBreaker, CircuitBreakerConfig

        async def ok():
            return 1

        async def main():
            c = aredis.Redis(port={redis_server.port})
            cfg = CircuitBreakerConfig(consistency="batched", minimum_calls=100000,
                                       batch_linger=1.0)
            bs = [AsyncCircuitBreaker(n, cfg, redis=c) for n in {names!r}]
            for b in bs:
                await b.refresh()
            for _ in range(3):
                for b in bs:
                    await b.call(ok)
            await asyncio.sleep(0.05)  # the writer took them all: each one lingers
            global started
            started = time.monotonic()

        asyncio.run(main())
        print("shutdown took", time.monotonic() - started)
    """)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    took = float(p.stdout.split()[-1])
    assert took < 0.9, p.stdout  # sooner than the 1 s linger: the cancel hurried them
    assert [window(redis_client, n).get("c") for n in names] == ["3"] * 100, p.stderr


def test_async_loop_end_right_after_outcomes_on_several_clients_loses_none(
        redis_server: RedisServer, redis_client: redis.Redis) -> None:
    """The loop ends in the turn its writer first runs, with batches for two breakers
    sharing a client (one pipeline) and one on another client (alone): each is sent or
    counted lost, and none is left in flight for ever (a job cancelled before it started
    used to keep the batches it was handed). Found by review; 3 runs in 3 left two
    breakers unable to send again."""
    names = [name() for _ in range(3)]
    p = _run_child(f"""
        import asyncio
        import redis.asyncio as aredis
        from distbreaker import AsyncCircuitBreaker, CircuitBreakerConfig

        cfg = CircuitBreakerConfig(consistency="batched", minimum_calls=100000)
        bs = []

        async def ok():
            return 1

        async def main():
            shared = aredis.Redis(port={redis_server.port})
            for i, n in enumerate({names!r}):
                c = shared if i < 2 else aredis.Redis(port={redis_server.port})
                b = AsyncCircuitBreaker(n, cfg, redis=c)
                await b.refresh()
                bs.append(b)
            await asyncio.sleep(0.1)
            for b in bs:
                await b.call(ok)

        asyncio.run(main())
        for b in bs:
            m = b.get_metrics()
            print(m.pending_outcomes, m.lost_outcomes)

        async def again():
            for b in bs:
                await b.call(ok)
            print(all([await b.flush(5) for b in bs]))

        asyncio.run(again())
    """)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n")
    assert lines[3] == "True", p.stdout + p.stderr  # every breaker still sends
    for n, line in zip(names, lines[:3], strict=True):
        pending, lost = map(int, line.split())
        assert pending == 0, (line, p.stderr)
        assert int(window(redis_client, n).get("c", 0)) + lost == 2, (n, line)


async def test_async_a_stalled_redis_delays_only_its_own_breakers(
        redis_server: RedisServer) -> None:
    """Two Redis servers; one is paused with a pipeline of two breakers' batches on it.
    A breaker on the other one has its outcome applied at once: each client's round trip
    runs in a lane of its own (found by review: the writer's rounds waited for the slowest
    pipeline, 1 s here)."""
    sick_server = RedisServer().start()
    cfg = CircuitBreakerConfig(consistency="batched", minimum_calls=100000, redis_timeout=0.2,
                               redis_background_timeout=0.5, failover_after=1.0)
    sick_c, ok_c = aredis.Redis(port=sick_server.port), aredis.Redis(port=redis_server.port)
    sick = [AsyncCircuitBreaker(name(), cfg, redis=sick_c) for _ in range(2)]
    good = AsyncCircuitBreaker(name(), cfg, redis=ok_c)
    try:
        for b in [*sick, good]:
            await b.refresh()
        sick_server.client().execute_command("CLIENT", "PAUSE", 3000, "ALL")
        for b in sick:
            await b.call(_aok)  # one pipeline to the paused Redis
        await asyncio.sleep(0.01)
        t = time.monotonic()
        await good.call(_aok)
        assert await good.flush(5)
        took = time.monotonic() - t
        assert took < 0.7, took  # not after the paused pipeline (0.5 s timeout, 1 s PING)
        assert window(redis_server.client(), good.name)["c"] == "1"
    finally:
        sick_server.client().execute_command("CLIENT", "UNPAUSE")
        for b in [*sick, good]:
            await b.close()
        await sick_c.aclose()
        await ok_c.aclose()
        sick_server.stop()


async def test_async_one_writer_task_per_loop_for_many_breakers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """200 lingering breakers are held by one writer task on the loop (the twin of the
    writer thread), not one task each; each breaker's outcomes then go in one record
    call, and all 200 calls in one pipeline."""
    rounds, singles = _count_sends(monkeypatch)
    server = RedisServer().start()
    admin = server.client()
    c = aredis.Redis(port=server.port)
    names = [name() for _ in range(200)]
    cfg = CircuitBreakerConfig(**{**BATCHED, "batch_linger": 0.5})
    bs = [AsyncCircuitBreaker(x, cfg, redis=c) for x in names]
    try:
        for b in bs:
            await b.refresh()
        for _ in range(4):
            for b in bs:
                await b.call(_aok)
        await asyncio.sleep(0)
        writers = [t for t in asyncio.all_tasks() if t.get_name() == "distbreaker-writer"]
        assert len(writers) == 1, [t.get_name() for t in asyncio.all_tasks()]
        assert all(b.get_metrics().pending_outcomes == 4 for b in bs)
        assert rounds == []  # all of them linger
        assert all(await asyncio.gather(*(b.flush(10) for b in bs)))
        # one record call per breaker, all in one pipeline (commandstats would also
        # count the listener's re-reads, whenever its task runs)
        assert rounds == [200] and singles == [0], (rounds, singles)
        assert [window(admin, x)["c"] for x in names] == ["4"] * 200
        await asyncio.sleep(0.7)  # past the linger the flushes cut short: nothing waits
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "distbreaker-writer"]
    finally:
        for b in bs:
            await b.close()
        await c.aclose()
        server.stop()


def test_async_breaker_sends_from_each_event_loop_it_runs_on(
        redis_server: RedisServer, redis_client: redis.Redis) -> None:
    """One breaker, two asyncio.run() in turn: each loop's writer sends that loop's
    outcomes (the first loop's writer is gone with it)."""
    n = name()
    b = AsyncCircuitBreaker(n, CircuitBreakerConfig(**BATCHED),
                            redis=aredis.Redis(port=redis_server.port))

    async def calls(k: int) -> None:
        for _ in range(k):
            await b.call(_aok)
        assert await b.flush(10)

    asyncio.run(calls(5))
    asyncio.run(calls(7))
    assert window(redis_client, n)["c"] == "12"


@pytest.mark.multiprocess
def test_fork_child_does_not_send_the_parents_outcomes(redis_client: redis.Redis) -> None:
    n = name()
    b = CircuitBreaker(n, CircuitBreakerConfig(**BATCHED), redis=redis_client)
    spy = Spy(b)
    spy.gate.clear()
    for _ in range(30):
        b.call(ok)  # 1 in flight (held), 29 pending
    assert b.get_metrics().pending_outcomes == 30
    pid = os.fork()
    if pid == 0:  # child: its own writer; none of the parent's outcomes
        code = 1
        try:
            spy.gate.set()  # the child's copy of the gate
            if b.get_metrics().pending_outcomes == 0:
                for _ in range(12):
                    b.call(ok)
                code = 0 if b.flush(10) and b.get_metrics().pending_outcomes == 0 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    spy.gate.set()
    assert b.flush(10)
    assert window(redis_client, n)["c"] == "42"  # 30 from the parent, 12 from the child
    b.close()


@pytest.mark.multiprocess
def test_async_breaker_in_a_forked_child_sends_its_outcomes(redis_server: RedisServer,
                                                            redis_client: redis.Redis) -> None:
    n = name()
    b = AsyncCircuitBreaker(n, CircuitBreakerConfig(**{**BATCHED, "batch_linger": 0.3}),
                            redis=aredis.Redis(port=redis_server.port))

    async def aok() -> int:
        await asyncio.sleep(0)
        return 1

    async def parent_calls() -> None:
        await b.call(aok)  # leaves a lingering drain task behind on this loop

    loop = asyncio.new_event_loop()
    loop.run_until_complete(parent_calls())
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            async def child() -> bool:
                b._store.client = aredis.Redis(port=redis_server.port)  # the parent's
                # connections belong to its loop; a child uses a client of its own
                for _ in range(5):
                    await b.call(aok)
                return await b.flush(5)
            code = 0 if asyncio.run(child()) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert loop.run_until_complete(b.flush(5))
    loop.run_until_complete(b.close())
    loop.close()
    assert window(redis_client, n)["c"] == "6"


# -- asyncio ---------------------------------------------------------------------------------


async def test_async_batched_counts_and_projection(redis_server: RedisServer) -> None:
    r = aredis.Redis(port=redis_server.port)
    sync_r = redis_server.client()
    n = name()
    changes: list[str] = []
    b = AsyncCircuitBreaker(n, CircuitBreakerConfig(**BATCHED), redis=r,
                            on_state_change=lambda *_: changes.append("x"))

    async def aok() -> int:
        return 1

    async def aboom() -> None:
        raise Boom

    for _ in range(1000):
        await b.call(aok)
    assert await b.flush(10)
    assert window(sync_r, n)["c"] == "1000"
    executed = 0
    for _ in range(40):
        try:
            await b.call(aboom)
            executed += 1
        except Boom:
            executed += 1
        except CircuitOpenError:
            break
    assert executed == 20
    assert await b.flush(10)
    assert state(sync_r, n)["state"] == "open" and changes == ["x"]
    m = await b.get_metrics()
    assert m.batches < 1020 and m.pending_outcomes == 0
    await b.close()
    await r.aclose()
    sync_r.close()


async def test_sync_breaker_aflush(redis_client: redis.Redis) -> None:
    n = name()
    b = CircuitBreaker(n, CircuitBreakerConfig(**BATCHED), redis=redis_client)
    for _ in range(100):
        b.call(ok)
    assert await b.aflush(10)
    assert window(redis_client, n)["c"] == "100"
    b.close()


# -- Redis fails -----------------------------------------------------------------------------


def test_outage_in_batched_mode_falls_back_without_raising() -> None:
    server = RedisServer().start()
    try:
        c = server.client()
        n = name()
        b = CircuitBreaker(n, CircuitBreakerConfig(**{**BATCHED, "failure_threshold": 5}),
                           redis=c)
        for _ in range(50):
            b.call(ok)
        assert b.flush(10)
        server.stop()
        rejected = 0
        for _ in range(100):
            try:
                b.call(boom)
            except Boom:
                pass
            except CircuitOpenError:
                rejected += 1
        assert b.flush(10)  # the fallback applied them: nothing waits forever
        assert rejected > 0  # the local fallback tripped on the failing backend
        assert b.get_metrics().lost_outcomes == 0
        b.close()
    finally:
        server.stop()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="consistency must be 'strict' or 'batched'"):
        CircuitBreakerConfig(consistency="eventual")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_batch must be in \[1, 10000\]"):
        CircuitBreakerConfig(max_batch=0)
    with pytest.raises(ValueError, match=r"batch_linger must be in \[0, 1\]"):
        CircuitBreakerConfig(batch_linger=2)
    # the write path is per process: it does not change the shared config's fingerprint
    assert (CircuitBreakerConfig(consistency="batched").fingerprint
            == CircuitBreakerConfig().fingerprint)


def test_due_breakers_share_one_pipeline(redis_client: redis.Redis,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Many breakers of one client: their batches go out together, a pipeline per pass of
    the writer, not one round trip per breaker; every outcome is applied exactly once."""
    from distbreaker.stores.redis import RedisStore

    rounds: list[int] = []
    singles = [0]
    many, one = RedisStore._send_many, RedisStore._send

    def counted_many(self: RedisStore, payloads: list[bytes]) -> list[Any]:
        rounds.append(len(payloads))
        return many(self, payloads)

    def counted_one(self: RedisStore, payload: bytes) -> Any:
        if b"_record\r\n" in payload:
            singles[0] += 1
        return one(self, payload)

    monkeypatch.setattr(RedisStore, "_send_many", counted_many)
    monkeypatch.setattr(RedisStore, "_send", counted_one)
    c = redis.Redis(port=redis_client.connection_pool.connection_kwargs["port"])
    n = 300
    names = [name() for _ in range(n)]
    bs = [CircuitBreaker(x, CircuitBreakerConfig(**BATCHED), redis=c) for x in names]
    for b in bs:
        b.flush(5)  # each breaker's first read is done
    for _ in range(3):
        for b in bs:
            b.call(ok)
        with contextlib.suppress(Boom):
            bs[0].call(boom)
    for b in bs:
        assert b.flush(10)
    for x in names:
        w = window(redis_client, x)
        assert w["c"] == ("6" if x == names[0] else "3"), (x, w)
    assert all(b.get_metrics().lost_outcomes == 0 for b in bs)
    sent = sum(rounds) + singles[0]
    assert sent >= n  # every breaker's batches went somewhere...
    assert len(rounds) + singles[0] < sent / 10, (rounds, singles)  # ...in few round trips
    assert max(rounds) > 50, rounds
    for b in bs:
        b.close()
    c.close()


def test_a_pipeline_timed_out_asks_redis_once_not_once_per_breaker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A blackhole swallows a pipeline of many breakers' batches: whether Redis is silent
    or one connection stuck is asked once for all of them (a PING per breaker, each
    waiting failover_after, stalled the writer for minutes)."""
    from tcp_proxy import TcpProxy

    from distbreaker.stores.redis import RedisStore

    pings: list[float] = []
    alive = RedisStore.alive

    def counted(self: RedisStore, timeout: float) -> bool:
        pings.append(timeout)
        return alive(self, timeout)

    monkeypatch.setattr(RedisStore, "alive", counted)
    server = RedisServer().start()
    proxy = TcpProxy(server.port).start()
    cfg = CircuitBreakerConfig(**{**BATCHED, "redis_background_timeout": 0.4,
                                  "failover_after": 0.2})
    c = redis.Redis.from_url(proxy.url)
    bs = [CircuitBreaker(name(), cfg, redis=c) for _ in range(40)]
    try:
        for b in bs:
            assert b.flush(5)
        bs[0].call(ok)
        assert bs[0].flush(5)  # the writer's connection is open
        proxy.blackhole(True)
        t0 = time.monotonic()
        for b in bs:
            b.call(ok)
        for b in bs:
            b.flush(5)
        took = time.monotonic() - t0
        proxy.blackhole(False)
        lost = sum(b.get_metrics().lost_outcomes + b.get_metrics().unshared_outcomes
                   for b in bs)
        assert lost >= 1  # swallowed: reported, never silently dropped
        assert len(pings) <= 4, pings  # once per pipeline, not once per breaker
        assert took < 5.0, took
    finally:
        for b in bs:
            b.close()
        c.close()
        proxy.stop()
        server.stop()


async def _aok() -> str:
    await asyncio.sleep(0)
    return "ok"


async def _aboom() -> None:
    await asyncio.sleep(0)
    raise Boom


async def test_async_due_breakers_share_one_pipeline_and_few_connections(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The asyncio twin: the loop's writer sends the due batches of one client in one
    pipeline, so batches due together go out together. Before pipelines, each breaker's
    batch took its own round trip on its own connection: 300 breakers held about 300
    connections."""
    rounds, singles = _count_sends(monkeypatch)
    server = RedisServer().start()  # its own: every connection on it is this test's
    redis_client = server.client()
    c = aredis.Redis(port=server.port)
    n = 300
    names = [name() for _ in range(n)]
    bs = [AsyncCircuitBreaker(x, CircuitBreakerConfig(**BATCHED), redis=c) for x in names]
    try:
        for b in bs:  # each breaker's first read, one at a time
            await b.call(_aok)
            assert await b.flush(5)
        rounds.clear()
        singles[0] = 0
        for _ in range(3):  # as a loop of many concurrent tasks calls them
            await asyncio.gather(*(b.call(_aok) for b in bs))
            with contextlib.suppress(Boom):
                await bs[0].call(_aboom)
        peak = len(redis_client.client_list(_type="normal"))
        for b in bs:
            assert await b.flush(10)
        for x, b in zip(names, bs, strict=True):
            w = window(redis_client, x)
            m = b.get_metrics()
            assert w.get("c") == ("7" if x == names[0] else "4"), (x, w, m)
        assert all(b.get_metrics().lost_outcomes == 0 for b in bs)
        assert all(b.get_metrics().store_failovers == 0 for b in bs)
        sent = sum(rounds) + singles[0]
        assert sent >= n
        assert len(rounds) + singles[0] < sent / 10, (rounds, singles)
        assert max(rounds) > 50, rounds
        assert len(redis_client.client_list(_type="normal")) <= 12
        assert peak <= 12, peak
    finally:
        for b in bs:
            await b.close()
        await c.aclose()
        server.stop()


async def test_async_pipeline_timed_out_asks_redis_once_not_once_per_breaker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tcp_proxy import TcpProxy

    from distbreaker.stores.redis import AsyncRedisStore

    pings: list[float] = []
    alive = AsyncRedisStore.alive

    async def counted(self: AsyncRedisStore, timeout: float) -> bool:
        pings.append(timeout)
        return await alive(self, timeout)

    monkeypatch.setattr(AsyncRedisStore, "alive", counted)
    server = RedisServer().start()
    proxy = TcpProxy(server.port).start()
    cfg = CircuitBreakerConfig(**{**BATCHED, "redis_background_timeout": 0.4,
                                  "failover_after": 0.2})
    c = aredis.Redis.from_url(proxy.url)
    bs = [AsyncCircuitBreaker(name(), cfg, redis=c) for _ in range(40)]
    try:
        for b in bs:
            assert await b.flush(5)
        await bs[0].call(_aok)
        assert await bs[0].flush(5)
        proxy.blackhole(True)
        t0 = time.monotonic()
        for b in bs:
            await b.call(_aok)
        for b in bs:
            await b.flush(5)
        took = time.monotonic() - t0
        proxy.blackhole(False)
        lost = sum(b.get_metrics().lost_outcomes + b.get_metrics().unshared_outcomes
                   for b in bs)
        assert lost >= 1
        assert len(pings) <= 4, pings  # once per pipeline, not once per breaker
        assert took < 5.0, took
    finally:
        for b in bs:
            await b.close()
        await c.aclose()
        proxy.stop()
        server.stop()


@pytest.mark.parametrize("kind", ["sync", "asyncio"])
def test_a_pipeline_of_error_replies_reloads_and_applies_each_outcome_once(
        kind: str, redis_server: RedisServer) -> None:
    """FUNCTION FLUSH between two passes of the writer: every reply of the next pipeline
    is an error ("Function not found"), read from the bulk of the stream like any reply;
    the library is loaded once and the batches sent again, each applied exactly once."""
    admin = redis_server.client()
    names = [name() for _ in range(40)]
    cfg = CircuitBreakerConfig(**BATCHED)

    def flushed() -> None:
        admin.function_flush()
        admin.script_flush()
        admin.config_resetstat()

    def check() -> None:
        for x in names:
            assert window(admin, x).get("c") == "2", (x, window(admin, x))
        stats = admin.info("commandstats")
        # every batch met the error (none ran before the library was back), and the
        # reloads were few: one per pipeline, not one per breaker
        assert stats["cmdstat_fcall"]["calls"] >= 2 * len(names), stats["cmdstat_fcall"]
        assert 1 <= stats["cmdstat_function|load"]["calls"] <= 3, stats

    if kind == "sync":
        c = redis.Redis(port=redis_server.port)
        bs = [CircuitBreaker(x, cfg, redis=c) for x in names]
        for b in bs:
            b.call(ok)
            assert b.flush(5)
        flushed()
        for b in bs:
            b.call(ok)
        assert all(b.flush(10) for b in bs)
        check()
        assert all(b.get_metrics().lost_outcomes == 0 for b in bs)
        for b in bs:
            b.close()
        c.close()
        return

    async def run() -> None:
        c = aredis.Redis(port=redis_server.port)
        bs = [AsyncCircuitBreaker(x, cfg, redis=c) for x in names]
        for b in bs:
            await b.call(_aok)
            assert await b.flush(5)
        flushed()
        await asyncio.gather(*(b.call(_aok) for b in bs))
        for b in bs:
            assert await b.flush(10)
        check()
        assert all(b.get_metrics().lost_outcomes == 0 for b in bs)
        for b in bs:
            await b.close()
        await c.aclose()

    asyncio.run(run())


async def test_a_lingering_breaker_keeps_at_most_two_timed_wakes(
        redis_server: RedisServer) -> None:
    """Full batches go out while a breaker lingers: each one used to leave a timed wake
    behind in the writer's heap (thousands for one breaker, found by review); a wake that
    an earlier one covers is not pushed, and a replaced one is skipped when it comes up.
    Both writers, the loop's and the thread's."""
    from distbreaker._batch import thread_writer
    from distbreaker._loop_writer import loop_writer

    cfg = CircuitBreakerConfig(**{**BATCHED, "batch_linger": 0.3, "max_batch": 5})
    c = aredis.Redis(port=redis_server.port)
    a = AsyncCircuitBreaker(name(), cfg, redis=c)
    s = CircuitBreaker(name(), cfg, redis=redis.Redis(port=redis_server.port))
    try:
        await a.refresh()
        s.refresh()
        most = [0, 0]
        for _ in range(300):
            await a.call(_aok)
            s.call(ok)
            await asyncio.sleep(0)
            most[0] = max(most[0], len(loop_writer()._timed))
            most[1] = max(most[1], len(thread_writer()._timed))
        assert await a.flush(10) and s.flush(10)
        assert most[0] <= 2 and most[1] <= 2, most
        assert window(redis_server.client(), a.name)["c"] == "300"
        assert window(redis_server.client(), s.name)["c"] == "300"
    finally:
        await a.close()
        s.close()
        await c.aclose()
