"""A voice worker: an asyncio HTTP endpoint that runs speech-to-text then text-to-speech
through shared breakers, falling back to the next provider when one is out.

    DISTBREAKER_REDIS_URL=redis://localhost:6379/0 python examples/voice_worker.py --port 8080
    curl -s -XPOST localhost:8080/voice -d 'hello'        # {"text": ..., "stt": ..., "tts": ...}
    curl -s localhost:8080/health                           # the manager's system health

Providers are reached over HTTP at PROVIDER_URL (``POST {PROVIDER_URL}/{provider}/{stt|tts}``;
the provider simulator of docker-compose.yml answers there). Without PROVIDER_URL they are
simulated in process, and ``FAIL_PROVIDERS=openai,google`` makes those fail.
``DISTBREAKER_REDIS_CLUSTER=1`` connects to DISTBREAKER_REDIS_URL as a Redis Cluster.
Standard library only, besides distbreaker and redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from distbreaker import (
    AllProvidersUnavailableError,
    AsyncCircuitBreakerManager,
    CircuitBreakerConfig,
    ProviderType,
)

log = logging.getLogger("voice_worker")

STT_ORDER = [ProviderType.OPENAI, ProviderType.DEEPGRAM, ProviderType.GOOGLE]
TTS_ORDER = [ProviderType.ELEVENLABS, ProviderType.AZURE, ProviderType.GOOGLE]
CONFIG = CircuitBreakerConfig(
    failure_threshold=5, recovery_timeout=5.0, success_threshold=2, half_open_max_calls=2,
    failure_rate_threshold=0.5, minimum_calls=20, window_size=30, timeout_duration=2.0,
)


class ProviderFailed(Exception):
    def __init__(self, status: int, retry_after: float | None = None) -> None:
        super().__init__(f"provider answered HTTP {status}")
        self.retry_after = retry_after  # a 429's Retry-After sets the open period


async def http_post(url: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """A minimal HTTP/1.0 POST (enough for the provider simulator)."""
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port or 80)
    try:
        writer.write(f"POST {u.path or '/'} HTTP/1.0\r\nHost: {u.hostname}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, payload


class Providers:
    def __init__(self, base_url: str | None, failing: set[str]) -> None:
        self.base_url = base_url.rstrip("/") if base_url else None
        self.failing = failing

    async def call(self, provider: Any, kind: str, data: bytes) -> str:
        name = str(provider)
        if self.base_url is None:
            await asyncio.sleep(random.uniform(0.005, 0.02))
            if name in self.failing:
                raise ProviderFailed(503)
            return f"{kind}:{name}:{len(data)}"
        status, headers, body = await http_post(f"{self.base_url}/{name}/{kind}", data)
        if status == 429 or status >= 500:
            ra = headers.get("retry-after")
            raise ProviderFailed(status, float(ra) if ra else None)
        return body.decode()


class Worker:
    def __init__(self, manager: AsyncCircuitBreakerManager, providers: Providers) -> None:
        self.m = manager
        self.p = providers
        self.served = self.failed = 0

    async def voice(self, audio: bytes) -> dict[str, Any]:
        text = await self.m.call_with_fallback(
            STT_ORDER, lambda p: self.p.call(p, "stt", audio))
        speech = await self.m.call_with_fallback(
            TTS_ORDER, lambda p: self.p.call(p, "tts", text.encode()))
        return {"text": text, "speech": speech}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *hdrs = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            length = 0
            for h in hdrs:
                k, _, v = h.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            body = await reader.readexactly(length) if length else b""
            if method == "POST" and path == "/voice":
                try:
                    result = await self.voice(body)
                    self.served += 1
                    await respond(writer, 200, result)
                except AllProvidersUnavailableError as e:
                    self.failed += 1
                    await respond(writer, 503, {"error": str(e)})
            elif path == "/health":
                h = await self.m.get_system_health()
                h["worker"] = {"pid": os.getpid(), "served": self.served, "failed": self.failed}
                await respond(writer, 200 if h["status"] != "critical" else 503, h)
            else:
                await respond(writer, 404, {"error": "not found"})
        except (asyncio.IncompleteReadError, ValueError, ConnectionError):
            pass
        finally:
            writer.close()


async def respond(writer: asyncio.StreamWriter, status: int, obj: Any) -> None:
    body = json.dumps(obj).encode()
    writer.write(f"HTTP/1.0 {status} X\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    url = os.environ.get("DISTBREAKER_REDIS_URL")
    client: Any = None
    if url and os.environ.get("DISTBREAKER_REDIS_CLUSTER") == "1":
        from redis.asyncio.cluster import RedisCluster

        client = RedisCluster.from_url(url)
        await client.initialize()  # learn the slots before the breakers subscribe
    elif url:
        client = aioredis.Redis.from_url(url)
    if client is None:
        log.warning("DISTBREAKER_REDIS_URL not set: breakers are local to this process")
    manager = AsyncCircuitBreakerManager(
        client, CONFIG,
        on_state_change=lambda n, a, b: log.warning("breaker %s: %s -> %s", n, a, b))
    for p in dict.fromkeys(STT_ORDER + TTS_ORDER):
        manager.register_provider(p)
    failing = {s for s in os.environ.get("FAIL_PROVIDERS", "").split(",") if s}
    worker = Worker(manager, Providers(os.environ.get("PROVIDER_URL"), failing))
    server = await asyncio.start_server(worker.handle, args.host, args.port)
    log.info("voice worker listening on %s:%s", args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    await manager.close()
    if client is not None:
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
