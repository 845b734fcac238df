"""Redis stores: run the operations as Redis Functions (FCALL) or scripts (EVALSHA).

For a plain or Sentinel-managed redis-py client the store writes the command itself: the
part that never changes for a breaker (function or script, KEYS, config, fingerprint,
channel, sender) is encoded once, and only the few per-call arguments are encoded per
call, on a connection from the client's own pool. redis-py's generic command path spends
about as long encoding record.lua's 17 arguments and running its hooks as the round
trip's floor on a small machine (see benchmarks/); every guarded call takes this path in
strict mode. The store calls the distbreaker Function library (loaded on first "Function
not found"), whose helpers and parsed configs stay loaded between calls; on a server
without Functions (Redis < 7) or a user without FCALL / FUNCTION LOAD rights it switches
to EVALSHA for good. Cluster clients and anything else go through redis-py's
``register_script`` objects (EVALSHA, reloaded on NOSCRIPT).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import sys
import time
import weakref
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import redis
import redis.asyncio

from .._clients import InFlight, background, deliver, idle_for
from .._clients import mark_sent as _mark
from .._clients import pool_arelease as _arelease
from .._clients import pool_get as _get
from .._clients import pool_release as _release
from .._clients import raw_capable as _raw_capable
from .._process import PROCESS
from .._protocol import ScriptCall
from .._subscriber import ReplyError, ReplyParser
from ._scripts import OPS, ScriptSet, function_library, function_name, script_source

__all__ = ["AsyncRedisStore", "RedisStore"]

_HEAD_CACHE_MAX = 65536  # breakers on one client


def _bulk(v: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(v), v)


def _enc(a: str | int | float | bytes) -> bytes:
    """One argument as redis-py would encode it (utf-8 text, repr for floats)."""
    if isinstance(a, str):
        v = a.encode()
    elif isinstance(a, bytes):
        v = a
    elif isinstance(a, float):
        v = repr(a).encode()
    else:
        v = b"%d" % a
    return b"$%d\r\n%s\r\n" % (len(v), v)


class _Packer:
    """Encodes script calls as FCALL (or, after `use_scripts`, EVALSHA). What every call of
    one breaker repeats (its keys and first four arguments) is encoded once and cached,
    one entry per breaker whatever the operation; the operation's own part is shared."""

    def __init__(self) -> None:
        self._targets = self._encode({op: (b"FCALL", function_name(op).encode()) for op in OPS})
        self._heads: dict[tuple[Any, ...], bytes] = {}
        self.functions = True

    @staticmethod
    def _encode(targets: dict[str, tuple[bytes, bytes]]) -> dict[str, bytes]:
        return {op: b"".join(_bulk(p) for p in parts) for op, parts in targets.items()}

    def reload_for(self, e: Exception, op: str) -> tuple[str, ...] | None:
        """The command that loads what error reply `e` says is missing (first use on a
        server, FUNCTION FLUSH, SCRIPT FLUSH, a restart), or None when `e` is a real error.
        A server or user that cannot run Functions switches this packer to scripts."""
        missing = _missing(e)
        if missing == "support":
            self.use_scripts()
            missing = "script"
        if missing == "function":
            return ("FUNCTION", "LOAD", "REPLACE", function_library())
        if missing == "script":
            return ("SCRIPT", "LOAD", script_source(op))
        return None

    def use_scripts(self) -> None:
        self._targets = self._encode({op: (b"EVALSHA", hashlib.sha1(
            script_source(op).encode()).hexdigest().encode()) for op in OPS})
        self.functions = False

    def pack(self, call: ScriptCall) -> bytes:
        a = call.args
        k = call.keys
        key = (k[0], a[0], a[1], a[2], a[3])
        head = self._heads.get(key)
        if head is None:
            if len(self._heads) >= _HEAD_CACHE_MAX:
                self._heads.clear()
            head = (_bulk(b"%d" % len(k)) + b"".join(_bulk(x.encode()) for x in k)
                    + b"".join(_enc(x) for x in a[:4]))
            self._heads[key] = head
        return b"*%d\r\n%s%s%s" % (3 + len(k) + len(a), self._targets[call.op], head,
                                   b"".join(map(_enc, a[4:])))


_PACKERS: weakref.WeakKeyDictionary[Any, _Packer] = weakref.WeakKeyDictionary()


def _packer_for(client: Any) -> _Packer:
    """One packer per client, shared by every breaker's store on it: the command heads
    are per breaker anyway, and what the server supports (Functions or scripts) is
    learnt once for all of them."""
    with PROCESS.lock:  # reset in a forked child, unlike a module-level lock
        p = _PACKERS.get(client)
        if p is None:
            p = _PACKERS[client] = _Packer()
        return p


def _missing(e: Exception) -> str:
    """What an error reply says is missing: "function" (load the library), "script"
    (load it), "support" (no Functions here: use scripts), or "" (a real error)."""
    if isinstance(e, redis.exceptions.NoScriptError) or str(e).startswith("NOSCRIPT"):
        return "script"
    msg = str(e)
    if "Function not found" in msg:
        return "function"
    if msg.startswith("unknown command"):
        return "support"
    low = msg.lower()
    if ("noperm" in low or "no permissions" in low) and ("'fcall'" in low
                                                          or "'function" in low):
        return "support"  # the ACL allows scripts but not Functions
    return ""


Done = Callable[[ScriptCall, Any, "BaseException | None"], None]


class RedisStore:
    """Runs script calls on a sync redis-py client.

    `client` serves callers: short timeouts, so that opening a connection never holds one
    long. `slow` (default: `client`) serves everything that may wait: requests finishing
    in the background, operator actions, the batched writer, the listener's re-reads.

    `run(call, wait, done)` is the caller's path: it sends, waits at most `wait` for the
    reply, and if none came, raises `InFlight` and leaves the request to a background
    thread, which reads the reply (or sends a request that could not be sent in time) by
    `deadline` seconds after the send and hands the outcome to `done(call, raw, exc)`
    (a bound method: nothing is allocated per call for the common case). A request
    is written to Redis at most once, so a late reply is applied exactly once.
    """

    def __init__(self, client: Any, slow: Any = None, deadline: float = 5.0) -> None:
        self.client = client
        self.slow = slow if slow is not None else client
        self.deadline = deadline
        self._scripts = ScriptSet(client)
        self._slow_scripts = ScriptSet(self.slow) if self.slow is not client else self._scripts
        self._packer = (_packer_for(client) if _raw_capable(client) and _raw_capable(self.slow)
                        else None)
        self._inline = type(client).__module__.startswith("fakeredis")  # no network
        self._idle = idle_for(client) if self._packer is not None else None
        self._slow_idle = idle_for(self.slow) if self._packer is not None else None

    def run(self, call: ScriptCall, wait: float | None = None, done: Done | None = None,
            _deadline: float | None = None) -> Any:
        packer = self._packer
        if wait is None or done is None or self._inline:
            return self.run_blocking(call)
        if packer is None:  # Cluster and other clients: redis-py's own path, on a thread
            fut = background(self.run_blocking, call)
            try:
                return fut.result(timeout=wait)
            except FutureTimeout:
                fut.add_done_callback(functools.partial(deliver, functools.partial(done, call)))
                raise InFlight from None
        payload = packer.pack(call)
        pool = self.client.connection_pool
        idle = self._idle
        if idle is None or idle.pool is not pool:
            idle = self._idle = idle_for(self.client)
        # the caller's whole wait, opening a connection and reloading included, is `wait`
        deadline = time.monotonic() + wait if _deadline is None else _deadline
        try:
            conn = idle.get()  # a new connection: at most the connect timeout
        except (redis.TimeoutError, TimeoutError):  # not sent: send it in the background
            background(_finish, self.run_blocking, done, call)
            raise InFlight from None
        except BaseException as e:
            _mark(e, False)
            raise
        sent = False
        try:
            conn.send_packed_command([payload])
            sent = True
            if conn.can_read(timeout=max(deadline - time.monotonic(), 0.0)):
                raw = conn.read_response()
            else:
                c, conn = conn, None
                background(_finish, _complete, done, call, c, pool,
                           time.monotonic() + self.deadline, packer, self.run_blocking)
                raise InFlight
        except redis.ResponseError as e:
            idle.put(conn)  # an error reply was read in full: the connection is fine
            conn = None
            load = packer.reload_for(e, call.op)
            if load is None or _deadline is not None:
                raise
            # first use on this server, or FUNCTION/SCRIPT FLUSH: load, then send again
            try:
                self._load(self.client, load, call.op)
            except (redis.TimeoutError, TimeoutError):
                background(_finish, self.run_blocking, done, call)  # it reloads itself
                raise InFlight from None
            if time.monotonic() >= deadline:
                background(_finish, self.run_blocking, done, call)
                raise InFlight from None
            return self.run(call, wait, done, deadline)
        except InFlight:
            raise
        except BaseException as e:
            if conn is not None:
                conn.disconnect()  # the reply may still be unread: never reuse it
                _release(pool, conn)
                conn = None
            _mark(e, sent)
            raise
        finally:
            if conn is not None:
                idle.put(conn)
        return raw

    @property
    def pipelines(self) -> bool:
        """Whether `run_many` can send several calls in one round trip (a plain or
        Sentinel-managed client; a Cluster client's calls go one at a time)."""
        return self._packer is not None and not self._inline

    # --- generated by .ci/unasync.py from AsyncRedisStore.run_many: do not edit ---
    def run_many(self, calls: list[ScriptCall]) -> list[Any]:
        """Send `calls` in one pipeline and read every reply: one round trip for all. Each
        result is the call's reply, or the exception it met (marked with whether it was
        sent, see `mark_sent`). Calls the server says are not loaded (first use, a flush)
        are loaded and sent again, once, in a second pipeline."""
        packer = self._packer
        assert packer is not None, "run_many needs a pipelining store"
        out = self._send_many([packer.pack(c) for c in calls])
        again: list[int] = []
        load: tuple[str, ...] | None = None
        for i, r in enumerate(out):
            if isinstance(r, redis.ResponseError):
                want = packer.reload_for(r, calls[i].op)
                if want is not None:
                    again.append(i)
                    load = load or want
        if load is not None:
            try:
                self._load(self.slow, load, calls[again[0]].op)
            except Exception as e:
                _mark(e, False)
                for i in again:
                    out[i] = e
                return out
            resent = self._send_many([packer.pack(calls[i]) for i in again])
            for i, r in zip(again, resent, strict=True):
                out[i] = r
        return out
    # --- end generated ---

    # --- generated by .ci/unasync.py from AsyncRedisStore._send_many: do not edit ---
    def _send_many(self, payloads: list[bytes]) -> list[Any]:
        idle = self._slow_idle
        if idle is None or idle.pool is not self.slow.connection_pool:
            idle = self._slow_idle = idle_for(self.slow)  # the client was replaced
        try:
            conn = idle.get()
        except Exception as e:
            _mark(e, False)
            return [e] * len(payloads)
        out: list[Any] = []
        ok = False
        try:
            _write(conn, payloads)
            _read_replies(conn, len(payloads), out)
            ok = True
        except Exception as e:
            conn.disconnect()  # replies may still be unread: never reuse this connection
            _mark(e, True)  # some were written, perhaps all: none is sent again
            out.extend([e] * (len(payloads) - len(out)))
        except BaseException:
            conn.disconnect()  # interrupted (cancelled): replies may be unread
            raise
        finally:
            if ok:
                idle.put(conn)
            else:
                _release(idle.pool, conn)
        return out
    # --- end generated ---

    def alive(self, timeout: float) -> bool:
        """Does Redis answer a PING within `timeout` on another connection? A request
        stuck on one connection (blackholed, say) is not an outage if it does."""
        if self._packer is None:
            try:
                return bool(background(self.slow.ping).result(timeout=timeout))
            except Exception:
                return False
        return _pings(self.client.connection_pool, timeout)

    # --- generated by .ci/unasync.py from AsyncRedisStore._load: do not edit ---
    def _load(self, client: Any, load: tuple[str, ...], op: str) -> None:
        """Load what a reply said is missing; a server that refuses FUNCTION LOAD gets
        the script instead (the packer switches to EVALSHA)."""
        assert self._packer is not None
        try:
            client.execute_command(*load)
        except redis.ResponseError as e:
            again = self._packer.reload_for(e, op)
            if again is None:
                raise
            client.execute_command(*again)
    # --- end generated ---

    # --- generated by .ci/unasync.py from AsyncRedisStore.run_blocking: do not edit ---
    def run_blocking(self, call: ScriptCall) -> Any:
        """Run a call on `self.slow`: waits up to its timeouts."""
        packer = self._packer
        if packer is None:
            scripts = self._slow_scripts
            return scripts[call.op](keys=call.keys[:scripts.nkeys], args=call.args)
        try:
            return self._send(packer.pack(call))
        except redis.ResponseError as e:
            load = packer.reload_for(e, call.op)
            if load is None:
                raise
        self._load(self.slow, load, call.op)
        return self._send(packer.pack(call))
    # --- end generated ---

    # --- generated by .ci/unasync.py from AsyncRedisStore._send: do not edit ---
    def _send(self, payload: bytes) -> Any:
        idle = self._slow_idle
        if idle is None or idle.pool is not self.slow.connection_pool:
            idle = self._slow_idle = idle_for(self.slow)  # the client was replaced
        try:
            conn = idle.get()
        except BaseException as e:
            _mark(e, False)
            raise
        sent = False
        ok = False
        try:
            _write(conn, [payload])
            sent = True
            raw = _read_reply(conn)
            ok = True
            return raw
        except redis.ResponseError:
            ok = True  # the connection is fine: an error reply was read in full
            raise
        except BaseException as e:
            conn.disconnect()  # the reply may still be unread: never reuse this connection
            _mark(e, sent)
            raise
        finally:
            if ok:
                idle.put(conn)
            else:
                _release(idle.pool, conn)
    # --- end generated ---


def _complete(call: ScriptCall, conn: Any, pool: Any, deadline: float, packer: _Packer,
              rerun: Callable[[ScriptCall], Any]) -> Any:
    """On a background thread: read the reply of a request a caller gave up waiting for
    (`rerun` sends it again, once, if the server had not loaded it)."""
    try:
        left = deadline - time.monotonic()
        if left <= 0 or not conn.can_read(timeout=left):
            raise redis.TimeoutError("no reply within redis_background_timeout")
        raw = conn.read_response()
    except redis.ResponseError as e:
        _release(pool, conn)
        if packer.reload_for(e, call.op) is None:
            raise
        return rerun(call)  # it was not run: load and send it, once
    except BaseException as e:
        conn.disconnect()
        _release(pool, conn)
        _mark(e, True)
        raise
    _release(pool, conn)
    return raw


def _pings(pool: Any, timeout: float) -> bool:
    """A PING on a connection of `pool` is answered within `timeout`."""
    try:
        conn = _get(pool)
    except Exception:
        return False
    try:
        conn.send_command("PING")
        if not conn.can_read(timeout=timeout):
            conn.disconnect()
            return False
        conn.read_response()
        return True
    except Exception:
        conn.disconnect()
        return False
    finally:
        _release(pool, conn)


def _finish(fn: Callable[..., Any], done: Done, call: ScriptCall, *args: Any) -> None:
    """On a background thread: run `fn(call, *args)`, hand its outcome to `done`."""
    try:
        raw = fn(call, *args)
    except BaseException as e:
        done(call, None, e)
        return
    done(call, raw, None)


class AsyncRedisStore:
    """The same for a `redis.asyncio` client, with one client (long timeouts) for every
    path: a caller awaits its request as a task for at most redis_timeout (see
    `AsyncCircuitBreaker._run`), and the task goes on if the caller does not."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._scripts = ScriptSet(client)
        self._packer = _packer_for(client) if _raw_capable(client) else None
        self._idle = idle_for(client) if self._packer is not None else None

    async def run(self, call: ScriptCall) -> Any:
        return await self.run_blocking(call)

    def send_now(self, call: ScriptCall) -> Exchange | None:
        """Start `call` without awaiting: on an idle connection that is ready, written into
        its transport at once. The caller awaits `Exchange.reply` itself, without a task
        between (two turns of the loop a call instead of four). None: no such connection
        here now (none idle, a Cluster or other client, Python 3.10): use `run`."""
        idle = self._idle
        packer = self._packer
        if (packer is None or _timeout is None or idle is None
                or idle.pool is not self.client.connection_pool):
            return None
        conn = idle.ready()
        if conn is None:
            return None
        writer = getattr(conn, "_writer", None)  # redis-py has no public transport
        reader = getattr(conn, "_reader", None)
        if (writer is None or reader is None or not conn.is_connected
                or writer.transport.is_closing() or writer.transport.get_write_buffer_size()
                or conn.health_check_interval):
            idle.put(conn)
            return None
        writer.write(packer.pack(call))
        return Exchange(packer, idle, conn, reader)

    async def alive(self, timeout: float) -> bool:
        """See `RedisStore.alive`."""
        try:
            return bool(await asyncio.wait_for(self.client.ping(), timeout))
        except Exception:
            return False

    @property
    def pipelines(self) -> bool:
        """Whether `run_many` can send several calls in one round trip (not a Cluster
        client, or another client without a connection pool to write to)."""
        return self._packer is not None

    # unasync: rename self.client -> self.slow
    async def run_many(self, calls: list[ScriptCall]) -> list[Any]:
        """Send `calls` in one pipeline and read every reply: one round trip for all. Each
        result is the call's reply, or the exception it met (marked with whether it was
        sent, see `mark_sent`). Calls the server says are not loaded (first use, a flush)
        are loaded and sent again, once, in a second pipeline."""
        packer = self._packer
        assert packer is not None, "run_many needs a pipelining store"
        out = await self._send_many([packer.pack(c) for c in calls])
        again: list[int] = []
        load: tuple[str, ...] | None = None
        for i, r in enumerate(out):
            if isinstance(r, redis.ResponseError):
                want = packer.reload_for(r, calls[i].op)
                if want is not None:
                    again.append(i)
                    load = load or want
        if load is not None:
            try:
                await self._load(self.client, load, calls[again[0]].op)
            except Exception as e:
                _mark(e, False)
                for i in again:
                    out[i] = e
                return out
            resent = await self._send_many([packer.pack(calls[i]) for i in again])
            for i, r in zip(again, resent, strict=True):
                out[i] = r
        return out

    # unasync: rename self.client -> self.slow; self._idle -> self._slow_idle
    # unasync: rename idle.aget -> idle.get; idle.aput -> idle.put
    async def _send_many(self, payloads: list[bytes]) -> list[Any]:
        idle = self._idle
        if idle is None or idle.pool is not self.client.connection_pool:
            idle = self._idle = idle_for(self.client)  # the client was replaced
        try:
            conn = await idle.aget()
        except Exception as e:
            _mark(e, False)
            return [e] * len(payloads)
        out: list[Any] = []
        ok = False
        try:
            await _awrite(conn, payloads)
            await _aread_replies(conn, len(payloads), out)
            ok = True
        except Exception as e:
            await conn.disconnect()  # replies may still be unread: never reuse this connection
            _mark(e, True)  # some were written, perhaps all: none is sent again
            out.extend([e] * (len(payloads) - len(out)))
        except BaseException:
            await conn.disconnect()  # interrupted (cancelled): replies may be unread
            raise
        finally:
            if ok:
                await idle.aput(conn)
            else:
                await _arelease(idle.pool, conn)
        return out

    async def _load(self, client: Any, load: tuple[str, ...], op: str) -> None:
        """Load what a reply said is missing; a server that refuses FUNCTION LOAD gets
        the script instead (the packer switches to EVALSHA)."""
        assert self._packer is not None
        try:
            await client.execute_command(*load)
        except redis.ResponseError as e:
            again = self._packer.reload_for(e, op)
            if again is None:
                raise
            await client.execute_command(*again)

    # unasync: rename self.client -> self.slow; self._scripts -> self._slow_scripts
    async def run_blocking(self, call: ScriptCall) -> Any:
        """Run a call on `self.client`: waits up to its timeouts."""
        packer = self._packer
        if packer is None:
            scripts = self._scripts
            return await scripts[call.op](keys=call.keys[:scripts.nkeys], args=call.args)
        try:
            return await self._send(packer.pack(call))
        except redis.ResponseError as e:
            load = packer.reload_for(e, call.op)
            if load is None:
                raise
        await self._load(self.client, load, call.op)
        return await self._send(packer.pack(call))

    # unasync: rename self.client -> self.slow; self._idle -> self._slow_idle
    # unasync: rename idle.aget -> idle.get; idle.aput -> idle.put
    async def _send(self, payload: bytes) -> Any:
        idle = self._idle
        if idle is None or idle.pool is not self.client.connection_pool:
            idle = self._idle = idle_for(self.client)  # the client was replaced
        try:
            conn = await idle.aget()
        except BaseException as e:
            _mark(e, False)
            raise
        sent = False
        ok = False
        try:
            await _awrite(conn, [payload])
            sent = True
            raw = await _aread_reply(conn)
            ok = True
            return raw
        except redis.ResponseError:
            ok = True  # the connection is fine: an error reply was read in full
            raise
        except BaseException as e:
            _mark(e, sent)  # unasync: async-only
            await conn.disconnect()  # the reply may still be unread: never reuse this connection
            # unasync: sync: _mark(e, sent)
            raise
        finally:
            if ok:
                await idle.aput(conn)
            else:
                await _arelease(idle.pool, conn)


class Exchange:
    """One request written by `AsyncRedisStore.send_now`, and its reply. `reply(wait)`
    reads it in the caller's own task; when the caller stops waiting (no reply within
    `wait`) or is cancelled, `finish` reads the rest in a background task, from the bytes
    already parsed: the reply is read once and applied once, as when the request ran in a
    task of its own. The connection is settled (given back, or dropped) exactly once:
    `_settled` is set before any await that settles it, so a cancel landing there can
    never lead `finish` to read a connection that is no longer this request's."""

    __slots__ = ("_conn", "_idle", "_out", "_packer", "_parser", "_reader", "_settled")

    def __init__(self, packer: _Packer, idle: Any, conn: Any,
                 reader: asyncio.StreamReader) -> None:
        self._packer = packer
        self._idle = idle
        self._conn = conn
        self._reader = reader
        self._parser = ReplyParser()
        self._out: list[Any] = []
        self._settled = False

    @property
    def settled(self) -> bool:
        """The reply was read (or the connection dropped): nothing is left to finish."""
        return self._settled

    async def reply(self, wait: float) -> Any:
        """The reply within `wait` seconds; raises TimeoutError without one (the request
        is still in flight: `finish` it), the error of an error reply, or what a broken
        connection raises (marked sent)."""
        cm = _timeout(wait)
        try:
            async with cm:
                return await self._read()
        except TimeoutError:
            if not cm.expired():  # not our wait (_read converts the OS's): drop it
                await self._drop()
                err = redis.ConnectionError("unexpected TimeoutError")
                _mark(err, True)
                raise err from None
            raise

    async def _read(self) -> Any:
        out, conn = self._out, self._conn
        if self._settled:  # dropped while a cancel landed: the outcome is unknown
            err = redis.ConnectionError("the request's connection was dropped")
            _mark(err, True)
            raise err
        try:
            while not out:
                try:
                    data = await self._reader.read(_CHUNK)
                except OSError as e:  # ETIMEDOUT (keepalive) included: a dead connection
                    raise redis.ConnectionError(
                        f"Error while reading from the socket: {e}") from e
                if not data:
                    raise redis.ConnectionError("Connection closed by server.")
                _parsed(conn, self._parser, data, out, 0, 1)
        except asyncio.CancelledError:
            raise  # a timeout or the caller's cancel: nothing was consumed, finish() reads on
        except BaseException as e:
            _mark(e, True)
            await self._drop()
            raise
        self._settled = True
        self._idle.put(conn)
        return _unboxed(out)  # an error reply raises, read in full: the connection is fine

    async def _drop(self) -> None:
        """Close the connection and give its slot back (once, even if cancelled here)."""
        if self._settled:
            return
        self._settled = True
        conn = self._conn
        try:
            await conn.disconnect()
        finally:
            await _arelease(self._idle.pool, conn)

    def needs_load(self, e: BaseException, op: str) -> bool:
        """Whether error reply `e` says the server has not loaded our code: the request
        did not run, and `AsyncRedisStore.run` loads it and sends it again."""
        return isinstance(e, redis.ResponseError) and self._packer.reload_for(e, op) is not None

    async def finish(self, deadline: float) -> Any:
        """Read the rest of the reply by `deadline` (monotonic), in a background task.
        Cancelled (the loop ends), the connection is dropped, never left checked out."""
        left = deadline - time.monotonic()
        try:
            async with _timeout(max(left, 0.0)):
                return await self._read()
        except TimeoutError:
            await self._drop()
            err = redis.TimeoutError("no reply within redis_background_timeout")
            _mark(err, True)
            raise err from None
        except asyncio.CancelledError:
            await self._drop()
            raise


async def _awrite(conn: Any, payloads: list[bytes]) -> None:
    """Write `payloads` on an asyncio connection. Straight into its transport when that
    is connected, holds nothing unsent and no health check is due (the common case: the
    transport writes to the socket at once and buffers any rest itself; a connection
    carries one request or pipeline at a time and the next write follows reading its
    replies, and a write that finds bytes still buffered, a pipeline past the transport's
    high-water mark say, goes through redis-py's send and its drain); otherwise redis-py's
    send, with its connect, health check, timeout and errors. redis-py wraps every send in
    `asyncio.wait_for` when the client has a socket timeout, which on Python 3.11 is a task
    and two turns of the loop per call."""
    writer = getattr(conn, "_writer", None)  # redis-py has no public transport
    if (writer is None or not conn.is_connected or writer.transport.is_closing()
            or writer.transport.get_write_buffer_size() or conn.health_check_interval):
        await conn.send_packed_command(payloads)
        return
    writer.writelines(payloads)


def _write(conn: Any, payloads: list[bytes]) -> None:
    """`_awrite`'s sync twin: redis-py's send, as one blocking socket write (redis-py
    writes each item of a list with its own sendall: a system call per breaker's batch,
    about a fifth of the writer thread's time with 10,000 breakers)."""
    conn.send_packed_command([b"".join(payloads)] if len(payloads) > 1 else payloads)


_CHUNK = 1 << 16


async def _aread_replies(conn: Any, n: int, out: list[Any]) -> None:
    """Read `n` replies on a connection into `out` (an error reply as the exception
    redis-py makes of it), each read waiting at most the socket timeout: the stream's
    bytes in bulk, parsed by `ReplyParser`. A failure leaves in `out` the replies read
    before it."""
    stream = _astream(conn)
    if stream is None:  # not a connection of ours to read: redis-py's parser
        for _ in range(n):
            try:
                out.append(await conn.read_response())
            except redis.ResponseError as e:  # one call's error reply, read in full
                out.append(e)
        return
    parser, want, timeout = ReplyParser(), len(out) + n, conn.socket_timeout
    while len(out) < want:
        try:
            data = await _aread_chunk(stream, timeout)
        except (asyncio.TimeoutError, TimeoutError) as e:
            raise _timed_out(e) from None
        except OSError as e:
            raise redis.ConnectionError(f"Error while reading from the socket: {e}") from e
        if not data:
            raise redis.ConnectionError("Connection closed by server.")
        _parsed(conn, parser, data, out, want - n, want)


async def _aread_reply(conn: Any) -> Any:
    """One reply (`_aread_replies`); an error reply raises."""
    out: list[Any] = []
    await _aread_replies(conn, 1, out)
    return _unboxed(out)


# --- generated by .ci/unasync.py from _aread_replies: do not edit ---
def _read_replies(conn: Any, n: int, out: list[Any]) -> None:
    """Read `n` replies on a connection into `out` (an error reply as the exception
    redis-py makes of it), each read waiting at most the socket timeout: the stream's
    bytes in bulk, parsed by `ReplyParser`. A failure leaves in `out` the replies read
    before it."""
    stream = _stream(conn)
    if stream is None:  # not a connection of ours to read: redis-py's parser
        for _ in range(n):
            try:
                out.append(conn.read_response())
            except redis.ResponseError as e:  # one call's error reply, read in full
                out.append(e)
        return
    parser, want, timeout = ReplyParser(), len(out) + n, conn.socket_timeout
    while len(out) < want:
        try:
            data = _read_chunk(stream, timeout)
        except (asyncio.TimeoutError, TimeoutError) as e:
            raise _timed_out(e) from None
        except OSError as e:
            raise redis.ConnectionError(f"Error while reading from the socket: {e}") from e
        if not data:
            raise redis.ConnectionError("Connection closed by server.")
        _parsed(conn, parser, data, out, want - n, want)
# --- end generated ---


# --- generated by .ci/unasync.py from _aread_reply: do not edit ---
def _read_reply(conn: Any) -> Any:
    """One reply (`_read_replies`); an error reply raises."""
    out: list[Any] = []
    _read_replies(conn, 1, out)
    return _unboxed(out)
# --- end generated ---


def _unboxed(out: list[Any]) -> Any:
    """The one reply in `out`, raised if it is an error: taken out of the list first, and
    the local dropped as it is raised, so the exception's traceback never holds a frame
    that holds the exception (a cycle only the GC breaks, which kept every frame of the
    call alive, the breaker's engine among them, until it ran)."""
    r = out.pop()
    if isinstance(r, BaseException):
        try:
            raise r
        finally:
            del r
    return r


def _astream(conn: Any) -> asyncio.StreamReader | None:
    return getattr(conn, "_reader", None)  # redis-py has no public stream


def _stream(conn: Any) -> Any:
    return getattr(conn, "_sock", None)  # redis-py has no public socket


# asyncio.timeout is a timer, not a task; before 3.11.3 it could mistake a cancel that a
# task once swallowed for its own expiry
_timeout: Any = getattr(asyncio, "timeout", None) if sys.version_info >= (3, 11, 3) else None


async def _aread_chunk(reader: asyncio.StreamReader, timeout: float | None) -> bytes:
    """What the stream holds (or its next bytes), waiting at most `timeout`."""
    if not timeout:
        return await reader.read(_CHUNK)
    if _timeout is not None:
        async with _timeout(timeout):
            return await reader.read(_CHUNK)
    return await asyncio.wait_for(reader.read(_CHUNK), timeout)  # Python 3.10


def _read_chunk(sock: Any, timeout: float | None) -> bytes:
    """`_aread_chunk`'s sync twin: the socket applies the connection's timeout itself."""
    data: bytes = sock.recv(_CHUNK)
    return data


def _timed_out(e: BaseException) -> BaseException:
    """Our wait ran out (redis's TimeoutError: slow, not down), or the OS says ETIMEDOUT
    (keepalive, TCP_USER_TIMEOUT: the connection is dead, as redis-py reads it)."""
    if getattr(e, "errno", None):
        return redis.ConnectionError(f"Error while reading from the socket: {e}")
    return redis.TimeoutError("Timeout reading from socket")


def _parsed(conn: Any, parser: ReplyParser, data: bytes, out: list[Any], first: int,
            want: int) -> None:
    """Parse `data` into `out`. An error reply becomes the exception redis-py makes of it,
    in `out` when it is a ResponseError (one call's error; the rest go on), raised when it
    is not (LOADING is a ConnectionError: redis-py raises it, and so do we)."""
    start = len(out)
    parser.feed(data, out)
    for i in range(start, len(out)):
        if isinstance(out[i], ReplyError):
            e = _reply_error(conn, out[i])
            if not isinstance(e, redis.ResponseError):
                del out[i:]
                try:
                    raise e
                finally:
                    del e  # no cycle through this frame (see _unboxed)
            out[i] = e
    if len(out) > want or (len(out) == want and parser.pending):
        # out of step with the requests: no reply read here can be trusted to be theirs
        del out[first:]
        raise redis.ConnectionError("bytes after the replies of a pipeline")


def _reply_error(conn: Any, text: str) -> BaseException:
    """The exception redis-py's parser makes of an error reply (NoScriptError,
    NoPermissionError, ReadOnlyError, ...)."""
    parse = getattr(getattr(conn, "_parser", None), "parse_error", None)
    if parse is not None:
        try:
            e = parse(text)
            if isinstance(e, BaseException):
                return e
        except Exception:
            pass
    return redis.ResponseError(text)
