"""Four worker processes share one breaker through Redis; the backend fails for a while.

Uses DISTBREAKER_REDIS_URL if set, else a private redis-server on a free port if one is on
PATH (stopped at the end), else the in-process store (one process, shared by threads).
Run: python examples/quickstart.py
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from distbreaker import CircuitBreaker, CircuitBreakerConfig, CircuitOpenError, MemoryStore

CONFIG = CircuitBreakerConfig(failure_threshold=5, recovery_timeout=1.0, success_threshold=2,
                              half_open_max_calls=1, max_staleness=1.0)
OUTAGE = (1.0, 3.0)  # seconds after start during which the backend fails
RUN_FOR = 6.0


def backend(started: float) -> str:
    t = time.monotonic() - started
    if OUTAGE[0] <= t < OUTAGE[1]:
        raise ConnectionError("vendor down")
    time.sleep(0.002)
    return "ok"


def worker(wid: int, redis_arg: Any, started: float, out: Any) -> None:
    if isinstance(redis_arg, str):
        import redis

        redis_arg = redis.Redis.from_url(redis_arg)

    def changed(name: str, old: Any, new: Any) -> None:
        out.put(f"{time.monotonic() - started:5.2f}s worker {wid}: {name} {old} -> {new}")

    b = CircuitBreaker("quickstart_vendor", CONFIG, redis=redis_arg, on_state_change=changed)
    counts = {"ok": 0, "failed": 0, "rejected": 0}
    while time.monotonic() - started < RUN_FOR:
        try:
            b.call(backend, started)
            counts["ok"] += 1
        except CircuitOpenError:
            counts["rejected"] += 1
            time.sleep(0.01)
        except ConnectionError:
            counts["failed"] += 1
    out.put(f"worker {wid}: {counts}")
    b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    url = os.environ.get("DISTBREAKER_REDIS_URL")
    server = None
    tmp = tempfile.mkdtemp(prefix="distbreaker-quickstart-")
    if url is None and shutil.which("redis-server"):
        port = free_port()
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        import redis

        for _ in range(200):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
    try:
        started = time.monotonic()
        if url is not None:
            print(f"4 worker processes on {url}; backend down from {OUTAGE[0]}s to {OUTAGE[1]}s")
            ctx = mp.get_context("spawn")
            q: Any = ctx.Queue()
            procs = [ctx.Process(target=worker, args=(i, url, started, q)) for i in range(4)]
        else:
            print("no redis-server on PATH: 4 threads on the in-process store")
            import queue

            q = queue.Queue()
            store = MemoryStore()
            procs = [threading.Thread(target=worker, args=(i, store, started, q))
                     for i in range(4)]
        for p in procs:
            p.start()
        done = 0
        while done < len(procs):
            line = q.get(timeout=RUN_FOR + 30)
            print(line)
            done += line.startswith("worker")
        for p in procs:
            p.join()
        if url is not None:
            import redis

            h = redis.Redis.from_url(url, decode_responses=True).hgetall(
                "distbreaker:v1:{quickstart_vendor}")
            print("redis-cli HGETALL 'distbreaker:v1:{quickstart_vendor}':", h)
    finally:
        if server is not None:
            server.terminate()
            server.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
