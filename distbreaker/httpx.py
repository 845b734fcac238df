"""httpx transports that guard every request with the shared breaker of its provider.

Install with ``pip install 'distbreaker[httpx]'``. Most vendor SDKs (OpenAI, Anthropic,
ElevenLabs, Deepgram, ...) send their requests through an ``httpx.Client`` you may pass
in, so a transport is the one place where every request of an SDK can be guarded without
touching the SDK's code::

    client = httpx.Client(transport=BreakerTransport(manager=manager,
                                                     provider=ProviderType.OPENAI))

What the transport decides, and why:

- Admission happens before the inner transport is called, so a rejected request raises
  `CircuitOpenError` before a connection is opened or a byte is sent: the point of an
  open breaker is to stop loading a vendor that is down.
- Connection errors and timeouts (`httpx.TransportError`) are failures whatever the
  breaker's ``record_exceptions`` says (they are exactly what the breaker is for), unless
  the breaker's ``ignore_exceptions`` names them; they are re-raised. The two errors that
  mean *this process* built a bad request (`httpx.UnsupportedProtocol`,
  `httpx.LocalProtocolError`) count as neither outcome: one caller's bug must not open the
  vendor's breaker for the whole fleet. Other exceptions of the inner transport are
  classified by the breaker's config, as for `CircuitBreaker.call`.
- A response is returned to the caller unchanged. 5xx and 429 are failures (the vendor is
  down or shedding load), everything else is a success: a 4xx is the caller's problem and
  says the vendor is up. ``is_failure=`` replaces this rule. A ``Retry-After`` on a 429 or
  503 sets the open period if that failure trips the breaker, so the fleet comes back when
  the vendor said, not after a guessed ``recovery_timeout``.
- The outcome is decided when the response headers arrive, also for streamed responses:
  the permit (and a half-open probe's fleet-wide lease) is finished before
  ``handle_request`` returns, exactly once, so a caller that reads a stream slowly or
  never closes it cannot hold the probe lease. Errors while reading the body afterwards
  are not recorded, and ``timeout_duration`` / ``slow_call_duration`` measure the time to
  the headers (the request is never cancelled by the breaker: use httpx timeouts).
- The breaker's ``is_failure_result``, if its config sets one, is called with the
  `httpx.Response` of a response the status rule counted as a success.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Generic, TypeVar

import httpx

from ._errors import CircuitOpenError
from ._outcome import Permit
from .breaker import AsyncCircuitBreaker, CircuitBreaker
from .providers import AsyncCircuitBreakerManager, CircuitBreakerManager, Provider

__all__ = [
    "AsyncBreakerTransport",
    "BreakerTransport",
    "circuit_open_error",
    "is_failure_response",
    "retry_after_seconds",
]

log = logging.getLogger("distbreaker")

B = TypeVar("B")

#: Exceptions that say this process built a request the vendor never saw.
_CALLER_ERRORS = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)
_RETRY_AFTER_STATUSES = frozenset({429, 503})


# -- response classification ------------------------------------------------------------


def is_failure_response(response: httpx.Response) -> bool:
    """The default rule: 5xx (the vendor failed) and 429 (it sheds load) are failures."""
    return response.status_code >= 500 or response.status_code == 429


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None.

    An HTTP date is measured against the response's own ``Date`` header when it has one,
    so the vendor's clock decides and this host's clock skew does not; without ``Date``
    the local clock is used. Zero, past, negative and unparsable values give None.
    """
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        when = _http_date(value)
        if when is None:
            return None
        now = _http_date(response.headers.get("date", "")) or datetime.now(timezone.utc)
        seconds = (when - now).total_seconds()
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return seconds


def _http_date(value: str) -> datetime | None:
    try:
        dt = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def circuit_open_error(exc: BaseException | None) -> CircuitOpenError | None:
    """The `CircuitOpenError` behind `exc`, following ``__cause__`` / ``__context__``.

    Vendor SDKs wrap whatever their httpx client raises (the OpenAI SDK raises
    ``APIConnectionError(...) from err``); this finds the rejection inside, so a caller
    can fall back to another provider at once instead of treating it as a network error.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, CircuitOpenError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _judge(permit: Permit, response: httpx.Response,
           is_failure: Callable[[httpx.Response], bool]) -> None:
    """Mark the permit failed if the response is a failure, with the vendor's Retry-After."""
    try:
        failed = is_failure(response)
    except Exception:
        log.exception("is_failure raised; counting the response as failed")
        failed = True
    if failed:
        retry = None
        if response.status_code in _RETRY_AFTER_STATUSES:
            retry = retry_after_seconds(response)
        permit.mark_failure(retry_after=retry)


def _exc_outcome(breaker: CircuitBreaker | AsyncCircuitBreaker, permit: Permit,
                 exc: BaseException) -> BaseException | None:
    """What to hand to the breaker's `finish` for an exception of the inner transport."""
    if isinstance(exc, _CALLER_ERRORS):
        permit.mark_ignored()  # a bad request built here says nothing about the provider
        return None
    if isinstance(exc, httpx.TransportError) and not isinstance(
        exc, breaker.config.ignore_exceptions
    ):
        permit.mark_failure()
        return None  # a failure even if record_exceptions does not name it
    return exc


# -- routing -------------------------------------------------------------------------------


def _host_key(key: str) -> str:
    """Normalise a ``hosts`` key the way httpx normalises ``request.url.host``.

    A key with a port, scheme, path or user would never match a host, so it is an error
    here rather than a vendor that silently goes unguarded.
    """
    bad = ValueError(f"hosts keys are host names like 'api.openai.com' or "
                     f"'*.stt.speech.microsoft.com' (no scheme, port, path or user), "
                     f"got {key!r}")
    if not isinstance(key, str) or not key or "/" in key or "@" in key:
        raise bad
    wild = key.startswith("*.")
    name = key[2:] if wild else key
    if not (name.startswith("[") and name.endswith("]")):
        if name.count(":") == 1:
            raise bad  # host:port
        if ":" in name:
            name = f"[{name}]"  # a bare IPv6 address
    try:
        url = httpx.URL(f"http://{name}/")
    except httpx.InvalidURL:
        raise bad from None
    host = url.host.rstrip(".")
    if url.port is not None or not host:
        raise bad
    return f".{host}" if wild else host


class _Routing(Generic[B]):
    """Which breaker guards a request: one fixed breaker, one provider of a manager, or a
    provider chosen by the request's host (None: the host is not guarded)."""

    __slots__ = ("_exact", "_fixed", "_get", "_provider", "_suffixes")

    def __init__(self, fixed: B | None, get: Callable[[Provider], B] | None,
                 provider: Provider | None, hosts: Mapping[str, Provider] | None) -> None:
        self._fixed = fixed
        self._get = get
        self._provider = provider
        self._exact: dict[str, Provider] = {}
        self._suffixes: list[tuple[str, Provider]] = []
        if get is None:
            return
        # Register every provider now: creating a sync breaker reads Redis once, which
        # must not happen later on an event loop.
        if provider is not None:
            get(provider)
        for raw, p in (hosts or {}).items():
            key = _host_key(raw)
            if key.startswith("."):
                self._suffixes.append((key, p))
            else:
                self._exact[key] = p
            get(p)
        self._suffixes.sort(key=lambda kp: len(kp[0]), reverse=True)  # most specific first

    def breaker_for(self, host: str) -> B | None:
        if self._fixed is not None:
            return self._fixed
        assert self._get is not None
        # Looked up per request (a dict lookup): a provider re-registered on the manager
        # with a new config is picked up.
        if self._provider is not None:
            return self._get(self._provider)
        host = host.rstrip(".")
        p = self._exact.get(host)
        if p is None:
            for suffix, sp in self._suffixes:
                if host.endswith(suffix):
                    p = sp
                    break
            else:
                return None
        return self._get(p)


def _check_args(who: str, breaker: object, manager: object, provider: object,
                hosts: object) -> None:
    if (breaker is None) == (manager is None):
        raise TypeError(f"{who} needs either breaker= or manager= (with provider= or hosts=)")
    if breaker is not None and (provider is not None or hosts is not None):
        raise TypeError(f"{who}: provider= and hosts= go with manager=, not with breaker=")
    if manager is not None and (provider is None) == (hosts is None):
        raise TypeError(f"{who}: with manager=, pass exactly one of provider= and hosts=")
    if hosts is not None and not isinstance(hosts, Mapping):
        raise TypeError(f"{who}: hosts must map host names to providers")


# -- sync ------------------------------------------------------------------------------------


class BreakerTransport(httpx.BaseTransport):
    """An `httpx.BaseTransport` that guards each request with a breaker.

    Pass either ``breaker=`` (a `CircuitBreaker` / `ProviderCircuitBreaker`: every
    request of the client is one vendor's), or ``manager=`` (a `CircuitBreakerManager`)
    with ``provider=`` (one provider per client) or ``hosts=`` (a mapping such as
    ``{"api.openai.com": ProviderType.OPENAI, "*.stt.speech.microsoft.com": "azure"}``:
    the request's host picks the provider; ``*.`` matches any subdomain). A host that is
    in no entry of ``hosts`` is passed through unguarded: an SDK also talks to endpoints
    that are not the vendor's API (OAuth token, metadata), and failing those would turn a
    routing table's gap into an outage. Providers are registered on the manager at
    construction.

    ``transport`` is the inner transport (default ``httpx.HTTPTransport()``); closing this
    transport closes it. Breakers are not closed: they belong to the caller or manager.
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        breaker: CircuitBreaker | None = None,
        manager: CircuitBreakerManager | None = None,
        provider: Provider | None = None,
        hosts: Mapping[str, Provider] | None = None,
        is_failure: Callable[[httpx.Response], bool] = is_failure_response,
    ) -> None:
        _check_args("BreakerTransport", breaker, manager, provider, hosts)
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise TypeError(f"BreakerTransport needs a CircuitBreaker, got "
                            f"{type(breaker).__name__}; use AsyncBreakerTransport for "
                            f"an AsyncCircuitBreaker")
        if manager is not None and not isinstance(manager, CircuitBreakerManager):
            raise TypeError(f"BreakerTransport needs a CircuitBreakerManager, got "
                            f"{type(manager).__name__}")
        self._transport = transport if transport is not None else httpx.HTTPTransport()
        self._is_failure = is_failure
        get = manager.get_breaker if manager is not None else None
        self._routing: _Routing[CircuitBreaker] = _Routing(breaker, get, provider, hosts)

    def breaker_for(self, request: httpx.Request) -> CircuitBreaker | None:
        """The breaker that guards `request` (None: it passes through unguarded)."""
        return self._routing.breaker_for(request.url.host)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Admit (or raise `CircuitOpenError` before any I/O), send, record, return."""
        b = self._routing.breaker_for(request.url.host)
        if b is None:
            return self._transport.handle_request(request)
        permit = b.admit()
        try:
            response = self._transport.handle_request(request)
        except BaseException as e:
            b.finish(permit, _exc_outcome(b, permit, e), None)
            raise
        try:
            _judge(permit, response, self._is_failure)
            b.finish(permit, None, response)
        except BaseException:
            response.close()
            raise
        return response

    def close(self) -> None:
        self._transport.close()


# -- asyncio --------------------------------------------------------------------------------


AnyBreaker = AsyncCircuitBreaker | CircuitBreaker


class AsyncBreakerTransport(httpx.AsyncBaseTransport):
    """The asyncio twin of `BreakerTransport`, for ``httpx.AsyncClient``.

    ``breaker=`` takes an `AsyncCircuitBreaker` / `AsyncProviderCircuitBreaker`, or a sync
    `CircuitBreaker` / `ProviderCircuitBreaker`; ``manager=`` an
    `AsyncCircuitBreakerManager` or a `CircuitBreakerManager`. With a sync breaker on
    Redis the round trips (admission when the local snapshot cannot decide, and the
    outcome) run in the loop's default executor, so the event loop never waits on Redis;
    admissions and rejections that the snapshot decides stay inline. A request cancelled
    while its admission runs in a thread gives the permit back as soon as the thread is
    done, so a cancelled probe does not hold the fleet's probe lease until it expires.
    Needs asyncio (the breakers do).
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        breaker: AnyBreaker | None = None,
        manager: AsyncCircuitBreakerManager | CircuitBreakerManager | None = None,
        provider: Provider | None = None,
        hosts: Mapping[str, Provider] | None = None,
        is_failure: Callable[[httpx.Response], bool] = is_failure_response,
    ) -> None:
        _check_args("AsyncBreakerTransport", breaker, manager, provider, hosts)
        if breaker is not None and not isinstance(breaker, (AsyncCircuitBreaker,
                                                            CircuitBreaker)):
            raise TypeError(f"AsyncBreakerTransport needs an AsyncCircuitBreaker or a "
                            f"CircuitBreaker, got {type(breaker).__name__}")
        if manager is not None and not isinstance(manager, (AsyncCircuitBreakerManager,
                                                            CircuitBreakerManager)):
            raise TypeError(f"AsyncBreakerTransport needs an AsyncCircuitBreakerManager or "
                            f"a CircuitBreakerManager, got {type(manager).__name__}")
        self._transport = transport if transport is not None else httpx.AsyncHTTPTransport()
        self._is_failure = is_failure
        get: Callable[[Provider], AnyBreaker] | None = (
            manager.get_breaker if manager is not None else None
        )
        self._routing: _Routing[AnyBreaker] = _Routing(breaker, get, provider, hosts)

    def breaker_for(self, request: httpx.Request) -> AnyBreaker | None:
        """The breaker that guards `request` (None: it passes through unguarded)."""
        return self._routing.breaker_for(request.url.host)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Admit (or raise `CircuitOpenError` before any I/O), send, record, return."""
        b = self._routing.breaker_for(request.url.host)
        if b is None:
            return await self._transport.handle_async_request(request)
        permit = await _admit(b)
        try:
            response = await self._transport.handle_async_request(request)
        except BaseException as e:
            await _done(b, permit, _exc_outcome(b, permit, e), None)
            raise
        try:
            _judge(permit, response, self._is_failure)
            await _done(b, permit, None, response)
        except BaseException:
            await response.aclose()
            raise
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()


async def _admit(b: AnyBreaker) -> Permit:
    if isinstance(b, AsyncCircuitBreaker):
        return await b.admit()
    return await b.aadmit()  # Redis round trips off the loop; a cancelled probe gives back


async def _done(b: AnyBreaker, permit: Permit, exc: BaseException | None,
                response: httpx.Response | None) -> None:
    if isinstance(b, AsyncCircuitBreaker):
        await b.finish(permit, exc, response)
    else:
        await b.afinish(permit, exc, response)
