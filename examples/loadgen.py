"""A load generator that plays the load balancer in front of the voice workers.

    TARGETS=http://worker:8080 RATE=50 DURATION=0 python examples/loadgen.py
    python examples/loadgen.py --targets http://127.0.0.1:8080,http://127.0.0.1:8081 \\
        --rate 20 --duration 30

Sends ``POST /voice`` at a fixed rate (open loop, at most ``--concurrency`` requests in
flight), round-robin over every target address. A target whose hostname resolves to several
addresses (docker compose's DNS answers with every replica of a scaled service) counts as
all of them; names are resolved again every ``--resolve-every`` seconds, so scaling up or
down is picked up (IPv4 addresses are preferred when a name has both). Prints one JSON line
per second and a JSON summary at the end (after ``--duration`` seconds, or on SIGTERM or
Ctrl-C); always exits 0. Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Address:
    base: str  # the target as given, e.g. http://worker:8080
    host: str  # the name, for the Host header
    ip: str
    port: int


@dataclass
class Target:
    base: str
    host: str
    port: int
    addresses: list[Address] = field(default_factory=list)


def parse_targets(spec: str) -> list[Target]:
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        u = urlsplit(item if "://" in item else f"http://{item}")
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"target {item!r}: expected http://host[:port]")
        out.append(Target(item.rstrip("/"), u.hostname, u.port or 80))
    if not out:
        raise ValueError("no targets (use --targets or TARGETS)")
    return out


def pick_addresses(infos: list[tuple[Any, ...]]) -> list[str]:
    """Distinct addresses from getaddrinfo results, in order; IPv4 only when there is any."""
    seen: dict[str, int] = {}
    for family, _type, _proto, _canon, sockaddr in infos:
        seen.setdefault(str(sockaddr[0]), family)
    v4 = [a for a, f in seen.items() if f == socket.AF_INET]
    return v4 or list(seen)


async def resolve(t: Target) -> list[Address]:
    """Every address of `t` (a literal IP is itself). On a DNS error the addresses found
    before are kept; with none, the name itself is used (and connecting to it fails)."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(t.host)
        return [Address(t.base, t.host, t.host, t.port)]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            t.host, t.port, type=socket.SOCK_STREAM)
    except OSError:
        infos = []
    found = [Address(t.base, t.host, ip, t.port) for ip in pick_addresses(infos)]
    return found or t.addresses or [Address(t.base, t.host, t.host, t.port)]


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return round(sorted_values[i] * 1000, 1)


@dataclass
class Stats:
    requests: int = 0
    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    status: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    stt: Counter[str] = field(default_factory=Counter)
    tts: Counter[str] = field(default_factory=Counter)

    def add(self, ok: bool, latency: float, status: str, result: dict[str, Any] | None,
            error: str | None) -> None:
        self.requests += 1
        self.ok += int(ok)
        self.failed += int(not ok)
        self.latencies.append(latency)
        self.status[status] += 1
        if error:
            self.errors[error] += 1
        if result:
            for key, counter in (("text", self.stt), ("speech", self.tts)):
                parts = str(result.get(key, "")).split(":")
                if len(parts) >= 2:
                    counter[parts[1]] += 1

    def report(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        d: dict[str, Any] = {"requests": self.requests, "ok": self.ok, "failed": self.failed,
                             "p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99),
                             "stt": dict(self.stt), "tts": dict(self.tts)}
        if self.errors:
            d["errors"] = dict(self.errors)
        return d


async def post_voice(addr: Address, body: bytes, timeout: float) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(addr.ip, addr.port)
        try:
            writer.write(f"POST /voice HTTP/1.0\r\nHost: {addr.host}:{addr.port}\r\n"
                         f"Content-Type: application/octet-stream\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        return int(head.split(b"\r\n", 1)[0].split()[1]), payload

    return await asyncio.wait_for(go(), timeout)


class LoadGen:
    def __init__(self, targets: list[Target], rate: float, duration: float, concurrency: int,
                 timeout: float, resolve_every: float, body: bytes) -> None:
        self.targets = targets
        self.rate = rate
        self.duration = duration
        self.concurrency = concurrency
        self.timeout = timeout
        self.resolve_every = resolve_every
        self.body = body
        self.window = Stats()
        self.total = Stats()
        self.per_address: Counter[str] = Counter()
        self.stop = asyncio.Event()
        self.rr = 0

    def addresses(self) -> list[Address]:
        return [a for t in self.targets for a in t.addresses]

    async def refresh_addresses(self) -> None:
        for t in self.targets:
            t.addresses = await resolve(t)

    async def one(self, addr: Address) -> None:
        t0 = time.perf_counter()
        ok, status, result, error = False, "error", None, None
        try:
            code, payload = await post_voice(addr, self.body, self.timeout)
            status = str(code)
            ok = code == 200
            if ok:
                result = json.loads(payload)
            else:
                error = f"http_{code}"
        except asyncio.TimeoutError:
            error = "timeout"
        except (OSError, ValueError, IndexError) as e:
            error = type(e).__name__
        latency = time.perf_counter() - t0
        for s in (self.window, self.total):
            s.add(ok, latency, status, result, error)
        self.per_address[f"{addr.ip}:{addr.port}"] += 1

    async def reporter(self, started: float) -> None:
        tick = 1
        while True:
            await asyncio.sleep(max(0.0, started + tick - time.monotonic()))
            self.emit(tick)
            tick += 1

    def emit(self, t: float) -> None:
        line = {"t": t, **self.window.report(), "targets": len(self.addresses())}
        print(json.dumps(line), flush=True)
        self.window = Stats()

    async def resolver(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_every)
            await self.refresh_addresses()

    async def run(self) -> dict[str, Any]:
        await self.refresh_addresses()
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        background = [loop.create_task(self.reporter(started))]
        if self.resolve_every > 0:
            background.append(loop.create_task(self.resolver()))
        sem = asyncio.Semaphore(self.concurrency)
        inflight: set[asyncio.Task[None]] = set()
        interval = 1.0 / self.rate
        next_t = started
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if self.duration and now - started >= self.duration:
                    break
                if next_t > now:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), next_t - now)
                    continue
                await sem.acquire()
                addrs = self.addresses()
                addr = addrs[self.rr % len(addrs)]
                self.rr += 1
                task = loop.create_task(self.one(addr))
                inflight.add(task)

                def done(t: asyncio.Task[None]) -> None:
                    inflight.discard(t)
                    sem.release()

                task.add_done_callback(done)
                next_t = max(next_t + interval, time.monotonic() - 1.0)  # catch up <= 1 s
            if inflight:
                await asyncio.wait(inflight, timeout=self.timeout)
        finally:
            for task in [*background, *inflight]:
                task.cancel()
        elapsed = time.monotonic() - started
        if self.window.requests:
            self.emit(round(elapsed, 3))
        lat = sorted(self.total.latencies)
        return {"summary": True, **self.total.report(), "duration_s": round(elapsed, 3),
                "rate": round(self.total.requests / elapsed, 2) if elapsed > 0 else 0.0,
                "max_ms": round(lat[-1] * 1000, 1) if lat else None,
                "status": dict(self.total.status), "per_target": dict(self.per_address),
                "targets": [f"{a.ip}:{a.port}" for a in self.addresses()]}


async def main() -> None:
    env = os.environ.get
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=env("TARGETS", "http://127.0.0.1:8080"),
                    help="comma-separated base URLs of the workers (env TARGETS)")
    ap.add_argument("--rate", type=float, default=float(env("RATE", "20")),
                    help="requests per second (env RATE, default 20)")
    ap.add_argument("--duration", type=float, default=float(env("DURATION", "0")),
                    help="seconds to run, 0 = until stopped (env DURATION, default 0)")
    ap.add_argument("--concurrency", type=int, default=int(env("CONCURRENCY", "8")),
                    help="requests in flight at most (env CONCURRENCY, default 8)")
    ap.add_argument("--timeout", type=float, default=float(env("TIMEOUT", "10")),
                    help="seconds before a request counts as failed (env TIMEOUT, default 10)")
    ap.add_argument("--resolve-every", type=float, default=5.0,
                    help="seconds between DNS lookups of the targets (0: once)")
    ap.add_argument("--body", default="hello", help="request body (default 'hello')")
    args = ap.parse_args()
    if args.rate <= 0 or args.concurrency < 1 or args.timeout <= 0 or args.duration < 0:
        ap.error("--rate, --concurrency and --timeout must be positive, --duration >= 0")
    try:
        targets = parse_targets(args.targets)
    except ValueError as e:
        ap.error(str(e))
    gen = LoadGen(targets, args.rate, args.duration, args.concurrency, args.timeout,
                  args.resolve_every, args.body.encode())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, gen.stop.set)
    summary = await gen.run()
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
