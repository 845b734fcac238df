"""A transition storm: P processes x B breakers each, all B tripped at once in one pipeline.

    python benchmarks/bench_storm.py [--procs 16] [--breakers 200] [--rounds 3] [--json OUT]

Starts its own redis-server on a free loopback port. Each worker process holds B breakers
on one client (one listener) and records, for every breaker, when its listener delivered
the trip (a TransitionEvent from the push). The parent forces all B open with one
pipeline of FCALLs and reports, over P x B deliveries, the time from the pipeline's send
(its bytes written; the commands are encoded before the clock starts) to the delivery
(p50, p99, max; all processes on one host share the wall clock), and the listener CPU
each worker spent on the storm. Target (issue 13): p99 within 50 ms.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CHANNEL = "distbreaker:v1:events"


def _server() -> Any:
    import bench_fastpath  # beside this script

    return bench_fastpath.private_server()


def worker(port: int, breakers: int, rounds: int) -> None:
    """Hold the breakers; print one JSON line per round with the delivery times."""
    import threading

    import redis

    from distbreaker import CircuitBreaker, CircuitBreakerConfig
    from distbreaker.events import TransitionEvent

    r = redis.Redis(port=port)
    cfg = CircuitBreakerConfig(max_staleness=2.0)
    seen: dict[str, float] = {}
    lock = threading.Lock()

    def on(e: Any) -> None:
        if isinstance(e, TransitionEvent) and e.new_state.value == "open":
            with lock:
                seen.setdefault(e.name, time.time())

    fleet = [CircuitBreaker(f"storm-{i}", cfg, redis=r) for i in range(breakers)]
    for b in fleet:
        b.add_listener(on)
    print(json.dumps({"ready": True}), flush=True)
    for _ in range(rounds):
        sys.stdin.readline()  # the parent says: the storm is coming
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        deadline = time.monotonic() + 30
        while len(seen) < breakers and time.monotonic() < deadline:
            time.sleep(0.005)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        with lock:
            out = dict(seen)
            seen.clear()
        cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        print(json.dumps({"seen": out, "cpu_s": cpu}), flush=True)
        sys.stdin.readline()  # reset done: next round
    for b in fleet:
        b.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--breakers", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.breakers, a.rounds)
        return 0
    server = _server()
    try:
        res = storm(server.port, a.procs, a.breakers, a.rounds)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))
    finally:
        server.stop()
    return 0


def storm(port: int, procs_n: int, breakers: int, rounds: int) -> dict[str, Any]:
    """The storm on the redis-server at `port`; prints and returns the figures."""
    import redis

    from distbreaker import CircuitBreakerConfig
    from distbreaker._keys import BreakerKeys
    from distbreaker._protocol import build_call
    from distbreaker.stores._scripts import function_library, function_name

    procs: list[subprocess.Popen[str]] = []
    try:
        r = redis.Redis(port=port)
        r.flushall()
        r.function_load(function_library(), replace=True)
        cfg = CircuitBreakerConfig(max_staleness=2.0)
        keys = [BreakerKeys.for_name(f"storm-{i}") for i in range(breakers)]
        for _ in range(procs_n):
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", str(port), "--breakers",
                 str(breakers), "--rounds", str(rounds)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in procs:
            assert p.stdout is not None
            json.loads(p.stdout.readline())
        while r.pubsub_numsub(CHANNEL)[0][1] < procs_n:
            time.sleep(0.05)
        time.sleep(1.0)  # every listener's first re-read is done
        lat: list[float] = []
        cpu: list[float] = []
        missed = 0
        for _ in range(rounds):
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            time.sleep(0.2)
            # encoded before the clock starts: the storm begins when its bytes leave
            conn = r.connection_pool.get_connection()
            try:
                packed = conn.pack_commands([
                    ("FCALL", function_name("force"), len(c.keys), *c.keys, *c.args)
                    for c in (build_call("force", k, cfg, CHANNEL, extra=("open",),
                                         fingerprint="") for k in keys)])
                sent = time.time()
                conn.send_packed_command(packed)
                for _ in keys:
                    conn.read_response()
            finally:
                r.connection_pool.release(conn)
            for p in procs:
                assert p.stdout is not None
                got = json.loads(p.stdout.readline())
                seen = got["seen"]
                missed += breakers - len(seen)
                lat += [(t - sent) * 1000 for t in seen.values()]
                cpu.append(got["cpu_s"] * 1000)
            with r.pipeline(transaction=False) as pipe:  # release and reset for the next
                for k in keys:
                    c = build_call("reset", k, cfg, CHANNEL, fingerprint="")
                    pipe.fcall(function_name("reset"), len(c.keys), *c.keys, *c.args)
                pipe.execute()
            time.sleep(1.0)
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("next\n")
                p.stdin.flush()
        lat.sort()
        res = {
            "procs": procs_n, "breakers": breakers, "rounds": rounds,
            "deliveries": len(lat), "missed": missed,
            "p50_ms": statistics.median(lat),
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "max_ms": lat[-1],
            "worker_cpu_ms_per_storm_median": statistics.median(cpu),
        }
        print(f"storm: {procs_n} processes x {breakers} breakers, {rounds} rounds: "
              f"{len(lat)} deliveries, {missed} missed")
        print(f"  from the pipeline's send to delivery: p50 {res['p50_ms']:.1f} ms, "
              f"p99 {res['p99_ms']:.1f} ms, max {res['max_ms']:.1f} ms  (target p99 50 ms)")
        print(f"  CPU per worker process per storm (median): "
              f"{res['worker_cpu_ms_per_storm_median']:.0f} ms")
        return res
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
