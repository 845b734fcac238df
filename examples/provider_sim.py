"""A simulator of STT/TTS vendors for the voice workers, with outages you switch over HTTP.

    python examples/provider_sim.py --port 8090
    curl -s -XPOST localhost:8090/openai/stt -d 'hello'         # 200 stt:openai:5
    curl -s -XPOST 'localhost:8090/admin/outage/openai?mode=503'  # openai answers 503 now
    curl -s -XPOST 'localhost:8090/admin/outage/openai?mode=429&retry_after=3'
    curl -s -XPOST 'localhost:8090/admin/outage/openai?mode=timeout'  # hangs (--hang s)
    curl -s -XPOST 'localhost:8090/admin/outage/openai?mode=503&rate=0.3'  # 30% fail
    curl -s -XDELETE localhost:8090/admin/outage/openai           # openai is back
    curl -s localhost:8090/admin/status      # outages and request counts per provider

``POST /{provider}/{stt|tts}`` answers ``{kind}:{provider}:{bytes received}`` after a small
random latency, as the in-process simulation of examples/voice_worker.py does. Every
response closes its connection (HTTP/1.0). Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("provider_sim")

KINDS = ("stt", "tts")
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}


class Simulator:
    def __init__(self, min_latency: float, max_latency: float, hang: float) -> None:
        self.min_latency = min_latency
        self.max_latency = max(max_latency, min_latency)
        self.hang = hang
        self.outages: dict[str, dict[str, Any]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.started = time.time()

    def _count(self, provider: str) -> dict[str, int]:
        return self.counts.setdefault(provider, dict.fromkeys(
            ("requests", "stt", "tts", "ok", "failed", "timeouts"), 0))

    def status(self) -> dict[str, Any]:
        return {"outages": self.outages, "requests": self.counts,
                "total": sum(c["requests"] for c in self.counts.values()),
                "uptime_s": round(time.time() - self.started, 3)}

    def set_outage(self, provider: str, query: dict[str, list[str]]) -> dict[str, Any]:
        mode = query.get("mode", ["503"])[0]
        if mode != "timeout" and not (mode.isdigit() and 400 <= int(mode) <= 599):
            raise ValueError("mode must be an HTTP status 400-599 or 'timeout'")
        rate = float(query.get("rate", ["1"])[0])
        if not 0.0 < rate <= 1.0:
            raise ValueError("rate must be in (0, 1]")
        outage: dict[str, Any] = {"mode": mode, "rate": rate, "since": time.time()}
        if "retry_after" in query:
            outage["retry_after"] = float(query["retry_after"][0])
        self.outages[provider] = outage
        log.warning("outage of %s on: %s", provider, outage)
        return outage

    async def vendor(self, provider: str, kind: str,
                     body: bytes) -> tuple[int, dict[str, str], bytes]:
        c = self._count(provider)
        c["requests"] += 1
        c[kind] += 1
        outage = self.outages.get(provider)
        await asyncio.sleep(random.uniform(self.min_latency, self.max_latency))
        if outage is not None and random.random() < outage["rate"]:
            if outage["mode"] == "timeout":
                c["timeouts"] += 1
                await asyncio.sleep(self.hang)  # the caller gives up long before
                return 504, {}, b"upstream timeout\n"
            c["failed"] += 1
            headers = {}
            if "retry_after" in outage:
                headers["Retry-After"] = f"{outage['retry_after']:g}"
            return int(outage["mode"]), headers, f"{provider} is down\n".encode()
        c["ok"] += 1
        return 200, {}, f"{kind}:{provider}:{len(body)}".encode()

    async def route(self, method: str, target: str,
                    body: bytes) -> tuple[int, dict[str, str], bytes]:
        u = urlsplit(target)
        parts = [p for p in u.path.split("/") if p]
        query = parse_qs(u.query)
        if parts[:2] == ["admin", "status"] and len(parts) == 2 and method == "GET":
            return _json(200, self.status())
        if parts[:2] == ["admin", "outage"] and len(parts) <= 3:
            if len(parts) == 3 and not NAME.match(parts[2]):
                return _json(400, {"error": "bad provider name"})
            if method == "POST" and len(parts) == 3:
                try:
                    outage = self.set_outage(parts[2], query)
                except ValueError as e:
                    return _json(400, {"error": str(e)})
                return _json(200, {"provider": parts[2], "outage": outage})
            if method == "DELETE":
                names = [parts[2]] if len(parts) == 3 else list(self.outages)
                cleared = [n for n in names if self.outages.pop(n, None) is not None]
                if cleared:
                    log.warning("outage of %s off", ", ".join(cleared))
                return _json(200, {"cleared": cleared})
            return _json(405, {"error": "POST /admin/outage/{provider} or DELETE"})
        if parts == ["health"] and method == "GET":
            return _json(200, {"ok": True})
        if len(parts) == 2 and parts[1] in KINDS and NAME.match(parts[0]):
            if method != "POST":
                return _json(405, {"error": "POST only"})
            return await self.vendor(parts[0], parts[1], body)
        return _json(404, {"error": "not found"})

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            request_line, *hdrs = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            length = 0
            for h in hdrs:
                k, _, v = h.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            if not 0 <= length <= 1 << 20:
                raise ValueError("bad Content-Length")
            body = await reader.readexactly(length) if length else b""
            status, headers, payload = await self.route(method.upper(), target, body)
            head_out = [f"HTTP/1.0 {status} {REASONS.get(status, 'Error')}",
                        f"Content-Length: {len(payload)}", "Connection: close"]
            head_out += [f"{k}: {v}" for k, v in headers.items()]
            writer.write(("\r\n".join(head_out) + "\r\n\r\n").encode() + payload)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ValueError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _json(status: int, obj: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, (json.dumps(obj) + "\n").encode()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8090")))
    ap.add_argument("--min-latency", type=float, default=0.005, help="seconds (default 0.005)")
    ap.add_argument("--max-latency", type=float, default=0.03, help="seconds (default 0.03)")
    ap.add_argument("--hang", type=float, default=30.0,
                    help="seconds a request hangs in mode=timeout (default 30)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sim = Simulator(args.min_latency, args.max_latency, args.hang)
    server = await asyncio.start_server(sim.handle, args.host, args.port, backlog=1024)
    log.info("provider simulator listening on %s:%s", args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()  # hanging requests (mode=timeout) are cancelled on the way out


if __name__ == "__main__":
    asyncio.run(main())
