"""A/B: the same micro-measurements on two checkouts, interleaved, as ratios in one run.

    python benchmarks/ab.py --base REV [--rounds 5]

Makes a git worktree of REV (a commit, branch or tag) in a temporary folder, starts one
redis-server on a free loopback port, and runs the measurements below in fresh child
processes, alternating base and current tree, `--rounds` times each. It prints the median
per operation for both and their ratio (current / base; below 1 is faster). A refactor
or a speed-up must not make any ratio clearly worse.

Measured per operation: is_available() (CLOSED), a rejected call (forced open), a
successful call on the in-process store, a strict call (sync and asyncio, one round trip
each), and a batched call (sync, flush included, amortised).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _per_op(fn: Any, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def child(port: int) -> dict[str, float]:
    import redis
    import redis.asyncio as aredis

    from distbreaker import AsyncCircuitBreaker, CircuitBreaker, CircuitBreakerConfig

    r = redis.Redis(port=port)
    out: dict[str, float] = {}
    cfg = CircuitBreakerConfig(max_staleness=60, minimum_calls=1_000_000)
    b = CircuitBreaker(f"ab-{os.getpid()}", cfg, redis=r)
    b.call(lambda: 1)
    out["is_available (ns)"] = min(_per_op(b.is_available, 200_000) for _ in range(3)) * 1e9
    strict = [_per_op(lambda: b.call(lambda: 1), 2_000) for _ in range(5)]
    out["strict sync call (us)"] = statistics.median(strict) * 1e6
    b.force_open()
    time.sleep(0.05)

    def rejected() -> None:
        try:  # noqa: SIM105 - suppress() would add its own cost to what is measured
            b.call(lambda: 1)
        except Exception:
            pass

    out["rejected call (us)"] = min(_per_op(rejected, 50_000) for _ in range(3)) * 1e6
    b.reset()
    b.close()
    m = CircuitBreaker("ab-mem", cfg)
    out["in-process store call (us)"] = min(
        _per_op(lambda: m.call(lambda: 1), 20_000) for _ in range(3)) * 1e6
    bcfg = CircuitBreakerConfig(max_staleness=60, minimum_calls=1_000_000, consistency="batched")
    bb = CircuitBreaker(f"ab-batched-{os.getpid()}", bcfg, redis=r)
    bb.call(lambda: 1)
    bb.flush()

    def batched() -> None:
        for _ in range(20_000):
            bb.call(lambda: 1)
        bb.flush()

    out["batched sync call (us)"] = min(_per_op(batched, 1) for _ in range(5)) / 20_000 * 1e6
    bb.close()

    async def main() -> float:
        a = AsyncCircuitBreaker(f"ab-async-{os.getpid()}", cfg, redis=aredis.Redis(port=port))

        async def one() -> int:
            return 1

        await a.call(one)
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(2_000):
                await a.call(one)
            runs.append((time.perf_counter() - t0) / 2_000)
        await a.close()
        return statistics.median(runs)

    out["strict async call (us)"] = asyncio.run(main()) * 1e6
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", required=True, help="the commit to compare against")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child)))
        return 0
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    tmp = Path(tempfile.mkdtemp(prefix="distbreaker-ab-"))
    base = tmp / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base),
                    a.base], check=True)
    port = _free_port()
    srv = subprocess.Popen([server, "--port", str(port), "--save", "", "--appendonly", "no",
                            "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        results: dict[str, dict[str, list[float]]] = {"base": {}, "current": {}}
        for i in range(a.rounds):
            for label, tree in (("base", base), ("current", ROOT)):
                env = dict(os.environ, PYTHONPATH=str(tree))
                out = subprocess.run([sys.executable, str(Path(__file__).resolve()),
                                      "--base", a.base, "--child", str(port)],
                                     env=env, capture_output=True, text=True, check=True)
                for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items():
                    results[label].setdefault(k, []).append(v)
            print(f"round {i + 1}/{a.rounds} done", file=sys.stderr)
        print(f"{'operation':32} {'base':>10} {'current':>10} {'ratio':>7} {'best':>6}")
        for k in results["base"]:
            b_, c_ = (statistics.median(results[x][k]) for x in ("base", "current"))
            best = min(results["current"][k]) / min(results["base"][k])
            print(f"{k:32} {b_:10.2f} {c_:10.2f} {c_ / b_:7.2f} {best:6.2f}")
        print("base, current: medians over rounds; ratio = current / base; best = the ratio "
              "of the fastest round of each (least disturbed by the rest of the machine)")
    finally:
        srv.terminate()
        srv.wait()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                       check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
