"""The listener's pub/sub connection: frames parsed in bulk, and the reader each client gets.

`Frames` is fed what one read returned; a frame may be split anywhere across reads, and a
read may hold hundreds of frames (a storm). Every rule is checked on bytes alone, then
against a real redis-server: what Redis sends for SUBSCRIBE, PUBLISH and PING in RESP2 and
RESP3 is parsed as redis-py's PubSub would report it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from distbreaker._subscriber import (
    AsyncPubSubReader,
    AsyncSocketReader,
    Frames,
    PubSubReader,
    SocketReader,
    aopen_reader,
    open_reader,
)

from redis_server import RedisServer


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    s = RedisServer().start()
    yield s
    s.stop()


def _msg(channel: bytes, data: bytes) -> bytes:
    return b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel), channel, len(data), data)


SUB = b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
PONG2 = b"*2\r\n$4\r\npong\r\n$5\r\nbeat1\r\n"


def test_a_storm_in_one_read_is_every_frame_in_order() -> None:
    payloads = [b"v1 t closed open %d 0 0 - %d - n%d" % (i, i, i) for i in range(300)]
    items = Frames().feed(SUB + b"".join(_msg(b"ch", p) for p in payloads) + PONG2)
    assert items[0] == ("subscribe", 1)
    assert [d for k, d in items[1:-1]] == payloads
    assert all(k == "message" for k, _ in items[1:-1])
    assert items[-1] == ("pong", b"beat1")


@pytest.mark.parametrize("step", [1, 2, 3, 7, 16, 64])
def test_a_frame_split_anywhere_across_reads_comes_out_once_whole(step: int) -> None:
    stream = SUB + _msg(b"ch", b"x" * 40) + _msg(b"ch", b"") + PONG2 + _msg(b"c", b"\r\n$")
    f = Frames()
    out: list[Any] = []
    for i in range(0, len(stream), step):
        out += f.feed(stream[i:i + step])
    assert out == [("subscribe", 1), ("message", b"x" * 40), ("message", b""),
                   ("pong", b"beat1"), ("message", b"\r\n$")]


def test_resp3_pushes_and_plain_ping_replies() -> None:
    push_sub = b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
    push_msg = b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nabc\r\n"
    items = Frames().feed(push_sub + push_msg + b"$5\r\nbeat1\r\n" + b"+PONG\r\n")
    assert items == [("subscribe", 1), ("message", b"abc"), ("pong", b"beat1"),
                     ("pong", b"PONG")]


def test_other_kinds_pass_through_for_the_hub_to_ignore() -> None:
    unsub = b"*3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n"
    pmsg = b"*4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$2\r\nch\r\n$1\r\nz\r\n"
    assert [k for k, _ in Frames().feed(unsub + pmsg)] == ["unsubscribe", "pmessage"]


def test_an_error_reply_raises_it() -> None:
    with pytest.raises(ResponseError, match="NOPERM"):
        Frames().feed(b"-NOPERM this user has no permissions to access the channel\r\n")


@pytest.mark.parametrize("garbage", [b"HTTP/1.1 400 Bad Request\r\n", b"*3\r\n$x\r\n",
                                     b"*3\r\n$7\r\nmessage\r\n#2\r\nch\r\n"])
def test_bytes_that_are_not_resp_name_the_problem(garbage: bytes) -> None:
    with pytest.raises(RedisConnectionError, match="not a pub/sub reply"):
        Frames().feed(garbage)


def test_an_endless_frame_is_refused_not_buffered_forever() -> None:
    f = Frames()
    f.feed(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$99999999999\r\n")
    with pytest.raises(RedisConnectionError, match="16 MB"):
        for _ in range(300):
            f.feed(b"z" * 65536)


def test_each_client_kind_gets_its_reader(server: RedisServer) -> None:
    r = redis.Redis(port=server.port)
    reader = open_reader(r, "ch")
    try:
        assert isinstance(reader, SocketReader)
    finally:
        reader.close()
    fake = open_reader(fakeredis.FakeRedis(), "ch")
    try:
        assert isinstance(fake, PubSubReader)
    finally:
        fake.close()

    async def both() -> None:
        a = await aopen_reader(aredis.Redis(port=server.port), "ch")
        try:
            assert isinstance(a, AsyncSocketReader)
        finally:
            await a.close()
        af = await aopen_reader(fakeredis.FakeAsyncRedis(), "ch")
        try:
            assert isinstance(af, AsyncPubSubReader)
        finally:
            await af.close()

    asyncio.run(both())


def _collect(read: Any, want: int, limit: float = 5.0) -> list[Any]:
    out: list[Any] = []
    deadline = time.monotonic() + limit
    while len(out) < want and time.monotonic() < deadline:
        out += read(0.2)
    return out


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_real_server_subscription_storm_and_ping(server: RedisServer, protocol: int) -> None:
    r = redis.Redis(port=server.port, protocol=protocol)
    reader = open_reader(r, "storm-ch")
    admin = server.client()
    try:
        assert _collect(reader.read, 1) == [("subscribe", 1)]
        with admin.pipeline(transaction=False) as p:
            for i in range(500):
                p.publish("storm-ch", f"m{i}")
            p.execute()
        got = _collect(reader.read, 500)
        assert got == [("message", f"m{i}".encode()) for i in range(500)]
        reader.ping("beat7")
        assert _collect(reader.read, 1) == [("pong", b"beat7")]
    finally:
        reader.close()
        r.close()


def test_a_killed_connection_raises_and_a_quiet_one_returns_nothing(
        server: RedisServer) -> None:
    r = redis.Redis(port=server.port)
    reader = open_reader(r, "quiet")
    admin = server.client()
    try:
        assert _collect(reader.read, 1) == [("subscribe", 1)]
        t = time.monotonic()
        assert reader.read(0.1) == []
        assert time.monotonic() - t >= 0.09
        admin.client_kill_filter(_type="pubsub")
        with pytest.raises(RedisConnectionError):
            _collect(reader.read, 1)
    finally:
        reader.close()
        r.close()


def test_the_asyncio_reader_on_a_real_server(server: RedisServer) -> None:
    async def go() -> None:
        r = aredis.Redis(port=server.port)
        reader = await aopen_reader(r, "a-ch")
        admin = server.client()
        try:
            async def collect(want: int) -> list[Any]:
                out: list[Any] = []
                deadline = time.monotonic() + 5
                while len(out) < want and time.monotonic() < deadline:
                    out += await reader.read(0.2)
                return out

            assert await collect(1) == [("subscribe", 1)]
            for i in range(100):
                admin.publish("a-ch", f"m{i}")
            assert await collect(100) == [("message", f"m{i}".encode()) for i in range(100)]
            await reader.ping("beat9")
            assert await collect(1) == [("pong", b"beat9")]
            admin.client_kill_filter(_type="pubsub")
            with pytest.raises(RedisConnectionError):
                await collect(1)
        finally:
            await reader.close()
            await r.aclose()

    asyncio.run(go())


def test_reply_parser_reads_a_pipeline_fed_in_any_pieces() -> None:
    """The replies of a pipeline, as Redis sends them, fed whole or one byte at a time:
    the same values as redis-py's parser returns (bytes, int, None, nested lists), an
    error reply as its text, and nothing before a reply is whole."""
    from distbreaker._subscriber import ReplyError, ReplyParser

    wire = (b"*3\r\n:1\r\n:7\r\n:1700000000000\r\n"
            b"-NOSCRIPT No matching script.\r\n"
            b"*4\r\n$5\r\nclose\r\n$-1\r\n*2\r\n:0\r\n$0\r\n\r\n+OK\r\n"
            b":-3\r\n")
    want = [[1, 7, 1700000000000], "NOSCRIPT No matching script.",
            [b"close", None, [0, b""], b"OK"], -3]
    whole: list[object] = []
    ReplyParser().feed(wire, whole)
    assert whole == want and isinstance(whole[1], ReplyError)
    p, pieces = ReplyParser(), []
    for i in range(len(wire)):
        p.feed(wire[i:i + 1], pieces)
        assert len(pieces) <= len(want)
    assert pieces == want and p.pending == 0
    partial: list[object] = []
    q = ReplyParser()
    q.feed(wire[:10], partial)
    assert partial == [] and q.pending == 10


def test_reply_parser_refuses_bytes_that_are_not_resp() -> None:
    from distbreaker._subscriber import ReplyParser

    with pytest.raises(redis.ConnectionError, match="not a reply"):
        ReplyParser().feed(b"HTTP/1.1 400 Bad Request\r\n", [])


def test_reply_parser_reads_null_arrays_and_checks_bulk_lengths() -> None:
    from distbreaker._subscriber import ReplyParser

    out: list[object] = []
    ReplyParser().feed(b"*-1\r\n$-1\r\n", out)
    assert out == [None, None]  # as redis-py reads them
    with pytest.raises(redis.ConnectionError, match="not a reply"):
        ReplyParser().feed(b"$3\r\nabcXY\r\n", [])
