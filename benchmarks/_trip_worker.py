"""One worker of the trip-propagation benchmark (started by bench_fastpath.py).

It builds a `CircuitBreaker` on its own sync client and then obeys its parent, one line at
a time on stdin; it answers one line at a time on stdout:

    go <mode>   wait (sleep-polling, bounded) until the breaker is available again, answer
                ``spinning``, then poll ``is_available()`` until it turns False and answer
                ``seen <monotonic> <iterations>`` (or ``timeout <iterations>``).
                mode ``spin``: a tight loop, nothing else (the measured case);
                mode ``yield``: ``time.sleep(0)`` between polls (diagnostic: frees the GIL).
    quit        close the breaker and exit.

`time.monotonic()` is CLOCK_MONOTONIC on Linux, shared by every process of the machine, so
the parent can subtract its own trip time from the time reported here.
"""

from __future__ import annotations

import argparse
import sys
import time

import redis

from distbreaker import CircuitBreaker, CircuitBreakerConfig

SPIN_TIMEOUT_S = 5.0
REARM_TIMEOUT_S = 5.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--switch-interval", type=float, default=None)
    a = ap.parse_args()
    if a.switch_interval:
        sys.setswitchinterval(a.switch_interval)

    kw = dict(failure_threshold=1, recovery_timeout=600.0, max_recovery_timeout=600.0,
              max_staleness=60.0, redis_timeout=2.0)
    try:
        cfg = CircuitBreakerConfig(**kw)
    except TypeError:  # an older distbreaker without redis_timeout
        del kw["redis_timeout"]
        cfg = CircuitBreakerConfig(**kw)
    client = redis.Redis(host="127.0.0.1", port=a.port)
    breaker = CircuitBreaker(a.name, cfg, redis=client)
    avail = breaker.is_available
    mono = time.monotonic
    sleep = time.sleep
    out = sys.stdout

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    say(f"hello {breaker.get_state().value}")
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            break
        if cmd[0] != "go":
            say(f"error unknown command {line.strip()!r}")
            continue
        mode = cmd[1] if len(cmd) > 1 else "spin"
        deadline = mono() + REARM_TIMEOUT_S
        while not avail() and mono() < deadline:
            sleep(0.001)
        if not avail():
            say("error not available before the round")
            continue
        say("spinning")
        n = 0
        deadline = mono() + SPIN_TIMEOUT_S
        if mode == "yield":
            while avail():
                n += 1
                sleep(0)
                if not n & 0xFFF and mono() > deadline:
                    break
        else:
            while avail():
                n += 1
                if not n & 0xFFFF and mono() > deadline:
                    break
        t = mono()
        if avail():
            say(f"timeout {n}")
        else:
            say(f"seen {t!r} {n}")
    breaker.close()  # the client is left to the exit: its listener thread is still on it
    return 0


if __name__ == "__main__":
    sys.exit(main())
