"""Voice providers on shared breakers: one breaker per vendor, a manager, fallback.

A provider is a `ProviderType` or any plain string (``"my_vendor"``); its breaker is named
``provider_<value>``. The manager holds one breaker per provider over one Redis client and
answers the questions a voice worker asks on every request: which providers may I call
now, and call the first one that works.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, ParamSpec, TypeVar

from ._announce import StateChangeHook
from ._config import CircuitBreakerConfig, CircuitState
from ._dual import COMPLETED, AwaitableDict, AwaitableList, Completed
from ._errors import CircuitBreakerError
from ._keys import DEFAULT_PREFIX
from ._process import PROCESS
from .breaker import AsyncCircuitBreaker, CircuitBreaker, _is_async_client
from .stores import MemoryStore

__all__ = [
    "AllProvidersUnavailableError",
    "AsyncCircuitBreakerManager",
    "AsyncProviderCircuitBreaker",
    "CircuitBreakerManager",
    "ProviderCircuitBreaker",
    "ProviderType",
    "circuit_breaker_protect",
    "configure",
    "get_circuit_breaker_manager",
    "initialize_provider_circuit_breakers",
]

log = logging.getLogger("distbreaker")

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")


class ProviderType(str, enum.Enum):
    """Common speech-to-text and text-to-speech vendors. Any string works too."""

    OPENAI = "openai"
    GOOGLE = "google"
    AZURE = "azure"
    YANDEX = "yandex"
    ELEVENLABS = "elevenlabs"
    DEEPGRAM = "deepgram"
    AWS = "aws"
    ASSEMBLYAI = "assemblyai"

    def __str__(self) -> str:
        return self.value


Provider = ProviderType | str


def provider_key(provider: Provider) -> str:
    """The provider's value: ``ProviderType.OPENAI`` and ``"openai"`` are the same provider."""
    if isinstance(provider, ProviderType):
        return provider.value
    if isinstance(provider, str) and provider:
        return provider
    raise ValueError(f"provider must be a ProviderType or a non-empty str, got {provider!r}")


def breaker_name(provider: Provider) -> str:
    return f"provider_{provider_key(provider)}"


def _provider_arg(provider: Provider | None, provider_type: Provider | None) -> Provider:
    if provider is not None and provider_type is not None:
        raise TypeError("pass the provider or provider_type=, not both")
    p = provider if provider is not None else provider_type
    if p is None:
        raise TypeError("a provider is required: ProviderCircuitBreaker(ProviderType.OPENAI)")
    return p


class _ProviderMixin:
    provider: str

    @property
    def provider_type(self) -> ProviderType | str:
        """The provider as a `ProviderType` when it is one (the seed's attribute)."""
        try:
            return ProviderType(self.provider)
        except ValueError:
            return self.provider


class ProviderCircuitBreaker(_ProviderMixin, CircuitBreaker):
    """The shared breaker of one provider, named ``provider_<value>``. It guards plain
    and coroutine functions alike (``await pb.call(coro_fn)``, ``async with
    pb.protect()``): the seed's asyncio code runs on it unchanged."""

    def __init__(
        self,
        provider: Provider | None = None,
        config: CircuitBreakerConfig | None = None,
        *,
        provider_type: Provider | None = None,
        redis: Any = None,
        on_state_change: StateChangeHook | None = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        if redis is not None and _is_async_client(redis):
            raise TypeError("ProviderCircuitBreaker got an asyncio client; use "
                            "AsyncProviderCircuitBreaker, or pass a redis.Redis client")
        provider = _provider_arg(provider, provider_type)
        self.provider = provider_key(provider)
        super().__init__(breaker_name(provider), config, redis=redis,
                         on_state_change=on_state_change, prefix=prefix)


class AsyncProviderCircuitBreaker(_ProviderMixin, AsyncCircuitBreaker):
    """The asyncio twin of `ProviderCircuitBreaker` (``async with breaker.protect()``)."""

    def __init__(
        self,
        provider: Provider | None = None,
        config: CircuitBreakerConfig | None = None,
        *,
        provider_type: Provider | None = None,
        redis: Any = None,
        on_state_change: StateChangeHook | None = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        provider = _provider_arg(provider, provider_type)
        self.provider = provider_key(provider)
        super().__init__(breaker_name(provider), config, redis=redis,
                         on_state_change=on_state_change, prefix=prefix)


class AllProvidersUnavailableError(CircuitBreakerError):
    """No provider served the call; `causes` maps each provider tried to why it did not
    (a CircuitOpenError, or the exception the call raised)."""

    def __init__(self, causes: dict[str, BaseException]) -> None:
        self.causes = causes
        parts = ", ".join(f"{p}: {type(e).__name__}: {e}" for p, e in causes.items())
        super().__init__(f"no provider available ({parts or 'none given'})")


B = TypeVar("B", ProviderCircuitBreaker, AsyncProviderCircuitBreaker)


class _ManagerBase(Generic[B]):
    """Registration, ordering and health shared by the sync and async managers."""

    _breaker_cls: type[B]

    def __init__(self, redis: Any = None, default_config: CircuitBreakerConfig | None = None,
                 *, prefix: str = DEFAULT_PREFIX,
                 on_state_change: StateChangeHook | None = None) -> None:
        if default_config is not None and not isinstance(default_config, CircuitBreakerConfig):
            raise TypeError("default_config must be a CircuitBreakerConfig")
        # One in-process store for all providers when no Redis is given.
        self.redis = redis if redis is not None else MemoryStore()
        self.default_config = default_config or CircuitBreakerConfig()
        self.prefix = prefix
        self._on_state_change = on_state_change
        self._lock = threading.Lock()
        self._breakers: dict[str, B] = {}
        self._order: dict[str, tuple[float, int]] = {}
        self._originals: dict[str, Provider] = {}

    def register_provider(self, provider: Provider, config: CircuitBreakerConfig | None = None,
                          *, priority: float | None = None) -> B:
        """Create (or return) the provider's breaker. Lower `priority` comes first in
        `get_all_available_providers()`; without one, registration order decides."""
        key = provider_key(provider)
        with self._lock:
            old = self._breakers.get(key)
            if old is not None and (config is None or config == old.config):
                if priority is not None:
                    self._order[key] = (priority, self._order[key][1])
                return old
            b = self._breaker_cls(provider, config or self.default_config, redis=self.redis,
                                  on_state_change=self._on_state_change, prefix=self.prefix)
            self._breakers[key] = b
            seq = self._order[key][1] if key in self._order else len(self._order)
            self._order[key] = (priority if priority is not None else float(seq), seq)
            self._originals.setdefault(key, provider)
        if old is not None:
            self._hub_remove(old)
        return b

    def _hub_remove(self, b: B) -> None:
        b.stop_listening()

    def get_breaker(self, provider: Provider) -> B:
        """The provider's breaker, registered with the default config if it is new."""
        b = self._breakers.get(provider_key(provider))
        return b if b is not None else self.register_provider(provider)

    @property
    def providers(self) -> list[Provider]:
        """Registered providers in priority order, as they were registered."""
        with self._lock:
            keys = sorted(self._order, key=self._order.__getitem__)
            return [self._originals[k] for k in keys]

    def get_all_available_providers(self) -> AwaitableList[Provider]:
        """Providers whose breaker admits calls now (local snapshots, no I/O); awaitable
        too, for the seed's asyncio code."""
        return AwaitableList(p for p in self.providers
                             if self._breakers[provider_key(p)].is_available())

    def _ordered(self, providers: Iterable[Provider] | None) -> list[Provider]:
        if providers is None:
            return self.providers
        out = list(providers)
        if not out:
            raise ValueError("providers must not be empty")
        return out

    def _health(self, snaps: dict[str, tuple[B, Any]]) -> dict[str, Any]:
        per: dict[str, Any] = {}
        for key, (b, m) in snaps.items():
            s = b.snapshot
            fleet = m.fleet if m is not None else None
            per[key] = {
                "breaker": b.name,
                "state": b.get_state().value,
                "available": b.is_available(),
                "override": s.forced or None,
                "generation": s.generation,
                "window_calls": fleet.calls if fleet else None,
                "window_failures": fleet.failures if fleet else None,
                "failure_rate": round(fleet.failure_rate, 4) if fleet else None,
                "consecutive_failures": fleet.consecutive_failures if fleet else None,
                "store_degraded": m is None or b.store_degraded,
                "store_misconfigured": b.store_problem is not None,
                "config_drift": bool(fleet and fleet.config_fingerprint
                                     and fleet.config_fingerprint != b.config.fingerprint),
            }
        available = sum(1 for v in per.values() if v["available"])
        closed = sum(1 for v in per.values() if v["state"] == CircuitState.CLOSED.value)
        degraded_store = any(v["store_degraded"] for v in per.values())
        problems = sorted({p for b, _ in snaps.values() if (p := b.store_problem)})
        if (per and available == 0) or problems:
            status = "critical"  # a misconfigured Redis will not heal by waiting
        elif closed < len(per) or degraded_store:
            status = "degraded"
        else:
            status = "healthy"
        return {
            "status": status,
            "providers": per,
            "total_providers": len(per),
            "available_providers": available,
            "store": "memory" if isinstance(self.redis, MemoryStore) else "redis",
            "store_degraded": degraded_store,
            "store_misconfigured": problems,
        }


class CircuitBreakerManager(_ManagerBase[ProviderCircuitBreaker]):
    """One `ProviderCircuitBreaker` per provider over one sync Redis client (or, with
    ``redis=None``, one shared in-process store)."""

    _breaker_cls = ProviderCircuitBreaker

    def get_system_health(self) -> AwaitableDict:
        """JSON-serialisable health of every provider (one round trip each), with an overall
        `status`: healthy (all closed), degraded (some not closed), critical (none
        available or Redis misconfigured). Awaitable too, for the seed's asyncio code."""
        snaps: dict[str, tuple[ProviderCircuitBreaker, Any]] = {}
        for p in self.providers:
            b = self._breakers[provider_key(p)]
            try:
                m = b.get_metrics()
            except Exception as e:
                log.warning("health read of %s failed: %s", b.name, e)
                m = None
            snaps[provider_key(p)] = (b, m)
        return AwaitableDict(self._health(snaps))

    def reset_all(self) -> Completed:
        for p in self.providers:
            self._breakers[provider_key(p)].reset()
        return COMPLETED

    def call_with_fallback(self, providers: Iterable[Provider] | None,
                           fn: Callable[[Provider], R]) -> R:
        """Call ``fn(provider)`` on the first provider that admits it and succeeds, in
        order; record each outcome on that provider's breaker. Raises
        AllProvidersUnavailableError with every provider's cause if none succeeds."""
        if inspect.iscoroutinefunction(fn):
            raise TypeError(f"{getattr(fn, '__qualname__', fn)!r} is a coroutine function: "
                            "await manager.acall_with_fallback(providers, fn) instead")
        causes: dict[str, BaseException] = {}
        for p in self._ordered(providers):
            b = self.get_breaker(p)
            try:
                r = b.call(fn, p)
            except Exception as e:  # CircuitOpenError or the provider's own
                causes[provider_key(p)] = e
                continue
            if inspect.iscoroutine(r):  # fn returned a coroutine: nothing ran yet
                r.close()
                raise TypeError(f"{getattr(fn, '__qualname__', fn)!r} returned a coroutine: "
                                "await manager.acall_with_fallback(providers, fn) instead")
            return r
        raise AllProvidersUnavailableError(causes)

    async def acall_with_fallback(self, providers: Iterable[Provider] | None,
                                  fn: Callable[[Provider], Awaitable[R]]) -> R:
        """`call_with_fallback` for a coroutine function, on this sync manager."""
        causes: dict[str, BaseException] = {}
        for p in self._ordered(providers):
            b = self.get_breaker(p)
            try:
                # the breaker's own path: timeout_duration applies, recorded after the await
                r: Any = b.call(fn, p)
                return await r if inspect.isawaitable(r) else r  # type: ignore[no-any-return]
            except Exception as e:
                causes[provider_key(p)] = e
        raise AllProvidersUnavailableError(causes)

    def close(self) -> None:
        for p in self.providers:
            self._breakers[provider_key(p)].close()


class AsyncCircuitBreakerManager(_ManagerBase[AsyncProviderCircuitBreaker]):
    """The asyncio twin, over a ``redis.asyncio.Redis`` client."""

    _breaker_cls = AsyncProviderCircuitBreaker

    async def get_system_health(self) -> dict[str, Any]:
        snaps: dict[str, tuple[AsyncProviderCircuitBreaker, Any]] = {}
        for p in self.providers:
            b = self._breakers[provider_key(p)]
            try:
                m = await b.get_metrics()
            except Exception as e:
                log.warning("health read of %s failed: %s", b.name, e)
                m = None
            snaps[provider_key(p)] = (b, m)
        return self._health(snaps)

    async def reset_all(self) -> None:
        for p in self.providers:
            await self._breakers[provider_key(p)].reset()

    async def call_with_fallback(self, providers: Iterable[Provider] | None,
                                 fn: Callable[[Provider], Awaitable[R]]) -> R:
        causes: dict[str, BaseException] = {}
        for p in self._ordered(providers):
            b = self.get_breaker(p)
            try:
                return await b.call(fn, p)
            except Exception as e:
                causes[provider_key(p)] = e
        raise AllProvidersUnavailableError(causes)

    async def close(self) -> None:
        for p in self.providers:
            await self._breakers[provider_key(p)].close()


# -- the process-wide manager -------------------------------------------------------------



def configure(redis: Any = None, *, url: str | None = None,
              default_config: CircuitBreakerConfig | None = None,
              prefix: str = DEFAULT_PREFIX) -> CircuitBreakerManager:
    """Set up this process's manager explicitly (a client, or a Redis URL)."""
    if redis is not None and url is not None:
        raise ValueError("pass either redis or url, not both")
    if url is not None:
        redis = _client_from_url(url)
    with PROCESS.manager_lock:  # a forked child starts without its parent's (see _process)
        old = PROCESS.manager
        m = PROCESS.manager = CircuitBreakerManager(redis, default_config, prefix=prefix)
    if old is not None:
        with contextlib.suppress(Exception):
            old.close()
    return m


def _client_from_url(url: str) -> Any:
    import redis as redis_mod

    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"Redis URL must start with redis://, rediss:// or unix://, got {url!r}")
    try:
        return redis_mod.Redis.from_url(url)
    except ValueError as e:
        raise ValueError(f"bad Redis URL {url!r}: {e}") from None


def get_circuit_breaker_manager() -> CircuitBreakerManager:
    """This process's manager: from `configure()`, else ``DISTBREAKER_REDIS_URL``, else an
    in-process store (with a warning: breakers are then not shared between processes)."""
    with PROCESS.manager_lock:
        m = PROCESS.manager
        if m is not None:
            return m  # type: ignore[no-any-return]
    url = os.environ.get("DISTBREAKER_REDIS_URL")
    if url:
        return configure(url=url)
    log.warning("distbreaker: no Redis configured (DISTBREAKER_REDIS_URL or configure()); "
                "breakers use an in-process store and are not shared between processes",
                extra={"event": "distbreaker.no_redis"})
    return configure()


def initialize_provider_circuit_breakers(
    config: CircuitBreakerConfig | None = None,
) -> CircuitBreakerManager:
    """Register every `ProviderType` on the process's manager."""
    m = get_circuit_breaker_manager()
    for p in ProviderType:
        m.register_provider(p, config)
    return m


def circuit_breaker_protect(provider: Provider) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: guard a sync or async function with the provider's breaker on the
    process's manager (looked up at call time, so `configure()` may come later)."""
    provider_key(provider)

    def deco(fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def awrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                # the breaker's own async path: timeout_duration applies, the outcome is
                # recorded after the await
                b = get_circuit_breaker_manager().get_breaker(provider)
                return await b.call(fn, *args, **kwargs)

            return awrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            return get_circuit_breaker_manager().get_breaker(provider).call(fn, *args, **kwargs)

        return wrapper

    return deco

