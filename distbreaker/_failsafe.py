"""Redis as a dependency that fails: short timeouts, a breaker around Redis, and clients.

A breaker that fails when Redis fails turns a cache outage into a full outage, and one
that gives up on Redis at every slow reply stops being shared when it matters. So every
script call on a caller's path goes through a client derived from the user's one with no
retries, waits at most `redis_timeout` (the request then finishes on the `background`
threads), and goes through a `StoreGuard`: a small breaker around the store itself,
shared by every breaker of one server in one process, which opens on evidence of an
outage only. While it is open, breakers answer from a local fallback at in-process cost
(see `BreakerCore`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["STORE_ERRORS", "InFlight", "StoreGuard", "background", "classify", "deliver",
           "derive_client", "guard_for", "mark_sent", "share_client", "truncate",
           "unshare_client", "was_sent"]

log = logging.getLogger("distbreaker")
_INF_S = float("inf")

try:  # what a store call may raise when Redis is down, slow, or replaced
    from redis.exceptions import RedisError as _RedisError

    STORE_ERRORS: tuple[type[BaseException], ...] = (_RedisError, OSError, TimeoutError)
except ImportError:  # pragma: no cover - redis is a dependency
    STORE_ERRORS = (OSError, TimeoutError)


class InFlight(Exception):
    """No reply within the caller's wait. The request goes on in the background with a
    longer deadline; its reply (or error) reaches the callback the caller gave."""


_MISCONFIG_MARKS = ("WRONGPASS", "NOAUTH", "NOPERM", "invalid password",
                    "invalid username-password", "DB index is out of range",
                    "invalid DB index", "no permissions")


def classify(exc: BaseException) -> str:
    """What a store error says: "misconfig" (credentials, ACL, db index: fix the config,
    waiting does not help), "timeout" (no reply in time: not, by itself, an outage) or
    "down" (refused, reset, an error reply such as OOM: evidence of an outage)."""
    if isinstance(exc, InFlight):
        return "timeout"
    try:
        from redis import exceptions as rx

        if isinstance(exc, (rx.AuthenticationError, rx.AuthorizationError,
                            rx.NoPermissionError, rx.AuthenticationWrongNumberOfArgsError)):
            return "misconfig"
        timeout_types: tuple[type[BaseException], ...] = (rx.TimeoutError, TimeoutError)
    except ImportError:  # pragma: no cover - redis is a dependency
        timeout_types = (TimeoutError,)
    msg = str(exc)
    if any(m in msg for m in _MISCONFIG_MARKS):
        return "misconfig"
    if isinstance(exc, timeout_types):
        return "timeout"
    return "down"


def mark_sent(e: BaseException, sent: bool) -> None:
    """Say on a store error whether the request had been written: an outcome whose
    request was written may have been counted, so it is never applied anywhere else."""
    with contextlib.suppress(Exception):
        e.distbreaker_sent = sent  # type: ignore[attr-defined]


def was_sent(e: BaseException) -> bool:
    """Whether a failed request may have reached Redis (unknown counts as yes)."""
    return bool(getattr(e, "distbreaker_sent", True))


def truncate(v: object, limit: int = 200) -> str:
    """`v` as text for a log line: garbage found in Redis can be megabytes."""
    t = str(v)
    return t if len(t) <= limit else f"{t[:limit]}... ({len(t)} chars)"


def describe(exc: BaseException) -> str:
    """One line for a log: what failed, told apart (refused, reset, no reply, error reply)."""
    msg = truncate(exc, 160)
    low = msg.lower()
    if "refused" in low:
        return f"connection refused ({msg})"
    if "reset" in low or "closed by server" in low or "broken pipe" in low:
        return f"connection dropped ({msg})"
    if classify(exc) == "timeout":
        return f"no reply in time ({type(exc).__name__}: {msg})"
    return f"{type(exc).__name__}: {msg}"


def misconfig_hint(exc: BaseException, label: str) -> str:
    """What to fix, for a misconfiguration error; never includes a password."""
    msg = truncate(exc, 160)
    if "NOPERM" in msg or "no permissions" in msg:
        return (f"the Redis user has no permission for what distbreaker runs ({msg}); grant "
                "it FCALL and FUNCTION LOAD (or EVALSHA and SCRIPT LOAD), the breakers' "
                "keys (~distbreaker:* by default) and their channel (&distbreaker:*)")
    if "NOAUTH" in msg:
        return ("Redis requires authentication and none was given: put the password in "
                "the URL (redis://:PASSWORD@host:port/db) or pass password= to the client")
    if "DB index" in msg:
        return (f"no such database ({msg}): use a db index below the server's 'databases' "
                "setting")
    return (f"Redis rejected the credentials ({msg}): check the username and password "
            f"given for {label}")


class StoreGuard:
    """Redis as a failing dependency, for every breaker of one server in one process.

    A process fails over to its local fallback on evidence of an outage: a refused or
    dropped connection, an error reply, or no reply at all for `failover_after` (a
    caller's own timeout is not evidence: a fork for BGSAVE, a slow command or a busy host
    delays replies for a moment, and the request completes in the background). While
    failed over, one trial per backoff period goes to Redis; the first answer ends it.

    Logging is per outage, not per flap: one warning when it starts, one when Redis has
    answered for `SETTLE` seconds, counting the blips absorbed in between. Misconfiguration
    (credentials, ACL, db index) is not an outage: it is logged at ERROR with what to fix,
    at most once a minute, and reported as such.
    """

    MIN_BACKOFF = 0.1
    MAX_BACKOFF = 1.0
    SETTLE = 1.0
    REPORT_EVERY = 60.0

    def __init__(self, label: str) -> None:
        self.label = label
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self.cause = ""
        self.misconfig: str | None = None  # what to fix, while misconfigured
        self.silent_since: float | None = None  # oldest request unanswered since an answer
        self._last_answer = -_INF_S
        self._retry_at = 0.0
        self._trial = False
        self._backoff = self.MIN_BACKOFF
        self.failovers = 0  # functional failovers, blips included
        self.outages = 0  # outages as logged (blips within SETTLE merged)
        self._outage_start: float | None = None  # an outage logged, its end not yet
        self._blips = 0
        self._up_at = 0.0
        self.slow_replies = 0  # callers released at redis_timeout without failing over
        self._slow_reported = 0
        self._slow_report_at = time.monotonic() + self.REPORT_EVERY
        self._misconfig_logged = -_INF_S
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

    def silent(self, sent_at: float, failover_after: float) -> None:
        """A request sent at `sent_at` got no reply within the caller's wait. Fails over
        once Redis has answered nothing for `failover_after`."""
        with self._lock:
            now = time.monotonic()
            self.slow_replies += 1
            if sent_at < self._last_answer:
                return  # Redis answered since this was sent: a lost reply, not silence
            if self.silent_since is None or sent_at < self.silent_since:
                self.silent_since = sent_at
            if self.down_since is not None:
                self._trial_failed(now)
                return
            quiet = now - max(self.silent_since, self._last_answer)
            if quiet < failover_after:
                return
        self._go_down(f"no reply for {quiet:.2f}s (failover_after={failover_after:g}s)")

    def failure(self, exc: BaseException) -> None:
        """Evidence of an outage (refused, dropped, an error reply): fail over now."""
        self._go_down(describe(exc))

    def misconfigured(self, exc: BaseException) -> None:
        hint = misconfig_hint(exc, self.label)
        now = time.monotonic()
        with self._lock:
            self.misconfig = hint
            loud = now - self._misconfig_logged >= self.REPORT_EVERY
            if loud:
                self._misconfig_logged = now
        if loud:
            log.error("distbreaker: Redis at %s is misconfigured for distbreaker: %s. "
                      "Breakers run on their local fallback until it is fixed.",
                      self.label, hint,
                      extra={"event": "distbreaker.store_misconfigured", "store": self.label})
        self._go_down("misconfigured", quiet=True)

    def _trial_failed(self, now: float) -> None:
        self._trial = False
        self._retry_at = now + self._backoff * (0.5 + random.random())
        self._backoff = min(self._backoff * 2, self.MAX_BACKOFF)

    def _go_down(self, cause: str, quiet: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            first = self.down_since is None
            self._trial_failed(now)
            if not first:
                return
            self.down_since = now
            self.cause = cause
            self.failovers += 1
            ended = self._settled(now)
            blip = not quiet and self._outage_start is not None
            if blip:
                self._blips += 1
            elif not quiet:
                self._outage_start = now
                self._blips = 0
                self.outages += 1
            members = list(self._members)
        if ended is not None:
            self._log_back(*ended)
        if not blip and not quiet:
            log.warning("distbreaker: Redis unavailable at %s: %s; breakers fall back to "
                        "their local policy until it answers again", self.label, cause,
                        extra={"event": "distbreaker.store_down", "store": self.label,
                               "cause": cause})
        for m in members:
            m._store_lost()

    def _settled(self, now: float) -> tuple[float, int] | None:
        """An outage whose end is not logged yet, once Redis has been up for SETTLE."""
        if (self.down_since is None or self.down_since == now) and (
                self._outage_start is not None and now - self._up_at >= self.SETTLE
                and self._up_at >= self._outage_start):
            ended = (self._up_at - self._outage_start, self._blips)
            self._outage_start = None
            return ended
        return None

    def _log_back(self, took: float, blips: int) -> None:
        absorbed = f" ({blips} blips absorbed)" if blips else ""
        log.warning("distbreaker: Redis is back at %s after %.1fs%s; breakers use the "
                    "shared state again", self.label, took, absorbed,
                    extra={"event": "distbreaker.store_up", "store": self.label,
                           "outage_s": round(took, 3), "blips": blips})

    def answered(self) -> None:
        """Redis answered a request (any request, however late)."""
        self._last_answer = time.monotonic()
        if (self.down_since is None and self.silent_since is None
                and self._outage_start is None and self.misconfig is None):
            self._report_slow()
            return
        with self._lock:
            now = time.monotonic()
            self.silent_since = None
            self.misconfig = None
            recovered = self.down_since is not None
            if recovered:
                self.down_since = None
                self.cause = ""
                self._trial = False
                self._backoff = self.MIN_BACKOFF
                self._up_at = now
            members = list(self._members) if recovered else []
            ended = None if recovered else self._settled(now)
        if ended is not None:
            self._log_back(*ended)
        for m in members:
            m._store_recovered()

    def success(self) -> None:  # the listener's word, and older callers'
        if self.misconfig is None:
            self.answered()

    def _report_slow(self) -> None:
        n = self.slow_replies - self._slow_reported
        if n <= 0 or time.monotonic() < self._slow_report_at:
            return
        with self._lock:
            n = self.slow_replies - self._slow_reported
            if n <= 0:
                return
            self._slow_reported = self.slow_replies
            self._slow_report_at = time.monotonic() + self.REPORT_EVERY
        log.info("distbreaker: %d replies from Redis at %s took longer than redis_timeout "
                 "in the last minute; their callers went on and the requests completed in "
                 "the background (no failover)", n, self.label,
                 extra={"event": "distbreaker.slow_replies", "store": self.label,
                        "count": n})


_GUARDS: dict[tuple[int, str], StoreGuard] = {}
_GUARDS_LOCK = threading.Lock()


_BACKGROUND: ThreadPoolExecutor | None = None
_BACKGROUND_LOCK = threading.Lock()


def background(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """Run `fn(*args)` on the process's background threads: requests whose callers were
    released at redis_timeout finish there, with the longer background deadline."""
    global _BACKGROUND
    ex = _BACKGROUND
    if ex is None:
        with _BACKGROUND_LOCK:
            ex = _BACKGROUND
            if ex is None:
                ex = _BACKGROUND = ThreadPoolExecutor(
                    max_workers=32, thread_name_prefix="distbreaker-background")
    return ex.submit(fn, *args)


def deliver(done: Callable[[Any, BaseException | None], None], fut: Any) -> None:
    """A done-callback of a future or task: hand its outcome to `done(raw, exc)`."""
    if fut.cancelled():
        done(None, TimeoutError("cancelled"))
        return
    exc = fut.exception()
    done(None if exc is not None else fut.result(), exc)


def _fresh_lock_in_child() -> None:
    global _GUARDS_LOCK, _DERIVED_LOCK, _BACKGROUND_LOCK, _BACKGROUND
    _GUARDS_LOCK = threading.Lock()  # the parent may have held it while forking
    _DERIVED_LOCK = threading.Lock()
    _BACKGROUND_LOCK = threading.Lock()
    _BACKGROUND = None  # the parent's threads do not exist here


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
    for k in ("orig_socket_timeout", "orig_socket_connect_timeout"):
        if k in kw:
            kw[k] = kw["socket_timeout" if k == "orig_socket_timeout" else
                       "socket_connect_timeout"]
    # No CLIENT SETINFO on connect: one round trip less before a new connection can send,
    # and one less place where a paused server holds a caller.
    if "driver_info" in kw:
        kw["driver_info"] = None
    elif "lib_name" in kw:
        kw["lib_name"] = kw["lib_version"] = None
    cls = type(pool)
    # The derived pool has no cap of its own: a connection whose caller went on is held
    # until its reply comes, and a capped (or blocking) pool would turn a pause into
    # "too many connections" or a wait of the pool's timeout on the caller's path.
    max_connections = None
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
    with _DERIVED_LOCK:
        clients = [client, *(e[0] for k, e in _DERIVED.items()
                             if k[0] == os.getpid() and e[2] is client)]
    return [c.connection_pool for c in clients
            if hasattr(getattr(c, "connection_pool", None), "get_master_address")]
