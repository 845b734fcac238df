"""Clients for Redis as a dependency that fails, and the plumbing of late requests.

Every script call goes through a client derived from the user's one: same server,
credentials, TLS, Sentinel service or Cluster nodes, but short timeouts, no retries and no
connection cap (`derive_client`), shared by every breaker of that client in the process
(`share_client`). A caller waits at most `redis_timeout`; a request it stops waiting for
finishes on the `background` threads. Store errors carry whether their request was written
(`mark_sent`), because an outcome that may have been counted is never applied elsewhere.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import os
import select
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import redis
import redis.asyncio

from ._process import PROCESS

__all__ = ["STORE_ERRORS", "IdleConnections", "InFlight", "background", "deliver",
           "derive_client", "idle_for", "is_cluster", "label", "mark_sent", "pool_aget",
           "pool_arelease", "pool_get", "pool_release", "raw_capable", "sentinel_pools",
           "share_client", "unshare_client", "was_sent"]

log = logging.getLogger("distbreaker")

try:  # what a store call may raise when Redis is down, slow, or replaced
    from redis.exceptions import RedisError as _RedisError

    STORE_ERRORS: tuple[type[BaseException], ...] = (_RedisError, OSError, TimeoutError)
except ImportError:  # pragma: no cover - redis is a dependency
    STORE_ERRORS = (OSError, TimeoutError)


class InFlight(Exception):
    """No reply within the caller's wait. The request goes on in the background with a
    longer deadline; its reply (or error) reaches the callback the caller gave."""


def mark_sent(e: BaseException, sent: bool) -> None:
    """Say on a store error whether the request had been written: an outcome whose
    request was written may have been counted, so it is never applied anywhere else."""
    with contextlib.suppress(Exception):
        e.distbreaker_sent = sent  # type: ignore[attr-defined]


def was_sent(e: BaseException) -> bool:
    """Whether a failed request may have reached Redis (unknown counts as yes)."""
    return bool(getattr(e, "distbreaker_sent", True))


def background(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """Run `fn(*args)` on the process's background threads: requests whose callers were
    released at redis_timeout finish there, with the longer background deadline."""
    ex = PROCESS.executor
    if ex is None:
        with PROCESS.lock:
            ex = PROCESS.executor
            if ex is None:
                ex = PROCESS.executor = ThreadPoolExecutor(
                    max_workers=32, thread_name_prefix="distbreaker-background")
    return ex.submit(fn, *args)


def deliver(done: Callable[[Any, BaseException | None], None], fut: Any) -> None:
    """A done-callback of a future or task: hand its outcome to `done(raw, exc)`."""
    if fut.cancelled():
        done(None, TimeoutError("cancelled"))
        return
    exc = fut.exception()
    done(None if exc is not None else fut.result(), exc)


def label(client: Any) -> str:
    """The server `client` talks to, as logs and the guard registry name it."""
    pool: Any = getattr(client, "connection_pool", None)
    kw = getattr(pool, "connection_kwargs", {}) or {}
    if hasattr(pool, "service_name"):
        sentinels = sorted(
            "{}:{}".format(*_addr(c)) for c in getattr(pool.sentinel_manager, "sentinels", [])
        )
        role = "primary" if getattr(pool, "is_master", True) else "replica"
        return f"sentinel:{pool.service_name}:{role}@{','.join(sentinels)}"
    if "path" in kw:
        return f"unix:{kw['path']}/{kw.get('db', 0)}"
    if "host" in kw:
        return f"{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"
    return f"{type(client).__name__}@{id(client):x}"


def share_client(client: Any, timeout: float, connect_timeout: float | None = None) -> Any:
    """`derive_client`, shared by every breaker of `client` with the same timeouts (one pool
    per process, not one per breaker); give it back with `unshare_client`."""
    key = (id(client), timeout, connect_timeout)
    with PROCESS.lock:
        entry = PROCESS.clients.get(key)
        if entry is None:
            entry = PROCESS.clients[key] = [derive_client(client, timeout, connect_timeout),
                                            0, client]
        entry[1] += 1
        return entry[0]


def unshare_client(client: Any, timeout: float, connect_timeout: float | None = None) -> Any:
    """Drop one user of a shared client; returns it when it was the last, to be closed
    by the caller (unless it is the user's own client), else None."""
    key = (id(client), timeout, connect_timeout)
    with PROCESS.lock:
        entry = PROCESS.clients.get(key)
        if entry is None:
            return None
        entry[1] -= 1
        if entry[1] > 0:
            return None
        del PROCESS.clients[key]
    return None if entry[0] is client else entry[0]


def is_cluster(client: Any) -> bool:
    """A Cluster client (sync or asyncio): one call's keys must share a slot, and a
    channel's messages reach a subscriber through the cluster bus, not in order with the
    replies of the node it is connected to."""
    return hasattr(client, "get_nodes") and hasattr(client, "nodes_manager")


def _addr(client: Any) -> tuple[str, Any]:
    kw = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {}) or {}
    return str(kw.get("host", "?")), kw.get("port", "?")


_CLUSTER_DROP = ("host", "port", "connection_pool", "connection_class", "himport_registry",
                 "retry", "retry_on_timeout", "retry_on_error", "redis_connect_func",
                 "event_dispatcher", "maint_notifications_config", "cache", "cache_config")


def _derive_cluster(client: Any, timeout: float, connect_timeout: float, is_async: bool) -> Any:
    """A Cluster client over the same nodes and settings, with short timeouts, no retries."""
    from redis.backoff import NoBackoff

    if is_async:
        from redis.asyncio.cluster import ClusterNode as ANode
        from redis.asyncio.cluster import RedisCluster as ACluster
        from redis.asyncio.retry import Retry as ARetry

        kw = dict(client.connection_kwargs)
        known = client.get_nodes() or list(client.nodes_manager.startup_nodes.values())
        nodes: list[Any] = [ANode(n.host, n.port) for n in known]
        cls: Any = ACluster
        retry: Any = ARetry(NoBackoff(), 0)
    else:
        from redis.cluster import ClusterNode, RedisCluster
        from redis.retry import Retry

        kw = dict(client.nodes_manager.connection_kwargs)
        nodes = [ClusterNode(n.host, n.port) for n in client.get_nodes()]  # type: ignore[no-untyped-call]
        cls, retry = RedisCluster, Retry(NoBackoff(), 0)
    for k in _CLUSTER_DROP:
        kw.pop(k, None)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kw = {k: v for k, v in kw.items() if k in params}
    kw.update(socket_timeout=timeout, socket_connect_timeout=connect_timeout)
    _resp2(kw)
    return cls(startup_nodes=nodes, retry=retry, **kw)


def _resp2(kw: dict[str, Any]) -> None:
    """RESP2 for our own connections, and so no maintenance notifications (a RESP3
    feature of redis-py 7+; the guard and the listener handle a server going away)."""
    kw["protocol"] = 2
    kw.pop("maint_notifications_pool_handler", None)
    if kw.get("maint_notifications_config") is not None:
        from redis.maint_notifications import MaintNotificationsConfig

        kw["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)


def derive_client(client: Any, timeout: float, connect_timeout: float | None = None) -> Any:
    """A client like `client` (same server, credentials, TLS, Sentinel service, Cluster
    nodes) but with `timeout` on every read and connect and no retries, over connections of
    its own. A client this cannot copy is returned as it is (and logged)."""
    pool = getattr(client, "connection_pool", None)
    if pool is None or not hasattr(pool, "connection_kwargs"):
        if is_cluster(client):
            try:
                return _derive_cluster(client, timeout, connect_timeout or timeout,
                                       type(client).__module__.startswith("redis.asyncio"))
            except Exception as e:
                log.warning("distbreaker: could not derive a short-timeout Cluster client "
                            "(%s); using yours as it is: set socket_timeout on it", e)
        return client
    # by the pool: fakeredis's asyncio client lives in another module
    is_async = (isinstance(pool, redis.asyncio.ConnectionPool)
                or type(client).__module__.startswith("redis.asyncio"))
    if is_async:
        from redis.asyncio.retry import Retry as _Retry
    else:
        from redis.retry import Retry as _Retry  # type: ignore[assignment]
    from redis.backoff import NoBackoff

    kw = {k: v for k, v in pool.connection_kwargs.items()
          if k not in ("connection_pool", "himport_registry", "retry")}
    kw.update(socket_timeout=timeout,
              socket_connect_timeout=connect_timeout if connect_timeout else timeout,
              retry=_Retry(NoBackoff(), 0))
    kw.pop("retry_on_timeout", None)
    for k in ("orig_socket_timeout", "orig_socket_connect_timeout"):
        if k in kw:
            kw[k] = kw["socket_timeout" if k == "orig_socket_timeout" else
                       "socket_connect_timeout"]
    # No handshake on connect: RESP2 needs no HELLO (redis-py 8 speaks RESP3 by default,
    # and its HELLO is a round trip before a new connection can send: through 120 ms of
    # latency, every request a caller went on from waited for it twice, and that read as
    # silence), and no CLIENT SETINFO. Our replies are the same in both protocols.
    _resp2(kw)
    if "driver_info" in kw:
        kw["driver_info"] = None
    elif "lib_name" in kw:
        kw["lib_name"] = kw["lib_version"] = None
    cls = type(pool)
    # The derived pool has no cap of its own: a connection whose caller went on is held
    # until its reply comes, and a capped (or blocking) pool would turn a pause into
    # "too many connections" or a wait of the pool's timeout on the caller's path. Said
    # as a number: redis-py 8 reads None as its default cap of 100.
    max_connections = 2**31
    if cls.__name__ == "BlockingConnectionPool" and cls.__module__.startswith("redis"):
        cls = type(pool).__mro__[1]  # its plain ConnectionPool base
    try:
        if hasattr(pool, "service_name") and hasattr(pool, "sentinel_manager"):
            new_pool = cls(pool.service_name, pool.sentinel_manager, is_master=pool.is_master,
                           check_connection=pool.check_connection,
                           connection_class=pool.connection_class,
                           max_connections=max_connections, **kw)
        else:
            new_pool = cls(connection_class=pool.connection_class,
                           max_connections=max_connections, **kw)
        return type(client)(connection_pool=new_pool)
    except Exception as e:  # an unusual pool: keep the user's own client
        log.debug("could not derive a short-timeout client from %r: %s", client, e)
        return client


def sentinel_pools(client: Any) -> list[Any]:
    """The Sentinel pools behind `client` and the clients derived from it in this process:
    checking their primary's address now and then moves idle connections to a new primary
    after a failover (redis-py only looks the primary up on new connections)."""
    with PROCESS.lock:
        clients = [client, *(e[0] for e in PROCESS.clients.values() if e[2] is client)]
    return [c.connection_pool for c in clients
            if hasattr(getattr(c, "connection_pool", None), "get_master_address")]


# --- connections taken from a client's pool directly (the stores and the listener) -------

_LEGACY_GET_CONNECTION = tuple(int(x) for x in redis.__version__.split(".")[:2]) < (5, 3)


def raw_capable(client: Any) -> bool:
    """A plain or Sentinel-managed redis-py client (not Cluster, not a fake or a wrapper):
    one whose pool's connections can be driven directly."""
    pool = getattr(client, "connection_pool", None)
    return (isinstance(client, (redis.Redis, redis.asyncio.Redis))
            and type(client).__module__.startswith("redis.")
            and pool is not None and type(pool).__module__.startswith("redis.")
            and hasattr(pool, "get_connection") and hasattr(pool, "release"))


def pool_get(pool: Any) -> Any:
    return pool.get_connection("EVALSHA") if _LEGACY_GET_CONNECTION else pool.get_connection()


def pool_release(pool: Any, conn: Any) -> None:
    with contextlib.suppress(Exception):  # a pool reset by a fork, say
        pool.release(conn)


async def pool_aget(pool: Any) -> Any:
    """`pool_get` for a redis.asyncio pool, which can hand out a connection the server
    closed while it was idle (a restart, CLIENT KILL, an idle timeout): reconnect before
    sending, never resend after (the command may have run)."""
    conn = await (pool.get_connection("EVALSHA") if _LEGACY_GET_CONNECTION else
                  pool.get_connection())
    if _dead(conn):
        await conn.disconnect()
        await conn.connect()
    return conn


async def pool_arelease(pool: Any, conn: Any) -> None:
    with contextlib.suppress(Exception):
        released = pool.release(conn)
        if inspect.isawaitable(released):
            await released


def _dead(conn: Any) -> bool:
    """An asyncio connection the server closed or reset while it sat idle: the reader
    says so (end of file, an error), or its socket is readable, which an idle connection's
    never is unless the server closed it. The socket is asked too because the loop learns
    of the close only when it next polls: a call right after a CLIENT KILL or a restart
    would otherwise send on the dead connection and fail over."""
    reader = getattr(conn, "_reader", None)
    if reader is None:
        return False
    try:
        if reader.at_eof() or reader.exception() is not None:
            return True
        writer = getattr(conn, "_writer", None)
        sock = writer.get_extra_info("socket") if writer is not None else None
        if sock is None:
            return False
        poller = select.poll()  # not select(): no limit on the descriptor's number
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except Exception:
        return False


class IdleConnections:
    """The idle connections of one plain redis-py pool, kept by the stores themselves.

    Taking one is a deque pop and the readiness check the pool itself makes (a connection
    the server closed, or holding bytes nobody asked for, goes back to the pool, which
    reconnects it); giving one back is a deque append; a connection that failed is given
    to the pool, not kept. redis-py 8's get and release (a lock, observability counters, an
    event per release) cost about a tenth of a strict call. Connections come from the
    pool the first time and stay counted as in use there. Sentinel and other pools keep
    redis-py's path: a Sentinel pool drops connections to a demoted master at release.
    Thread-safe (a deque's pop and append are atomic); a forked child forgets its
    parent's connections."""

    __slots__ = ("_conns", "_pid", "own", "pool")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.own = type(pool) in (redis.ConnectionPool, redis.asyncio.ConnectionPool)
        self._conns: collections.deque[Any] = collections.deque()
        self._pid = os.getpid()

    def _pop(self) -> Any:
        if self._pid != os.getpid():
            self._conns = collections.deque()  # the parent's: never touched here
            self._pid = os.getpid()
        try:
            return self._conns.pop()
        except IndexError:
            return None

    def get(self) -> Any:
        conn = self._pop() if self.own else None
        if conn is None:
            return pool_get(self.pool)
        try:
            if not conn.can_read(timeout=0):
                return conn
            conn.disconnect()  # bytes nobody asked for: never read them as a reply
        except Exception:
            pass  # closed by the server (a restart, CLIENT KILL, an idle timeout)
        pool_release(self.pool, conn)  # the pool reconnects it when it hands it out
        return pool_get(self.pool)

    def put(self, conn: Any) -> None:
        if self.own and self._pid == os.getpid():
            self._conns.append(conn)
        else:
            pool_release(self.pool, conn)

    def ready(self) -> Any:
        """An idle asyncio connection that is usable now, without awaiting anything, or
        None (none idle, or the one on top is dead: `aget` replaces it)."""
        conn = self._pop() if self.own else None
        if conn is not None and _dead(conn):
            self._conns.append(conn)
            return None
        return conn

    async def aget(self) -> Any:
        conn = self._pop() if self.own else None
        if conn is None:
            return await pool_aget(self.pool)
        if not _dead(conn):
            return conn
        with contextlib.suppress(Exception):
            await conn.disconnect()
        await pool_arelease(self.pool, conn)
        return await pool_aget(self.pool)

    async def aput(self, conn: Any) -> None:
        if self.own and self._pid == os.getpid():
            self._conns.append(conn)
        else:
            await pool_arelease(self.pool, conn)


_IDLE: weakref.WeakKeyDictionary[Any, IdleConnections] = weakref.WeakKeyDictionary()


def idle_for(client: Any) -> IdleConnections:
    """The one `IdleConnections` of `client`'s pool in this process."""
    pool = client.connection_pool
    with PROCESS.lock:
        idle = _IDLE.get(pool)
        if idle is None:
            idle = _IDLE[pool] = IdleConnections(pool)
        return idle
