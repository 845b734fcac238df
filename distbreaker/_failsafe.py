"""Redis as a dependency that fails: short timeouts, a breaker around Redis, and clients.

A breaker that fails when Redis fails turns a cache outage into a full outage. So every
script call on a caller's path goes through a client derived from the user's one with a
short timeout and no retries, and through a `StoreGuard`: a small breaker around the
store itself, shared by every breaker of one client in one process. While the guard is
open, breakers answer from a local fallback at in-process cost (see `BreakerCore`).
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import threading
import time
import weakref
from typing import Any

__all__ = ["STORE_ERRORS", "StoreGuard", "derive_client", "guard_for", "share_client",
           "unshare_client"]

log = logging.getLogger("distbreaker")

try:  # what a store call may raise when Redis is down, slow, or replaced
    from redis.exceptions import RedisError as _RedisError

    STORE_ERRORS: tuple[type[BaseException], ...] = (_RedisError, OSError, TimeoutError)
except ImportError:  # pragma: no cover - redis is a dependency
    STORE_ERRORS = (OSError, TimeoutError)


class StoreGuard:
    """Open after a store error; lets one trial through per backoff period; closes on the
    first success. Logs one warning when an outage starts and one when it ends."""

    MIN_BACKOFF = 0.1
    MAX_BACKOFF = 1.0

    def __init__(self, label: str) -> None:
        self.label = label
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self._retry_at = 0.0
        self._trial = False
        self._backoff = self.MIN_BACKOFF
        self.outages = 0
        self._members: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def degraded(self) -> bool:
        return self.down_since is not None

    def add(self, member: Any) -> None:
        with self._lock:
            self._members.add(member)

    def allow(self) -> bool:
        """May this caller try the store now? Always while up; while down, one trial per
        backoff period (the others use the fallback at once)."""
        if self.down_since is None:
            return True
        with self._lock:
            now = time.monotonic()
            if self._trial or now < self._retry_at:
                return False
            self._trial = True
            return True

    def failure(self, exc: BaseException) -> None:
        with self._lock:
            now = time.monotonic()
            first = self.down_since is None
            if first:
                self.down_since = now
                self.outages += 1
            self._trial = False
            self._retry_at = now + self._backoff * (0.5 + random.random())
            self._backoff = min(self._backoff * 2, self.MAX_BACKOFF)
            members = list(self._members) if first else []
        if first:
            log.warning("distbreaker: Redis unavailable (%s: %s); breakers fall back to their "
                        "local policy until it returns", type(exc).__name__, exc,
                        extra={"event": "distbreaker.store_down", "store": self.label})
        for m in members:
            m._store_lost()

    def success(self) -> None:
        if self.down_since is None:
            return
        with self._lock:
            if self.down_since is None:
                return
            took = time.monotonic() - self.down_since
            self.down_since = None
            self._trial = False
            self._backoff = self.MIN_BACKOFF
            members = list(self._members)
        log.warning("distbreaker: Redis is back after %.1fs; adopting the shared state", took,
                    extra={"event": "distbreaker.store_up", "store": self.label,
                           "outage_s": round(took, 3)})
        for m in members:
            m._store_recovered()


_GUARDS: dict[tuple[int, str], StoreGuard] = {}
_GUARDS_LOCK = threading.Lock()


def _fresh_lock_in_child() -> None:
    global _GUARDS_LOCK, _DERIVED_LOCK
    _GUARDS_LOCK = threading.Lock()  # the parent may have held it while forking
    _DERIVED_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_in_child)


def guard_for(client: Any) -> StoreGuard:
    """The process's one guard for the server `client` talks to (clients of the same
    server share it; a forked child gets its own)."""
    key = (os.getpid(), _label(client))
    with _GUARDS_LOCK:
        g = _GUARDS.get(key)
        if g is None:
            g = _GUARDS[key] = StoreGuard(key[1])
        return g


def _label(client: Any) -> str:
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


_DERIVED: dict[tuple[int, int, float, float | None], list[Any]] = {}
_DERIVED_LOCK = threading.Lock()


def share_client(client: Any, timeout: float, connect_timeout: float | None = None) -> Any:
    """`derive_client`, shared by every breaker of `client` with the same timeouts (one pool
    per process, not one per breaker); give it back with `unshare_client`."""
    key = (os.getpid(), id(client), timeout, connect_timeout)
    with _DERIVED_LOCK:
        entry = _DERIVED.get(key)
        if entry is None:
            entry = _DERIVED[key] = [derive_client(client, timeout, connect_timeout), 0,
                                     client]
        entry[1] += 1
        return entry[0]


def unshare_client(client: Any, timeout: float, connect_timeout: float | None = None) -> Any:
    """Drop one user of a shared client; returns it when it was the last, to be closed
    by the caller (unless it is the user's own client), else None."""
    key = (os.getpid(), id(client), timeout, connect_timeout)
    with _DERIVED_LOCK:
        entry = _DERIVED.get(key)
        if entry is None:
            return None
        entry[1] -= 1
        if entry[1] > 0:
            return None
        del _DERIVED[key]
    return None if entry[0] is client else entry[0]


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
    return cls(startup_nodes=nodes, retry=retry, **kw)


def derive_client(client: Any, timeout: float, connect_timeout: float | None = None) -> Any:
    """A client like `client` (same server, credentials, TLS, Sentinel service, Cluster
    nodes) but with `timeout` on every read and connect and no retries, over connections of
    its own. A client this cannot copy is returned as it is (and logged)."""
    pool = getattr(client, "connection_pool", None)
    if pool is None or not hasattr(pool, "connection_kwargs"):
        if hasattr(client, "get_nodes"):
            try:
                return _derive_cluster(client, timeout, connect_timeout or timeout,
                                       type(client).__module__.startswith("redis.asyncio"))
            except Exception as e:
                log.warning("distbreaker: could not derive a short-timeout Cluster client "
                            "(%s); using yours as it is: set socket_timeout on it", e)
        return client
    is_async = type(client).__module__.startswith("redis.asyncio")
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
    cls = type(pool)
    try:
        if hasattr(pool, "service_name") and hasattr(pool, "sentinel_manager"):
            new_pool = cls(pool.service_name, pool.sentinel_manager, is_master=pool.is_master,
                           check_connection=pool.check_connection,
                           connection_class=pool.connection_class,
                           max_connections=pool.max_connections, **kw)
        else:
            new_pool = cls(connection_class=pool.connection_class,
                           max_connections=pool.max_connections, **kw)
        return type(client)(connection_pool=new_pool)
    except Exception as e:  # an unusual pool: keep the user's own client
        log.debug("could not derive a short-timeout client from %r: %s", client, e)
        return client


def sentinel_pools(client: Any) -> list[Any]:
    """The Sentinel pools behind `client` and the clients derived from it in this process:
    checking their primary's address now and then moves idle connections to a new primary
    after a failover (redis-py only looks the primary up on new connections)."""
    with _DERIVED_LOCK:
        clients = [client, *(e[0] for k, e in _DERIVED.items()
                             if k[0] == os.getpid() and e[2] is client)]
    return [c.connection_pool for c in clients
            if hasattr(getattr(c, "connection_pool", None), "get_master_address")]
