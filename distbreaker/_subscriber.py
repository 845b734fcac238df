"""The listener's pub/sub connection, read in bulk.

A storm of transitions (hundreds of breakers tripped by one outage) arrives as hundreds of
messages at once. redis-py's `PubSub.get_message` parses one message per call, with a
readiness poll, a retry wrapper and a dict per message: about 10 us each, as much as the
rest of the listener's work. So for a plain or Sentinel-managed redis-py client the
listener takes a connection from the client's pool (redis-py connects it: address,
Sentinel, TLS, AUTH, database), writes SUBSCRIBE and PING on it, and parses every
complete frame of one `recv` at once (`Frames`, sans I/O): about 2.5 us a message.
Cluster clients and anything else (fakeredis) keep redis-py's `PubSub` (`PubSubReader`).

Every reader returns a list of `(kind, data)`, as redis-py's PubSub reports them:
("subscribe", count), ("message", payload), ("pong", token); other kinds are passed on
and ignored by the hub.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from ._clients import pool_aget, pool_arelease, pool_get, pool_release, raw_capable

__all__ = ["AsyncPubSubReader", "AsyncSocketReader", "Frames", "PubSubReader", "ReplyError",
           "ReplyParser", "SocketReader", "aopen_reader", "open_reader"]

Item = tuple[str, Any]

_CHUNK = 1 << 16
_MAX_PENDING = 16 << 20  # an unfinished frame this large is not ours: reconnect
_MSG = b"*3\r\n$7\r\nmessage\r\n"
_INCOMPLETE = object()


class Frames:
    """RESP2 and RESP3 pub/sub frames parsed from a byte stream (sans I/O). `feed` returns
    every complete frame and keeps the rest for the next call. An error reply (a SUBSCRIBE
    the ACL refuses) raises ResponseError; bytes that are not RESP raise ConnectionError:
    either way the listener drops the connection and subscribes again."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[Item]:
        buf = self._buf + data if self._buf else data
        out: list[Item] = []
        pos = 0
        n = len(buf)
        try:
            while pos < n:
                if buf.startswith(_MSG, pos):  # the common frame, parsed inline
                    p = pos + 17
                    e = buf.find(b"\r\n", p)
                    if e < 0:
                        break
                    if buf[p] != 36:
                        raise ValueError("a message's channel is not a bulk string")
                    p = e + 2 + int(buf[p + 1:e]) + 2  # skip the channel
                    e = buf.find(b"\r\n", p)
                    if e < 0:
                        break
                    if buf[p] != 36:
                        raise ValueError("a message's payload is not a bulk string")
                    end = e + 2 + int(buf[p + 1:e])
                    if end + 2 > n:
                        break
                    out.append(("message", buf[e + 2:end]))
                    pos = end + 2
                    continue
                value, p = _element(buf, pos, n)
                if value is _INCOMPLETE:
                    break
                out.append(_item(value))
                pos = p
        except (ValueError, IndexError) as e:
            raise RedisConnectionError(f"not a pub/sub reply on the listener's connection: "
                                       f"{buf[pos:pos + 60]!r}") from e
        self._buf = buf[pos:]
        if len(self._buf) > _MAX_PENDING:
            raise RedisConnectionError("an unfinished frame of over 16 MB on the listener's "
                                       "connection")
        return out


class _Error:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class ReplyError(str):
    """The text of an error reply (`ReplyParser`), for the caller to raise as it wants."""


class ReplyParser:
    """Whole RESP2 replies from a byte stream (sans I/O), as redis-py returns them without
    decoding: bytes, int, None, lists of those; an error reply as a `ReplyError`. For the
    replies of a pipeline, parsed from a few reads instead of a read and a parse per line
    of every reply (redis-py's async parser awaits each line). Bytes that are not RESP
    raise ConnectionError."""

    def __init__(self) -> None:
        self._buf = b""

    @property
    def pending(self) -> int:
        """Bytes of an unfinished reply."""
        return len(self._buf)

    def feed(self, data: bytes, out: list[Any]) -> None:
        """Append to `out` every reply `data` completes."""
        buf = self._buf + data if self._buf else data
        pos, n = 0, len(buf)
        try:
            while pos < n:
                value, p = _element(buf, pos, n)
                if value is _INCOMPLETE:
                    break
                out.append(ReplyError(value.text) if isinstance(value, _Error) else value)
                pos = p
        except (ValueError, IndexError) as e:
            raise RedisConnectionError(f"not a reply: {buf[pos:pos + 60]!r}") from e
        self._buf = buf[pos:]


def _element(buf: bytes, pos: int, n: int) -> tuple[Any, int]:
    """One RESP value at `pos`: (value, position after it), or (_INCOMPLETE, pos)."""
    e = buf.find(b"\r\n", pos)
    if e < 0:
        return _INCOMPLETE, pos
    t = buf[pos]
    line = buf[pos + 1:e]
    if t == 36:  # $ bulk string
        size = int(line)
        if size < 0:
            return None, e + 2
        end = e + 2 + size
        if end + 2 > n:
            return _INCOMPLETE, pos
        if buf[end:end + 2] != b"\r\n":
            raise ValueError("a bulk string longer than its length says")
        return buf[e + 2:end], end + 2
    if t in (42, 62):  # * array, > push
        count = int(line)
        if count < 0:
            return None, e + 2  # a null array, as redis-py reads it
        items: list[Any] = []
        p = e + 2
        for _ in range(max(count, 0)):
            if p < n and buf[p] == 58:  # an integer, inline: most replies are arrays of them
                e2 = buf.find(b"\r\n", p)
                if e2 < 0:
                    return _INCOMPLETE, pos
                items.append(int(buf[p + 1:e2]))
                p = e2 + 2
                continue
            v, p2 = _element(buf, p, n)
            if v is _INCOMPLETE:
                return _INCOMPLETE, pos
            items.append(v)
            p = p2
        return items, p
    if t == 43:  # + simple string
        return line, e + 2
    if t == 58:  # : integer
        return int(line), e + 2
    if t == 95:  # _ null (RESP3)
        return None, e + 2
    if t == 45:  # - error
        return _Error(line.decode(errors="replace")), e + 2
    raise ValueError(f"unexpected RESP type byte {t!r}")


def _item(value: Any) -> Item:
    if isinstance(value, _Error):
        raise ResponseError(value.text)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        kind = value[0].decode(errors="replace").lower()
        if kind == "pong":
            return "pong", value[1] if len(value) > 1 else b""
        return kind, value[2] if len(value) > 2 else (value[1] if len(value) > 1 else None)
    return "pong", value  # RESP3 answers a PING in subscribed mode with a plain reply


class SocketReader:
    """A pub/sub connection of a plain or Sentinel-managed sync client, read in bulk."""

    def __init__(self, client: Any, channel: str) -> None:
        self._pool = client.connection_pool
        self._conn = pool_get(self._pool)  # connected, authenticated, database selected
        self._frames = Frames()
        try:
            self._conn.send_command("SUBSCRIBE", channel, check_health=False)
        except BaseException:
            self.close()
            raise

    def read(self, timeout: float) -> list[Item]:
        """Every frame that arrives within `timeout` ([] if none)."""
        sock = getattr(self._conn, "_sock", None)  # redis-py has no public raw read
        if sock is None:
            raise RedisConnectionError("the listener's connection is closed")
        try:
            sock.settimeout(max(timeout, 0.001))
            data = sock.recv(_CHUNK)
        except TimeoutError:
            return []
        except OSError as e:
            raise RedisConnectionError(f"the listener's connection failed: {e}") from e
        if not data:
            raise RedisConnectionError("Connection closed by server.")
        return self._frames.feed(data)

    def ping(self, token: str) -> None:
        self._conn.send_command("PING", token, check_health=False)

    def close(self) -> None:
        try:
            self._conn.disconnect()
        finally:
            pool_release(self._pool, self._conn)


class AsyncSocketReader:
    """The asyncio twin of `SocketReader`; opened with `aopen_reader`."""

    def __init__(self, pool: Any, conn: Any) -> None:
        self._pool = pool
        self._conn = conn
        self._frames = Frames()

    async def read(self, timeout: float) -> list[Item]:
        reader = getattr(self._conn, "_reader", None)  # redis-py has no public raw read
        if reader is None:
            raise RedisConnectionError("the listener's connection is closed")
        try:
            data = await asyncio.wait_for(reader.read(_CHUNK), max(timeout, 0.001))
        except asyncio.TimeoutError:
            return []
        except OSError as e:
            raise RedisConnectionError(f"the listener's connection failed: {e}") from e
        if not data:
            raise RedisConnectionError("Connection closed by server.")
        return self._frames.feed(data)

    async def ping(self, token: str) -> None:
        await self._conn.send_command("PING", token, check_health=False)

    async def close(self) -> None:
        try:
            await self._conn.disconnect()
        finally:
            await pool_arelease(self._pool, self._conn)


class PubSubReader:
    """redis-py's PubSub behind the same three calls (Cluster clients, fakeredis)."""

    def __init__(self, client: Any, channel: str) -> None:
        self._ps = client.pubsub()
        try:
            self._ps.subscribe(channel)
        except BaseException:
            self.close()
            raise

    def read(self, timeout: float) -> list[Item]:
        msg = self._ps.get_message(timeout=timeout)
        return [] if msg is None else [(msg["type"], msg["data"])]

    def ping(self, token: str) -> None:
        self._ps.ping(token)

    def close(self) -> None:
        self._ps.close()


class AsyncPubSubReader:
    def __init__(self, ps: Any) -> None:
        self._ps = ps

    async def read(self, timeout: float) -> list[Item]:
        msg = await self._ps.get_message(timeout=timeout)
        return [] if msg is None else [(msg["type"], msg["data"])]

    async def ping(self, token: str) -> None:
        await self._ps.ping(token)

    async def close(self) -> None:
        close = getattr(self._ps, "aclose", None) or self._ps.close
        await close()


def open_reader(client: Any, channel: str) -> SocketReader | PubSubReader:
    """Subscribe to `channel` on a connection of `client` (sent; the confirmation arrives
    as a ("subscribe", ...) item)."""
    if raw_capable(client) and isinstance(client, redis.Redis):
        return SocketReader(client, channel)
    return PubSubReader(client, channel)


async def aopen_reader(client: Any, channel: str) -> AsyncSocketReader | AsyncPubSubReader:
    """The asyncio twin of `open_reader`."""
    if raw_capable(client) and not isinstance(client, redis.Redis):
        pool = client.connection_pool
        conn = await pool_aget(pool)
        reader = AsyncSocketReader(pool, conn)
        try:
            await conn.send_command("SUBSCRIBE", channel, check_health=False)
        except BaseException:
            await reader.close()
            raise
        return reader
    ps = client.pubsub()
    try:
        await ps.subscribe(channel)
    except BaseException:
        await AsyncPubSubReader(ps).close()
        raise
    return AsyncPubSubReader(ps)
