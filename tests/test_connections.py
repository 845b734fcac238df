"""The stores' own idle connections (`_clients.IdleConnections`), on a real redis-server.

A strict call takes its connection from a deque the store keeps, not from redis-py's pool
(whose get and release cost about a tenth of the call). What the pool guaranteed must
still hold: one connection serves calls one after another, a connection the server closed
while idle costs no call anything (no failure, no failover), and a forked child never
touches its parent's sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

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
        # the caller's connection and the slow client's, which the listener's first
        # re-read opens whenever its thread gets to it: both before the snapshot
        assert until(lambda: len(_conns(admin)) == 2, 5.0), _conns(admin)
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


# -- the bulk reply reader of pipelines (stores.redis._read_replies and its asyncio twin) ---


def _sync_conn(data: bytes, close: bool = False) -> tuple[redis.Connection, Any]:
    """A redis-py connection whose socket holds `data` from the "server" (the other end
    of a socket pair, closed after it when `close`)."""
    import socket

    ours, theirs = socket.socketpair()
    ours.settimeout(1.0)
    theirs.sendall(data)
    if close:
        theirs.close()
    conn = redis.Connection()
    conn._sock = ours  # the reader's only use of it: recv on the socket
    return conn, theirs


def _aread(data: bytes, n: int, out: list[Any], close: bool = False,
           timeout: float | None = None) -> None:
    """`_aread_replies` on an asyncio connection whose stream holds `data` (and then
    ends, when `close`)."""
    from distbreaker.stores.redis import _aread_replies

    async def run() -> None:
        conn = aredis.Connection(socket_timeout=timeout)
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        if close:
            reader.feed_eof()
        conn._reader = reader
        await _aread_replies(conn, n, out)

    asyncio.run(run())


@pytest.mark.parametrize("kind", ["sync", "asyncio"])
def test_bulk_replies_keep_redis_pys_exception_classes(kind: str) -> None:
    """A pipeline's error replies become what redis-py makes of them: one call's
    ResponseError (NoScriptError here) stays that call's result, and the pipeline goes
    on; LOADING, which redis-py raises as a connection error, is raised, with the replies
    before it kept."""
    from distbreaker.stores.redis import _read_replies

    wire = b":1\r\n-NOSCRIPT No matching script.\r\n:3\r\n-LOADING Redis is loading\r\n:5\r\n"
    out: list[Any] = []
    with pytest.raises(redis.BusyLoadingError):
        if kind == "sync":
            _read_replies(_sync_conn(wire)[0], 5, out)
        else:
            _aread(wire, 5, out)
    assert out[0] == 1 and isinstance(out[1], redis.exceptions.NoScriptError)
    assert out[2] == 3 and len(out) == 3


@pytest.mark.parametrize("kind", ["sync", "asyncio"])
def test_bulk_replies_out_of_step_are_all_dropped(kind: str) -> None:
    """More bytes than the replies asked for: the connection is out of step with its
    requests, so none of the replies read is handed out as a call's."""
    from distbreaker.stores.redis import _read_replies

    out: list[Any] = ["an earlier result"]
    with pytest.raises(redis.ConnectionError, match="bytes after the replies"):
        if kind == "sync":
            _read_replies(_sync_conn(b":1\r\n:2\r\n")[0], 1, out)
        else:
            _aread(b":1\r\n:2\r\n", 1, out)
    assert out == ["an earlier result"]


@pytest.mark.parametrize("kind", ["sync", "asyncio"])
def test_bulk_replies_cut_by_a_closed_connection_keep_what_came(kind: str) -> None:
    from distbreaker.stores.redis import _read_replies

    out: list[Any] = []
    with pytest.raises(redis.ConnectionError, match="closed by server"):
        if kind == "sync":
            conn, _peer = _sync_conn(b":1\r\n*2\r\n:7\r\n", close=True)
            _read_replies(conn, 3, out)
        else:
            _aread(b":1\r\n*2\r\n:7\r\n", 3, out, close=True)
    assert out == [1]


def test_bulk_replies_time_out_as_redis_timeouts() -> None:
    from distbreaker.stores.redis import _read_replies

    conn, _peer = _sync_conn(b":1\r\n")
    conn._sock.settimeout(0.05)
    with pytest.raises(redis.TimeoutError):
        _read_replies(conn, 2, [])
    with pytest.raises(redis.TimeoutError):
        _aread(b":1\r\n", 2, [], timeout=0.05)


def test_bulk_replies_tell_an_os_timeout_from_a_slow_reply() -> None:
    """ETIMEDOUT from the OS (keepalive, TCP_USER_TIMEOUT) means a dead connection, as
    redis-py reads it, not a slow reply: a ConnectionError, not a TimeoutError."""
    import errno

    from distbreaker.stores.redis import _aread_replies

    async def run() -> None:
        conn = aredis.Connection(socket_timeout=1.0)
        reader = asyncio.StreamReader()
        reader.set_exception(TimeoutError(errno.ETIMEDOUT, "Connection timed out"))
        conn._reader = reader
        await _aread_replies(conn, 1, [])

    with pytest.raises(redis.ConnectionError) as ei:
        asyncio.run(run())
    assert not isinstance(ei.value, redis.TimeoutError)


class _Idle:
    """What an `Exchange` gives its connection back to: counts both ways."""

    def __init__(self) -> None:
        self.pool = aredis.ConnectionPool()
        self.put_back: list[Any] = []
        self.released: list[Any] = []

    def put(self, conn: Any) -> None:
        self.put_back.append(conn)


def _exchange(reader: asyncio.StreamReader, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    from distbreaker.stores import redis as store_mod
    from distbreaker.stores.redis import Exchange, _Packer

    idle = _Idle()

    async def release(pool: Any, conn: Any) -> None:
        idle.released.append(conn)

    monkeypatch.setattr(store_mod, "_arelease", release)
    conn = aredis.Connection(socket_timeout=1.0)
    conn._reader = reader
    return Exchange(_Packer(), idle, conn, reader), idle


#: the task-free asyncio call needs asyncio.timeout as fixed in 3.11.3; before, every
#: request has a task of its own, and the tests below check that this is so
TASK_FREE = sys.version_info >= (3, 11, 3)


def _task_path_only() -> bool:
    """Before 3.11.3: assert that no request is ever sent task-free (send_now declines),
    and say so, for the Exchange tests to stop there."""
    if TASK_FREE:
        return False
    from distbreaker._protocol import ScriptCall
    from distbreaker.stores.redis import AsyncRedisStore

    store = AsyncRedisStore(aredis.Redis())
    assert store.send_now(ScriptCall("snapshot", [], [])) is None
    return True


async def test_exchange_reads_an_os_timeout_as_a_dead_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ETIMEDOUT from the OS while the caller reads its reply is a dead connection: a
    ConnectionError marked sent, the connection dropped once, and nothing left to finish
    (read as our own wait running out, the connection was read again after it had been
    given back, and so handed to two users). Found by review."""
    if _task_path_only():
        return
    import errno

    from distbreaker._clients import was_sent

    reader = asyncio.StreamReader()
    reader.set_exception(TimeoutError(errno.ETIMEDOUT, "Connection timed out"))
    ex, idle = _exchange(reader, monkeypatch)
    with pytest.raises(redis.ConnectionError) as ei:
        await ex.reply(1.0)
    assert not isinstance(ei.value, redis.TimeoutError) and was_sent(ei.value)
    assert ex.settled and idle.released == [ex._conn] and idle.put_back == []
    with pytest.raises(redis.ConnectionError):  # a finish() now reads nothing
        await ex.finish(time.monotonic() + 1)
    assert idle.released == [ex._conn]


async def test_exchange_late_reply_is_finished_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """No reply within the caller's wait: TimeoutError, nothing consumed; the background
    finish reads it, and the connection goes back once."""
    if _task_path_only():
        return
    reader = asyncio.StreamReader()
    ex, idle = _exchange(reader, monkeypatch)
    with pytest.raises(TimeoutError):
        await ex.reply(0.02)
    assert not ex.settled
    asyncio.get_running_loop().call_later(0.02, reader.feed_data, b"*2\r\n:1\r\n:7\r\n")
    assert await ex.finish(time.monotonic() + 2) == [1, 7]
    assert ex.settled and idle.put_back == [ex._conn] and idle.released == []


async def test_exchange_finish_cancelled_drops_the_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop ends while a late reply is awaited: the connection is dropped and its
    slot given back, never left checked out (found by review: it leaked)."""
    if _task_path_only():
        return
    reader = asyncio.StreamReader()
    ex, idle = _exchange(reader, monkeypatch)
    with pytest.raises(TimeoutError):
        await ex.reply(0.01)
    task = asyncio.ensure_future(ex.finish(time.monotonic() + 10))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ex.settled and idle.released == [ex._conn] and idle.put_back == []


async def test_a_late_not_loaded_reply_loads_the_library_and_runs_the_call_again() -> None:
    """The caller gave up waiting (Redis paused); the reply, when it comes, says the
    library is not loaded (FUNCTION FLUSH before): the call did not run, so it is loaded
    and sent again in the background and its outcome counted once, with no failover
    (found by review: the late error failed the client over)."""
    from redis_server import RedisServer

    server = RedisServer().start()
    admin = server.client()
    b = AsyncCircuitBreaker("late-noload", CircuitBreakerConfig(redis_timeout=0.05),
                            redis=aredis.Redis(port=server.port))
    try:
        async def one() -> int:
            return 1

        await b.call(one)  # loads the library
        admin.function_flush()
        admin.execute_command("CLIENT", "PAUSE", 300, "ALL")
        await b.call(one)  # its record waits for the pause and comes back "not loaded"
        for _ in range(300):
            w = admin.hgetall(f"distbreaker:v1:{{{b.name}}}:window")
            if w.get(b"c") == b"2" and not b._engine.background:
                break
            await asyncio.sleep(0.01)
        assert w.get(b"c") == b"2", w
        m = b.get_metrics()
        assert m.store_failovers == 0 and m.lost_outcomes == 0, m
    finally:
        await b.close()
        admin.close()
        server.stop()


def test_a_reply_awaited_when_the_loop_ends_is_reported_lost_once(server: RedisServer) -> None:
    """asyncio.run ends while a strict caller awaits its reply (Redis paused): the
    caller's cancel starts the late finish after the shutdown listed the tasks it waits
    for, so nothing runs it to the end. Its outcome is reported lost once, when the
    breaker is next used on another loop (or at exit); before, never (found by review)."""
    import subprocess
    import textwrap

    code = textwrap.dedent(f"""
        import asyncio, time
        import redis, redis.asyncio as aredis
        from distbreaker import AsyncCircuitBreaker, CircuitBreakerConfig

        admin = redis.Redis(port={server.port})
        b = AsyncCircuitBreaker("loop-end", CircuitBreakerConfig(redis_timeout=2.0,
                                redis_background_timeout=5.0),
                                redis=aredis.Redis(port={server.port}))

        async def one():
            return 1

        async def main():
            await b.call(one)
            admin.execute_command("CLIENT", "PAUSE", 800, "ALL")
            asyncio.ensure_future(b.call(one))
            await asyncio.sleep(0.2)  # its reply is awaited when main returns

        asyncio.run(main())
        print(b.get_metrics().lost_outcomes)
        time.sleep(0.8)

        async def again():
            await b.call(one)  # on a new loop
            print(b.get_metrics().lost_outcomes)
            await b.close()

        asyncio.run(again())
        print(b.get_metrics().lost_outcomes)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    # task-free, the late finish never ran, and the next use reports it; with a task per
    # request (before 3.11.3), the loop's shutdown cancels that task, which reports it
    first = "0" if TASK_FREE else "1"
    assert p.stdout.split() == [first, "1", "1"], p.stdout + p.stderr


def test_an_asyncio_strict_call_turns_the_loop_twice(server: RedisServer) -> None:
    """The README's count: a strict call's request is written at once and its reply read
    in the caller's task, two turns of the event loop per call (a task per request took
    four, redis-py's own EVALSHA five). Counted over 200 calls, so a listener's turn now
    and then does not matter."""

    class Counting(asyncio.SelectorEventLoop):
        turns = 0

        def _run_once(self) -> None:
            Counting.turns += 1
            super()._run_once()  # type: ignore[misc]

    async def main() -> float:
        b = AsyncCircuitBreaker("turns", CircuitBreakerConfig(redis_timeout=2.0),
                                redis=aredis.Redis(port=server.port))

        async def one() -> int:
            return 1

        for _ in range(20):
            await b.call(one)
        t0 = Counting.turns
        for _ in range(200):
            await b.call(one)
        per_call = (Counting.turns - t0) / 200
        await b.close()
        return per_call

    loop = Counting()
    try:
        per_call = loop.run_until_complete(main())
    finally:
        loop.close()
    assert per_call <= (2.5 if TASK_FREE else 4.5), per_call  # a task per request: 4


@pytest.mark.parametrize("wire", [b"-ERR boom\r\n", b"-LOADING Redis is loading\r\n"])
def test_an_error_reply_raised_leaves_no_reference_cycle(wire: bytes) -> None:
    """An error reply raised from the reply reader must not make a cycle (the exception
    in a local of a frame its traceback holds): only the GC would break it, and meanwhile
    every frame of the call stays alive, a dropped breaker's engine among them. This is
    why the dropped-breaker test failed under CPU load (5 runs in 12 with two hogs)."""
    import gc
    import weakref

    from distbreaker.stores.redis import _read_reply

    conn, _peer = _sync_conn(wire)

    class Marker:
        pass

    def caller() -> Any:
        m = Marker()
        ref = weakref.ref(m)
        with contextlib.suppress(redis.RedisError):
            _read_reply(conn)
        return ref

    gc.collect()
    gc.disable()
    try:
        ref = caller()
        assert ref() is None  # the caller's frame (and m) went with the exception
    finally:
        gc.enable()
