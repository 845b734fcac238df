"""distbreaker.httpx: transports that guard every request with its provider's breaker.

The upstream is a real local HTTP/1.1 server whose answer the tests switch at runtime and
which counts the connections it accepts and the requests it reads, so "rejected before
any byte leaves the process" is checked on the wire, not on a mock. Breakers run on the
session's real redis-server unless a test only checks a local decision.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from distbreaker import (
    AsyncCircuitBreaker,
    AsyncCircuitBreakerManager,
    AsyncProviderCircuitBreaker,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitBreakerManager,
    CircuitOpenError,
    CircuitState,
    Permit,
    ProviderCircuitBreaker,
    ProviderType,
)
from distbreaker.httpx import (
    AsyncBreakerTransport,
    BreakerTransport,
    circuit_open_error,
    is_failure_response,
    retry_after_seconds,
)

from redis_server import free_port

# -- the upstream ------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and hung up is expected here


class Upstream:
    """A local HTTP/1.1 server (keep-alive) whose behaviour is switched at runtime.

    ``mode``: ``"ok"`` (200), ``"503"``, ``"429"`` (both with ``retry_after`` as the
    Retry-After header if set), ``"close"`` (read the request, close without answering),
    ``"delay"`` (sleep ``delay`` seconds, then 200).
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.retry_after: str | None = None
        self.delay = 0.0
        self.requests = 0
        self.connections = 0
        self.hosts: list[str] = []
        self._lock = threading.Lock()
        up = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with up._lock:
                    up.connections += 1

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

            def _answer(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                with up._lock:
                    up.requests += 1
                    up.hosts.append(self.headers.get("Host", ""))
                    mode, retry_after, delay = up.mode, up.retry_after, up.delay
                if mode == "close":
                    self.close_connection = True
                    return
                if mode == "delay":
                    time.sleep(delay)
                status = {"ok": 200, "delay": 200, "503": 503, "429": 429}[mode]
                body = b'{"text": "hello", "pad": "%s"}' % (b"x" * 1000)
                self.send_response(status)
                if retry_after is not None and status in (429, 503):
                    self.send_header("Retry-After", retry_after)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"

    def sent(self) -> tuple[int, int]:
        """(connections accepted, requests read) so far."""
        with self._lock:
            return self.connections, self.requests

    def start(self) -> Upstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream().start()
    yield up
    up.stop()


def _sleep_until(t: float) -> None:
    time.sleep(max(t - time.monotonic(), 0.0))


def _port(client: redis.Redis) -> int:
    return int(client.connection_pool.connection_kwargs["port"])


CFG = CircuitBreakerConfig(failure_threshold=3, recovery_timeout=1.0, success_threshold=1)

# -- sync: trip, reject without I/O, recover ---------------------------------------------


def test_client_stops_sending_on_503_and_resumes_after_recovery(
    upstream: Upstream, redis_client: redis.Redis
) -> None:
    b = ProviderCircuitBreaker(ProviderType.OPENAI, CFG, redis=redis_client)
    with httpx.Client(transport=BreakerTransport(breaker=b), base_url=upstream.url()) as c:
        assert c.get("/v1/models").status_code == 200
        upstream.mode = "503"
        for _ in range(3):  # returned to the caller as they are, recorded as failures
            assert c.post("/v1/audio/transcriptions", content=b"x" * 100).status_code == 503
        assert b.get_state() is CircuitState.OPEN
        before = upstream.sent()
        for _ in range(5):
            with pytest.raises(CircuitOpenError) as ei:
                c.post("/v1/audio/transcriptions", content=b"x" * 100)
        assert upstream.sent() == before  # no connection opened, no request read
        err = ei.value
        assert err.name == "provider_openai" and err.state is CircuitState.OPEN
        assert err.retry_after is not None and 0 < err.retry_after <= 1.0

        # Another process (another breaker on the same Redis) rejects without sending too.
        other = ProviderCircuitBreaker(ProviderType.OPENAI, CFG, redis=redis_client)
        with httpx.Client(transport=BreakerTransport(breaker=other)) as c2, \
                pytest.raises(CircuitOpenError):
            c2.get(upstream.url())
        assert upstream.sent() == before
        other.close()

        upstream.mode = "ok"
        time.sleep(err.retry_after + 0.1)
        assert c.get("/v1/models").status_code == 200  # the probe goes out, and closes
        assert upstream.sent()[1] == before[1] + 1
        assert b.get_state() is CircuitState.CLOSED
        assert c.get("/v1/models").status_code == 200
    m = b.get_metrics()
    assert (m.successful_calls, m.failed_calls, m.rejected_calls, m.probes) == (3, 3, 5, 1)
    assert m.fleet is not None and m.fleet.active_probes == 0
    b.close()


def test_retry_after_on_429_decides_the_open_period(
    upstream: Upstream, redis_client: redis.Redis
) -> None:
    # recovery_timeout is 30 s: only the vendor's Retry-After can make it ~3 s.
    cfg = CircuitBreakerConfig(failure_threshold=1, recovery_timeout=30, success_threshold=1)
    manager = CircuitBreakerManager(redis_client, cfg)
    transport = BreakerTransport(manager=manager, provider=ProviderType.ELEVENLABS)
    upstream.mode, upstream.retry_after = "429", "3"
    with httpx.Client(transport=transport, base_url=upstream.url()) as c:
        r = c.get("/v1/text-to-speech")
        t0 = time.monotonic()
        assert r.status_code == 429 and r.headers["Retry-After"] == "3"
        b = manager.get_breaker(ProviderType.ELEVENLABS)
        assert b.get_state() is CircuitState.OPEN
        upstream.mode = "ok"
        before = upstream.sent()
        _sleep_until(t0 + 2.5)
        with pytest.raises(CircuitOpenError) as ei:
            c.get("/v1/text-to-speech")
        assert ei.value.retry_after is not None and 0.2 < ei.value.retry_after < 0.8
        assert upstream.sent() == before
        _sleep_until(t0 + 3.2)
        assert c.get("/v1/text-to-speech").status_code == 200
        assert b.get_state() is CircuitState.CLOSED
    manager.close()


def test_connection_errors_and_timeouts_are_failures_and_reraised(
    upstream: Upstream, redis_client: redis.Redis
) -> None:
    # record_exceptions names none of httpx's errors: transport errors count regardless.
    cfg = CircuitBreakerConfig(failure_threshold=3, recovery_timeout=30,
                               record_exceptions=(KeyError,))
    b = CircuitBreaker("provider_deepgram", cfg, redis=redis_client)
    with httpx.Client(transport=BreakerTransport(breaker=b), timeout=0.3) as c:
        with pytest.raises(httpx.ConnectError):
            c.get(f"http://127.0.0.1:{free_port()}/")  # nothing listens there
        upstream.mode = "close"
        with pytest.raises(httpx.RemoteProtocolError):
            c.get(upstream.url())
        upstream.mode, upstream.delay = "delay", 2.0
        with pytest.raises(httpx.ReadTimeout):
            c.get(upstream.url())
        assert b.get_state() is CircuitState.OPEN
        upstream.mode = "ok"
        before = upstream.sent()
        with pytest.raises(CircuitOpenError):
            c.get(upstream.url())
        assert upstream.sent() == before
    m = b.get_metrics()
    assert (m.failed_calls, m.successful_calls, m.rejected_calls) == (3, 0, 1)
    b.close()


def test_streamed_probe_is_finished_once_when_headers_arrive(
    upstream: Upstream, redis_client: redis.Redis
) -> None:
    cfg = CircuitBreakerConfig(failure_threshold=1, recovery_timeout=0.3, success_threshold=2,
                               half_open_max_calls=1)
    b = ProviderCircuitBreaker("assemblyai", cfg, redis=redis_client)
    b2 = ProviderCircuitBreaker("assemblyai", cfg, redis=redis_client)  # another process
    upstream.mode = "503"
    with httpx.Client(transport=BreakerTransport(breaker=b), base_url=upstream.url()) as c, \
            httpx.Client(transport=BreakerTransport(breaker=b2), base_url=upstream.url()) as c2:
        assert c.get("/").status_code == 503
        assert b.get_state() is CircuitState.OPEN
        upstream.mode = "ok"
        time.sleep(0.4)
        with c.stream("GET", "/stream") as r:
            assert r.status_code == 200 and not r.is_stream_consumed
            # Decided at the headers: the probe's fleet-wide lease is already back, so the
            # one probe slot (half_open_max_calls=1) is free for another process.
            m = b.get_metrics()
            assert m.fleet is not None and m.fleet.active_probes == 0
            assert b.get_state() is CircuitState.HALF_OPEN
            assert c2.get("/").status_code == 200  # second probe success closes
            assert b2.get_state() is CircuitState.CLOSED
            body = r.read()
        assert body.startswith(b'{"text"')
    m = b.get_metrics()
    assert (m.total_calls, m.failed_calls, m.successful_calls, m.probes) == (2, 1, 1, 1)
    assert b.refresh() is CircuitState.CLOSED
    b.close()
    b2.close()


# -- local decisions (in-process store, mock inner transport) -----------------------------


def test_status_rules_and_retry_after_only_from_429_and_503() -> None:
    status, headers = 200, dict[str, str]()  # switched below

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers)

    cfg = CircuitBreakerConfig(failure_threshold=1, recovery_timeout=0.5, success_threshold=1)
    b = CircuitBreaker("provider_x", cfg)
    c = httpx.Client(transport=BreakerTransport(httpx.MockTransport(handler), breaker=b))
    for status in (200, 201, 301, 400, 401, 404, 422):
        assert c.get("http://vendor.test/").status_code == status
    assert b.get_metrics().failed_calls == 0

    status, headers = 500, {"Retry-After": "100"}  # not a 429 / 503: ignored
    c.get("http://vendor.test/")
    with pytest.raises(CircuitOpenError) as ei:
        c.get("http://vendor.test/")
    assert ei.value.retry_after is not None and ei.value.retry_after <= 0.5

    b.reset()
    status = 503  # Retry-After honoured
    c.get("http://vendor.test/")
    with pytest.raises(CircuitOpenError) as ei:
        c.get("http://vendor.test/")
    assert ei.value.retry_after is not None and 99 < ei.value.retry_after <= 100

    # A custom rule: 429 is not a failure here.
    b.reset()
    status, headers = 429, {}
    c2 = httpx.Client(transport=BreakerTransport(httpx.MockTransport(handler), breaker=b,
                                                 is_failure=lambda r: r.status_code >= 500))
    for _ in range(3):
        assert c2.get("http://vendor.test/").status_code == 429
    assert b.get_state() is CircuitState.CLOSED
    assert is_failure_response(httpx.Response(429)) and not is_failure_response(
        httpx.Response(404))
    c.close()
    c2.close()


def test_caller_errors_count_as_neither_and_give_the_probe_back() -> None:
    mode = "503"

    def handler(request: httpx.Request) -> httpx.Response:
        if mode == "bad":
            raise httpx.LocalProtocolError("Illegal header value b'x\\n'")
        return httpx.Response(503 if mode == "503" else 200)

    cfg = CircuitBreakerConfig(failure_threshold=1, recovery_timeout=0.05, success_threshold=1)
    b = CircuitBreaker("provider_y", cfg)
    c = httpx.Client(transport=BreakerTransport(httpx.MockTransport(handler), breaker=b))
    c.get("http://vendor.test/")
    assert b.get_state() is CircuitState.OPEN
    time.sleep(0.1)
    mode = "bad"
    with pytest.raises(httpx.LocalProtocolError):
        c.get("http://vendor.test/")  # a probe, given back without an outcome
    m = b.get_metrics()
    assert m.ignored_calls == 1 and m.failed_calls == 1
    assert m.fleet is not None and m.fleet.active_probes == 0
    assert b.get_state() is CircuitState.HALF_OPEN
    mode = "ok"
    assert c.get("http://vendor.test/").status_code == 200
    assert b.get_state() is CircuitState.CLOSED
    c.close()


def test_host_routing_rules_and_argument_checks() -> None:
    inner = httpx.MockTransport(lambda request: httpx.Response(503))
    manager = CircuitBreakerManager(None, CircuitBreakerConfig(failure_threshold=1,
                                                               recovery_timeout=30))
    t = BreakerTransport(inner, manager=manager, hosts={
        "api.openai.com": ProviderType.OPENAI,
        "*.stt.speech.microsoft.com": ProviderType.AZURE,
        "*.eastus.stt.speech.microsoft.com": "azure_eastus",
        "API.Deepgram.com.": "deepgram",
        "[::1]": "local6",
    })
    assert {str(p) for p in manager.providers} == {"openai", "azure", "azure_eastus",
                                                    "deepgram", "local6"}

    def name(url: str) -> str | None:
        br = t.breaker_for(httpx.Request("GET", url))
        return br.name if br is not None else None

    assert name("https://api.openai.com/v1/audio") == "provider_openai"
    assert name("https://API.OPENAI.COM./v1") == "provider_openai"
    assert name("https://westeurope.stt.speech.microsoft.com/x") == "provider_azure"
    assert name("https://a.eastus.stt.speech.microsoft.com/x") == "provider_azure_eastus"
    assert name("https://stt.speech.microsoft.com/x") is None  # *. needs a subdomain
    assert name("https://api.deepgram.com/v1/listen") == "provider_deepgram"
    assert name("http://[::1]:8080/") == "provider_local6"
    assert name("https://oauth2.googleapis.com/token") is None

    with httpx.Client(transport=t) as c:
        assert c.get("https://api.openai.com/").status_code == 503
        with pytest.raises(CircuitOpenError):
            c.get("https://api.openai.com/")
        for _ in range(3):  # unknown hosts pass through unguarded
            assert c.get("https://example.com/").status_code == 503

    for bad in ("api.openai.com:443", "https://api.openai.com", "", "*.", "user@host"):
        with pytest.raises(ValueError):
            BreakerTransport(inner, manager=manager, hosts={bad: "openai"})
    b = CircuitBreaker("provider_z")
    for kw in ({}, {"breaker": b, "manager": manager}, {"manager": manager},
               {"manager": manager, "provider": "a", "hosts": {"a.com": "a"}},
               {"breaker": b, "provider": "a"}, {"breaker": AsyncCircuitBreaker("a")},
               {"manager": AsyncCircuitBreakerManager()}):
        with pytest.raises(TypeError):
            BreakerTransport(inner, **kw)
    with pytest.raises(TypeError):
        AsyncBreakerTransport(breaker=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BreakerTransport(inner, manager=manager, provider="")


def test_host_routing_on_a_real_server_guards_two_hosts_with_two_breakers(
    upstream: Upstream, redis_client: redis.Redis
) -> None:
    manager = CircuitBreakerManager(redis_client, CFG)
    hosts = {"127.0.0.1": ProviderType.OPENAI, "localhost": ProviderType.DEEPGRAM}
    with httpx.Client(transport=BreakerTransport(manager=manager, hosts=hosts)) as c:
        upstream.mode = "503"
        for _ in range(3):
            assert c.get(upstream.url("127.0.0.1")).status_code == 503
        assert manager.get_breaker("openai").get_state() is CircuitState.OPEN
        before = upstream.sent()
        with pytest.raises(CircuitOpenError) as ei:
            c.get(upstream.url("127.0.0.1"))
        assert ei.value.name == "provider_openai"
        assert upstream.sent() == before
        upstream.mode = "ok"
        assert c.get(upstream.url("localhost")).status_code == 200  # its own breaker
        assert upstream.sent()[1] == before[1] + 1
        assert upstream.hosts[-1] == f"localhost:{upstream.port}"
        assert manager.get_breaker("deepgram").get_state() is CircuitState.CLOSED
        assert manager.get_all_available_providers() == [ProviderType.DEEPGRAM]
    # Only 127.0.0.1 mapped: localhost is not guarded, whatever openai's state.
    only = BreakerTransport(manager=manager, hosts={"127.0.0.1": ProviderType.OPENAI})
    with httpx.Client(transport=only) as c:
        assert c.get(upstream.url("localhost")).status_code == 200
        with pytest.raises(CircuitOpenError):
            c.get(upstream.url("127.0.0.1"))
    manager.close()


# -- asyncio -------------------------------------------------------------------------------


async def test_async_client_trips_rejects_recovers_and_honours_retry_after(
    upstream: Upstream, redis_client: redis.Redis
) -> None:
    ar = aioredis.Redis(port=_port(redis_client))
    cfg = CircuitBreakerConfig(failure_threshold=3, recovery_timeout=0.3, success_threshold=1)
    b = AsyncProviderCircuitBreaker(ProviderType.GOOGLE, cfg, redis=ar)
    transport = AsyncBreakerTransport(breaker=b)
    async with httpx.AsyncClient(transport=transport, base_url=upstream.url(),
                                 timeout=0.3) as c:
        assert (await c.get("/")).status_code == 200
        upstream.mode = "503"
        for _ in range(3):
            assert (await c.get("/")).status_code == 503
        assert b.get_state() is CircuitState.OPEN
        before = upstream.sent()
        for _ in range(3):
            with pytest.raises(CircuitOpenError) as ei:
                await c.get("/")
        assert upstream.sent() == before
        upstream.mode = "ok"
        assert ei.value.retry_after is not None
        await asyncio.sleep(ei.value.retry_after + 0.1)
        assert (await c.get("/")).status_code == 200  # probe, closes
        assert b.get_state() is CircuitState.CLOSED

        # Transport errors are failures and re-raised; the 429's Retry-After (2 s, where
        # recovery_timeout is 0.3 s) decides how long the trip lasts.
        with pytest.raises(httpx.ConnectError):
            await c.get(f"http://127.0.0.1:{free_port()}/")
        upstream.mode, upstream.delay = "delay", 2.0
        with pytest.raises(httpx.ReadTimeout):
            await c.get("/")
        upstream.mode, upstream.retry_after = "429", "2"
        assert (await c.get("/")).status_code == 429
        t0 = time.monotonic()
        assert b.get_state() is CircuitState.OPEN
        upstream.mode = "ok"
        await asyncio.sleep(t0 + 1.5 - time.monotonic())
        before = upstream.sent()
        with pytest.raises(CircuitOpenError):
            await c.get("/")
        assert upstream.sent() == before
        await asyncio.sleep(t0 + 2.2 - time.monotonic())
        assert (await c.get("/")).status_code == 200
        assert b.get_state() is CircuitState.CLOSED
    m = await b.get_metrics()
    assert (m.failed_calls, m.rejected_calls, m.probes) == (6, 4, 2)
    await b.close()
    await ar.aclose()


async def test_async_transport_with_a_sync_manager_keeps_redis_off_the_loop(
    upstream: Upstream, redis_client: redis.Redis
) -> None:
    manager = CircuitBreakerManager(redis_client, CFG)
    hosts = {"127.0.0.1": ProviderType.OPENAI, "localhost": ProviderType.DEEPGRAM}
    transport = AsyncBreakerTransport(manager=manager, hosts=hosts)
    loop_thread = threading.get_ident()
    ran_on: list[int] = []
    for p in hosts.values():
        br = manager.get_breaker(p)
        orig = br._engine.run

        def spy(call: Any, _orig: Any = orig) -> Any:
            ran_on.append(threading.get_ident())
            return _orig(call)

        br._engine.run = spy  # type: ignore[method-assign]
    async with httpx.AsyncClient(transport=transport) as c:
        assert (await c.get(upstream.url("127.0.0.1"))).status_code == 200
        upstream.mode = "503"
        for _ in range(3):
            assert (await c.get(upstream.url("127.0.0.1"))).status_code == 503
        before = upstream.sent()
        with pytest.raises(CircuitOpenError):
            await c.get(upstream.url("127.0.0.1"))
        assert upstream.sent() == before
        upstream.mode = "ok"
        assert (await c.get(upstream.url("localhost"))).status_code == 200
    assert len(ran_on) >= 5 and loop_thread not in ran_on
    assert manager.get_breaker("openai").get_state() is CircuitState.OPEN
    assert manager.get_breaker("deepgram").get_state() is CircuitState.CLOSED
    manager.close()


async def test_cancelled_threaded_admission_gives_the_probe_back(
    upstream: Upstream, redis_client: redis.Redis
) -> None:
    cfg = CircuitBreakerConfig(failure_threshold=1, recovery_timeout=0.2, success_threshold=1,
                               half_open_max_calls=1, probe_lease=30)
    b = ProviderCircuitBreaker("yandex", cfg, redis=redis_client)
    async with httpx.AsyncClient(transport=AsyncBreakerTransport(breaker=b),
                                 base_url=upstream.url()) as c:
        upstream.mode = "503"
        assert (await c.get("/")).status_code == 503
        upstream.mode = "ok"
        await asyncio.sleep(0.3)
        orig = b._engine.admit

        def slow_admit() -> Permit:
            time.sleep(0.3)  # the probe lease is taken after the request was cancelled
            return orig()

        b._engine.admit = slow_admit  # type: ignore[method-assign]
        task = asyncio.create_task(c.get("/"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        b._engine.admit = orig  # type: ignore[method-assign]
        await asyncio.sleep(0.5)
        m = b.get_metrics()
        assert m.fleet is not None and m.fleet.active_probes == 0  # not held for 30 s
        assert (await c.get("/")).status_code == 200
        assert b.get_state() is CircuitState.CLOSED
    b.close()


@pytest.mark.parametrize("kind", ["async manager", "sync manager"])
async def test_async_transport_with_managers_on_the_in_process_store(kind: str) -> None:
    status = 503

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=b"chunk" * 100)

    cfg = CircuitBreakerConfig(failure_threshold=2, recovery_timeout=0.1, success_threshold=1)
    manager: AsyncCircuitBreakerManager | CircuitBreakerManager = (
        AsyncCircuitBreakerManager(None, cfg) if kind == "async manager"
        else CircuitBreakerManager(None, cfg))
    transport = AsyncBreakerTransport(httpx.MockTransport(handler), manager=manager,
                                      hosts={"*.deepgram.com": ProviderType.DEEPGRAM})
    b = manager.get_breaker(ProviderType.DEEPGRAM)
    async with httpx.AsyncClient(transport=transport) as c:
        for _ in range(2):
            assert (await c.get("https://api.deepgram.com/v1/listen")).status_code == 503
        with pytest.raises(CircuitOpenError):
            await c.get("https://api.deepgram.com/v1/listen")
        assert (await c.get("https://example.com/")).status_code == 503  # unguarded
        status = 200
        await asyncio.sleep(0.15)
        async with c.stream("GET", "https://api.deepgram.com/v1/speak") as r:
            assert r.status_code == 200
            assert b.get_state() is CircuitState.CLOSED  # decided at the headers
            assert len(await r.aread()) == 500
    m = await b.get_metrics() if isinstance(b, AsyncCircuitBreaker) else b.get_metrics()
    assert (m.total_calls, m.failed_calls, m.successful_calls, m.rejected_calls) == (3, 2, 1, 1)


# -- wrapping a vendor SDK client ----------------------------------------------------------


class VendorConnectionError(Exception):
    """What an SDK raises for anything its httpx client raised (cf. openai's
    APIConnectionError)."""


class VendorStatusError(Exception):
    pass


class FakeVendorSDK:
    """The shape of a vendor SDK: takes an ``http_client``, wraps its exceptions."""

    def __init__(self, *, base_url: str, http_client: httpx.Client) -> None:
        self._base_url = base_url
        self._http = http_client

    def transcribe(self, audio: bytes) -> str:
        try:
            r = self._http.post(f"{self._base_url}/v1/audio/transcriptions", content=audio)
        except Exception as err:
            raise VendorConnectionError("Connection error.") from err
        if r.status_code >= 400:
            raise VendorStatusError(r.status_code)
        return str(r.json()["text"])


def test_readme_example_wrapping_a_vendor_sdk(upstream: Upstream,
                                              redis_client: redis.Redis) -> None:
    manager = CircuitBreakerManager(redis_client, CFG)
    sdk = FakeVendorSDK(
        base_url=upstream.url(),
        http_client=httpx.Client(
            transport=BreakerTransport(manager=manager, provider=ProviderType.OPENAI)),
    )
    assert sdk.transcribe(b"...").startswith("hello")
    upstream.mode = "503"
    for _ in range(3):
        with pytest.raises(VendorStatusError):
            sdk.transcribe(b"...")
    before = upstream.sent()
    with pytest.raises(VendorConnectionError) as ei:
        sdk.transcribe(b"...")
    assert upstream.sent() == before
    err = circuit_open_error(ei.value)
    assert err is not None and err.name == "provider_openai"
    assert circuit_open_error(VendorStatusError(503)) is None
    assert not manager.get_breaker(ProviderType.OPENAI).is_available()
    sdk._http.close()
    manager.close()


# -- Retry-After parsing ----------------------------------------------------------------


def test_retry_after_seconds() -> None:
    def ra(value: str, **headers: str) -> float | None:
        return retry_after_seconds(httpx.Response(429, headers={"Retry-After": value,
                                                                **headers}))

    assert ra("3") == 3.0 and ra(" 1.5 ") == 1.5
    for bad in ("0", "-1", "soon", "inf", "nan", ""):
        assert ra(bad) is None
    assert retry_after_seconds(httpx.Response(429)) is None
    # an HTTP date counts from the response's own Date (the vendor's clock)
    assert ra("Wed, 21 Oct 2015 07:28:05 GMT", Date="Wed, 21 Oct 2015 07:28:00 GMT") == 5.0
    assert ra("Wed, 21 Oct 2015 07:27:00 GMT", Date="Wed, 21 Oct 2015 07:28:00 GMT") is None
    # without Date, from the local clock
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=10), usegmt=True)
    v = ra(later)
    assert v is not None and 8 < v <= 10
