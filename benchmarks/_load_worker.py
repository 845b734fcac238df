"""One process of the throughput benchmark (benchmarks/run.py).

    python _load_worker.py PORT NAME MODE SECONDS

Builds a breaker (MODE: strict or batched) on redis at 127.0.0.1:PORT, prints "ready",
waits for a line on stdin, calls a no-op through the breaker for SECONDS, flushes, and
prints "done <calls> <rejected>".
"""

from __future__ import annotations

import sys
import time

import redis

from distbreaker import CircuitBreaker, CircuitBreakerConfig, CircuitOpenError


def main() -> None:
    port, name, mode, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    cfg = CircuitBreakerConfig(consistency=mode, failure_threshold=1_000_000,  # type: ignore[arg-type]
                               minimum_calls=1_000_000, redis_timeout=2.0)
    b = CircuitBreaker(name, cfg, redis=redis.Redis(host="127.0.0.1", port=port))
    print("ready", flush=True)
    sys.stdin.readline()
    calls = rejected = 0
    end = time.monotonic() + seconds
    fn = int
    while time.monotonic() < end:
        for _ in range(50):
            try:
                b.call(fn)
                calls += 1
            except CircuitOpenError:
                rejected += 1
    b.flush(30)
    print(f"done {calls} {rejected} {b.get_metrics().batches}", flush=True)
    b.close()


if __name__ == "__main__":
    main()
