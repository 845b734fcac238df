"""A worker for the fault tests: calls a guarded function at a steady rate and reports.

Usage: python tests/support/fault_worker.py '<json spec>'. It waits on BLPOP <ns>:go (through a
connection with a long timeout) for the start time, then calls `breaker.call(backend)`
every 1/rate s until start + duration. The backend fails while `fail_window` (seconds
after start) holds. Printed at the end, one JSON line: every exception that was not
CircuitOpenError or the backend's own, the largest overhead of a guarded call over the
backend itself, when the breaker rejected calls, and when is_available() changed.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import redis

from distbreaker import CircuitBreaker, CircuitBreakerConfig, CircuitOpenError


class BackendDown(Exception):
    pass


def main() -> int:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    control = redis.Redis.from_url(spec["control_url"], socket_timeout=60)
    cfg = CircuitBreakerConfig(**spec["config"])
    b = CircuitBreaker(spec["name"], cfg, redis=redis.Redis.from_url(spec["url"]))
    control.rpush(f"{spec['ns']}:ready", 1)
    item = control.blpop([f"{spec['ns']}:go"], timeout=60)
    assert item is not None
    start = float(item[1])
    fail_from, fail_to = spec["fail_window"]
    period = 1.0 / spec["rate"]
    unexpected: list[str] = []
    max_overhead = 0.0
    worst_at = 0.0
    rejected_at: list[float] = []
    avail: list[tuple[float, bool]] = []
    last_avail = None
    calls = 0
    nxt = start
    while True:
        now = time.monotonic()
        if now >= start + spec["duration"]:
            break
        a = b.is_available()
        if a != last_avail:
            avail.append((round(now - start, 4), a))
            last_avail = a
        spent = [0.0]

        def backend(spent: list[float] = spent) -> int:
            t0 = time.perf_counter()
            try:
                t = time.monotonic() - start
                if fail_from <= t < fail_to:
                    raise BackendDown
                return 1
            finally:
                spent[0] = time.perf_counter() - t0

        t0 = time.perf_counter()
        try:
            b.call(backend)
        except CircuitOpenError:
            rejected_at.append(round(now - start, 3))
        except BackendDown:
            pass
        except BaseException as e:  # anything else reached the caller: a bug
            unexpected.append(f"{type(e).__module__}.{type(e).__name__}: {e}")
        overhead = time.perf_counter() - t0 - spent[0]
        calls += 1
        if overhead > max_overhead:
            max_overhead, worst_at = overhead, now - start
        nxt += period
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(json.dumps({
        "unexpected": unexpected[:20], "unexpected_count": len(unexpected),
        "max_overhead_s": max_overhead, "worst_at": round(worst_at, 3), "calls": calls,
        "rejected_at": rejected_at, "avail": avail,
        "degraded_at_end": b.store_degraded,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
