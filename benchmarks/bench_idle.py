"""An idle fleet: P processes x B breakers each, no calls at all. What does it cost Redis?

    python benchmarks/bench_idle.py [--procs 16] [--breakers 20,200] [--seconds 10] [--json OUT]

Starts its own redis-server on a free loopback port. Each worker holds B breakers on one
client (one listener), makes one call per breaker (a snapshot installed), then idles. Over
`--seconds` the parent counts what Redis executed (INFO commandstats: script calls,
heartbeat reads, and every command including those run inside scripts) and each worker's
CPU. Two modes side by side in one run:

- ``heartbeat``: this release (one read of the prefix's message sequence per beat confirms
  every snapshot; see distbreaker/_beat.py);
- ``reread``: the heartbeat switched off in the workers, so every breaker re-reads its
  snapshot every max_staleness (what a Cluster client still does, and what every client
  did before).

Target (issue 13): commands per second per idle process independent of B; 1,000 x 20 at
most about 1,000 commands/s fleet-wide (extrapolated linearly from the per-process rate).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CHANNEL = "distbreaker:v1:events"


def _server() -> Any:
    import bench_fastpath  # beside this script

    return bench_fastpath.private_server()


def worker(port: int, breakers: int, beats: bool) -> None:
    import redis

    import distbreaker._beat as beat_mod
    from distbreaker import CircuitBreaker, CircuitBreakerConfig

    if not beats:  # the "reread" mode: every hub built from here on does not beat
        orig = beat_mod.Beat.__init__

        def off(self: Any, key: str, enabled: bool) -> None:
            orig(self, key, False)

        beat_mod.Beat.__init__ = off  # type: ignore[method-assign]
    r = redis.Redis(port=port)
    cfg = CircuitBreakerConfig(max_staleness=2.0)
    fleet = [CircuitBreaker(f"idle-{i}", cfg, redis=r) for i in range(breakers)]
    for b in fleet:
        b.call(lambda: None)
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()  # measure from here
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    sys.stdin.readline()  # to here
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    print(json.dumps({"cpu_s": cpu}), flush=True)
    for b in fleet:
        b.close()


def _stats(r: Any) -> dict[str, int]:
    cs = r.info("commandstats")
    total = int(r.info("stats")["total_commands_processed"])
    return {"total": total,
            "fcall": sum(int(cs.get(f"cmdstat_{c}", {}).get("calls", 0))
                         for c in ("fcall", "fcall_ro", "evalsha")),
            "hmget": int(cs.get("cmdstat_hmget", {}).get("calls", 0)),
            "ping": int(cs.get("cmdstat_ping", {}).get("calls", 0))}


def measure(port: int, procs: int, breakers: int, seconds: float, beats: bool
            ) -> dict[str, Any]:
    import redis

    r = redis.Redis(port=port)
    r.flushall()
    ps: list[subprocess.Popen[str]] = [subprocess.Popen(
        [sys.executable, __file__, "--worker", str(port), "--breakers", str(breakers),
         "--mode", "heartbeat" if beats else "reread"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    try:
        for p in ps:
            assert p.stdout is not None
            json.loads(p.stdout.readline())
        while r.pubsub_numsub(CHANNEL)[0][1] < procs:
            time.sleep(0.05)
        time.sleep(3.0)  # first re-reads done, every listener in its steady beat
        for p in ps:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        s0 = _stats(r)
        time.sleep(seconds)
        s1 = _stats(r)
        for p in ps:
            assert p.stdin is not None
            p.stdin.write("stop\n")
            p.stdin.flush()
        cpu = []
        for p in ps:
            assert p.stdout is not None
            cpu.append(json.loads(p.stdout.readline())["cpu_s"])
    finally:
        for p in ps:
            p.kill()
            p.wait()
    d = {k: s1[k] - s0[k] - (4 if k == "total" else 0) for k in s0}  # our own INFO calls
    per_proc = d["total"] / seconds / procs
    return {
        "mode": "heartbeat" if beats else "reread", "procs": procs, "breakers": breakers,
        "script_calls_per_s": d["fcall"] / seconds,
        "heartbeat_reads_per_s": d["hmget"] / seconds,
        "commands_per_s": d["total"] / seconds,
        "commands_per_s_per_process": per_proc,
        "fleet_1000_commands_per_s": per_proc * 1000,
        "worker_cpu_ms_per_s": 1000 * sum(cpu) / len(cpu) / seconds,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--breakers", default="20,200")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="heartbeat", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, int(a.breakers), a.mode == "heartbeat")
        return 0
    server = _server()
    try:
        rows = run(server.port, a.procs, [int(x) for x in a.breakers.split(",")], a.seconds)
    finally:
        server.stop()
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


def run(port: int, procs: int, shapes: list[int], seconds: float) -> list[dict[str, Any]]:
    """Both modes at every shape, on the redis-server at `port` (flushed before each)."""
    rows: list[dict[str, Any]] = []
    print(f"idle fleet: {procs} processes, {seconds:g} s each, max_staleness 2 s")
    print(f"  {'mode':<10} {'B':>5} {'script calls/s':>15} {'HMGET/s':>13} "
          f"{'commands/s':>11} {'per process':>12} {'1000 procs':>11} {'CPU ms/s':>9}")
    for b in shapes:
        for beats in (False, True):
            row = measure(port, procs, b, seconds, beats)
            rows.append(row)
            print(f"  {row['mode']:<10} {b:>5} {row['script_calls_per_s']:>15.1f} "
                  f"{row['heartbeat_reads_per_s']:>13.1f} {row['commands_per_s']:>11.1f} "
                  f"{row['commands_per_s_per_process']:>12.2f} "
                  f"{row['fleet_1000_commands_per_s']:>11.0f} "
                  f"{row['worker_cpu_ms_per_s']:>9.2f}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
