"""distbreaker side by side with the peers: one command, one run, one table.

    pip install -e '.[bench]'        # the peers, matplotlib (nothing is installed here)
    python benchmarks/run.py [--quick] [--out benchmarks/results]

Starts its own redis-server on a free loopback port (stopped at the end) and measures, in
one run so that the ratios compare like with like:

1. the floor: PING and EVALSHA round trips, sync and asyncio;
2. per subject (distbreaker strict and batched, each installed peer that keeps state in
   Redis, an in-process breaker, a bare call): the availability check, a successful
   guarded call, a rejected call while OPEN, and the Redis commands each sends
   (INFO commandstats), interleaved in blocks so that drift hits every subject alike;
3. distbreaker's local fast path against a dict lookup + monotonic() (bench_fastpath.py),
   and a HALF_OPEN rejection once the process knows no probe is left;
4. trip propagation to 8 worker processes (pub/sub push), p50/p99;
5. throughput of 8 processes on one breaker, strict and batched, and Redis CPU;
6. Redis memory per breaker after 10 and after 1,000,000 outcomes, both window types;
7. cost per outcome with 1, 100 and 10,000 breakers;
8. an idle fleet's cost to Redis, heartbeat against per-breaker re-reads (bench_idle.py);
9. a transition storm across processes (bench_storm.py).

Writes RESULTS.md, results.json and PNG plots (latency.png, propagation.png) to --out.
Peers that are not installed are listed as such; nothing is skipped silently.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aredis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_fastpath as fp  # noqa: E402
import bench_idle  # noqa: E402
import bench_storm  # noqa: E402
import peers  # noqa: E402

from distbreaker import (  # noqa: E402
    AsyncCircuitBreaker,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitOpenError,
)

# Targets (issue 6; see benchmarks/README.md)
T_IS_AVAILABLE = 3.0
T_STRICT_RATIO = 1.3
T_BATCHED_US = 5.0
T_BATCHED_VS_PEERS = 50.0
T_REJECT_VS_PEERS = 100.0
T_REDIS_BYTES = 512  # Redis memory per breaker (MEMORY USAGE of its keys)
T_PROCESS_BYTES = 2048  # process memory per breaker, at 10,000 breakers
# issue 13
T_IDLE_FLEET = 1000.0  # commands/s for 1,000 idle processes x 20 breakers
T_IDLE_GROWTH = 1.25  # idle commands per process, most breakers / fewest
T_STORM_P99_MS = 50.0
T_SCALE_GROWTH = 2.0  # batched cost per call, most breakers / one
SCALE_CALLS_PER_BREAKER = 5  # batched rows of `scale`: timed calls per breaker, at least
T_INPROC_VS_CB = 1.5  # in-process call / the circuitbreaker package's call
T_TRANSITION_US = 5.0  # one in-process transition


@dataclass(frozen=True)
class Plan:
    blocks: int
    ok_ops: int
    loop_ops: int  # per timing of a check / rejection loop
    loop_repeat: int
    load_seconds: float
    memory_outcomes: int
    scale_ns: tuple[int, ...]
    scale_calls: int
    trip_rounds: int
    idle_procs: int
    idle_breakers: tuple[int, ...]
    idle_seconds: float
    storm_procs: int
    storm_breakers: int
    storm_rounds: int


FULL = Plan(blocks=8, ok_ops=400, loop_ops=2000, loop_repeat=7, load_seconds=5.0,
            memory_outcomes=1_000_000, scale_ns=(1, 100, 10_000), scale_calls=20_000,
            trip_rounds=20, idle_procs=16, idle_breakers=(20, 200), idle_seconds=10.0,
            storm_procs=16, storm_breakers=200, storm_rounds=3)
QUICK = Plan(blocks=3, ok_ops=150, loop_ops=300, loop_repeat=3, load_seconds=1.5,
             memory_outcomes=20_000, scale_ns=(1, 100), scale_calls=2_000, trip_rounds=4,
             idle_procs=4, idle_breakers=(20, 100), idle_seconds=4.0, storm_procs=4,
             storm_breakers=50, storm_rounds=1)


def _noop() -> int:
    return 1


async def _anoop() -> int:
    return 1


class _Boom(Exception):
    pass


def _boom() -> None:
    raise _Boom


def _cfg(**kw: Any) -> CircuitBreakerConfig:
    base: dict[str, Any] = dict(failure_threshold=5, recovery_timeout=120.0,
                                minimum_calls=1_000_000, max_staleness=60.0)
    base.update(kw)
    return CircuitBreakerConfig(**base)


# -- subjects ----------------------------------------------------------------------------------


@dataclass
class Subject:
    """Something measured side by side: its three operations (sync callables, or
    coroutine functions for asyncio subjects) and what it is."""

    name: str
    kind: str  # "floor", "baseline", "distbreaker", "peer"
    is_async: bool
    ok: Callable[[], Any]
    check: Callable[[], Any] | None = None
    trip: Callable[[], Any] | None = None
    rejected: Callable[[], Any] | None = None
    close: Callable[[], Any] | None = None
    flush: Callable[[], Any] | None = None  # batched mode: before counting commands
    records_in_redis: bool = False
    shares_window: bool = False
    note: str = ""
    res: dict[str, Any] = field(default_factory=dict)
    samples: list[float] = field(default_factory=list)


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _rejects(b: Any) -> Callable[[], bool]:
    def rejected() -> bool:
        try:
            b.call(_noop)
        except CircuitOpenError:
            return True
        return False
    return rejected


def _arejects(b: Any) -> Callable[[], Awaitable[bool]]:
    async def rejected() -> bool:
        try:
            await b.call(_anoop)
        except CircuitOpenError:
            return True
        return False
    return rejected


def _trip_sync(b: Any) -> Callable[[], None]:
    def trip() -> None:
        for _ in range(5):
            with contextlib.suppress(_Boom, CircuitOpenError):
                b.call(_boom)
        b.flush(10)
    return trip


def _trip_async(b: Any) -> Callable[[], Awaitable[None]]:
    async def boom() -> None:
        raise _Boom

    async def trip() -> None:
        for _ in range(5):
            with contextlib.suppress(_Boom, CircuitOpenError):
                await b.call(boom)
        await b.flush(10)
    return trip


def sync_subjects(port: int, sha: str) -> list[Subject]:
    c = redis.Redis(host="127.0.0.1", port=port)
    out = [
        Subject("PING (floor)", "floor", False, c.ping),
        Subject("EVALSHA 'return 1' (floor)", "floor", False, lambda: c.evalsha(sha, 0)),
        Subject("bare call", "baseline", False, _noop),
    ]
    mem = CircuitBreaker("bench-inproc", _cfg())
    out.append(Subject("distbreaker, in-process store", "baseline", False,
                       lambda: mem.call(_noop), mem.is_available, _trip_sync(mem),
                       _rejects(mem), mem.close))
    for mode in ("strict", "batched"):
        b = CircuitBreaker(f"bench-sync-{mode}", _cfg(consistency=mode),
                           redis=redis.Redis(host="127.0.0.1", port=port))
        out.append(Subject(f"distbreaker {mode}", "distbreaker", False,
                           lambda b=b: b.call(_noop), b.is_available, _trip_sync(b),
                           _rejects(b), b.close, b.flush, True, True,
                           "1 FCALL per call" if mode == "strict" else
                           "1 FCALL per breaker per round trip, from a writer thread"))
    return out


def async_subjects(port: int, sha: str) -> list[Subject]:
    c = aredis.Redis(host="127.0.0.1", port=port)
    out = [
        Subject("PING (floor)", "floor", True, c.ping),
        Subject("EVALSHA 'return 1' (floor)", "floor", True, lambda: c.evalsha(sha, 0)),
        Subject("bare call", "baseline", True, _anoop),
    ]
    for mode in ("strict", "batched"):
        b = AsyncCircuitBreaker(f"bench-async-{mode}", _cfg(consistency=mode),
                                redis=aredis.Redis(host="127.0.0.1", port=port))
        out.append(Subject(f"distbreaker {mode}", "distbreaker", True,
                           lambda b=b: b.call(_anoop), b.is_available, _trip_async(b),
                           _arejects(b), b.close, b.flush, True, True,
                           "1 FCALL per call" if mode == "strict" else
                           "1 FCALL per breaker per round trip, from the loop's writer task"))
    return out


def peer_subjects(port: int, want_async: bool) -> tuple[list[Subject], list[str]]:
    out: list[Subject] = []
    missing: list[str] = []
    avail = set(peers.available_peers())
    for name, peer in peers.PEERS.items():
        if peer.is_async != want_async:
            continue
        if name not in avail:
            missing.append(f"{name} ({peer.package} {_version(peer.package)})")
            continue
        a = peers.make(name, port, f"bench-{name.split()[0]}-{'a' if want_async else 's'}")
        out.append(Subject(name, "peer", want_async, a.ok, a.check, a.trip, a.rejected,
                           a.close, None, peer.records_in_redis, peer.shares_window,
                           peer.note))
    return out, missing


# -- measuring --------------------------------------------------------------------------------


# Commands that other subjects send from their own background threads, whenever they
# run (interlock-cb polls its state once a second): not counted against the subject
# being measured. distbreaker never sends them on a call's path.
BACKGROUND = frozenset({"hgetall", "hello"})


def _commands(stats: fp.CmdStats, before: dict[str, tuple[int, int]],
              into: dict[str, int] | None = None) -> int:
    d = fp.CmdDelta()
    d.add(before, stats.snap())
    sent = d.client_sent()
    if into is not None:
        for k, v in sent.items():
            into[k] = into.get(k, 0) + v
    return sum(v for k, v in sent.items() if k not in BACKGROUND)


async def _run(fn: Callable[[], Any], is_async: bool) -> Any:
    return await fn() if is_async else fn()


async def _time_loop(fn: Callable[[], Any], is_async: bool, n: int, repeat: int
                     ) -> dict[str, float]:
    """Per-operation time of `fn` from loops of n calls: median and best of `repeat`."""
    pc = time.perf_counter_ns
    per: list[float] = []
    if is_async:  # an asyncio subject's plain method (distbreaker's is_available) stays plain
        probe = fn()
        is_async = inspect.isawaitable(probe)
        if is_async:
            await probe
    for _ in range(repeat):
        t = pc()
        if is_async:
            for _ in range(n):
                await fn()
        else:
            for _ in range(n):
                fn()
        per.append((pc() - t) / n / 1000.0)
    per.sort()
    return {"median_us": statistics.median(per), "best_us": per[0]}


async def measure(subjects: list[Subject], stats: fp.CmdStats, plan: Plan) -> None:
    pc = time.perf_counter_ns
    for s in subjects:  # warm up: connections, scripts, caches
        for _ in range(100):
            await _run(s.ok, s.is_async)
        if s.flush is not None:
            await _run(s.flush, s.is_async)
    # let each listener finish its on-subscribe refresh: none may land inside a block
    await asyncio.sleep(0.3)
    cmds = {s.name: 0 for s in subjects}
    by_name: dict[str, dict[str, int]] = {s.name: {} for s in subjects}
    for _ in range(plan.blocks):
        for s in subjects:
            before = stats.snap()
            buf = [0.0] * plan.ok_ops
            if s.is_async:
                for i in range(plan.ok_ops):
                    t = pc()
                    await s.ok()
                    buf[i] = (pc() - t) / 1000.0
            else:
                f = s.ok
                for i in range(plan.ok_ops):
                    t = pc()
                    f()
                    buf[i] = (pc() - t) / 1000.0
            if s.flush is not None:
                await _run(s.flush, s.is_async)
            cmds[s.name] += _commands(stats, before, by_name[s.name])
            s.samples += buf
    n_ok = plan.blocks * plan.ok_ops
    for s in subjects:
        s.res["ok"] = fp.summary(s.samples)
        s.res["ok_commands_per_call"] = cmds[s.name] / n_ok
        s.res["ok_commands_by_name"] = by_name[s.name]  # background polls included
        if s.check is not None:
            before = stats.snap()
            s.res["check"] = await _time_loop(s.check, s.is_async, plan.loop_ops,
                                              plan.loop_repeat)
            s.res["check_commands_per_call"] = _commands(stats, before) / (
                plan.loop_ops * plan.loop_repeat)
    for s in subjects:
        if s.trip is None or s.rejected is None:
            continue
        await _run(s.trip, s.is_async)
        if not await _run(s.rejected, s.is_async):
            s.res["rejected_error"] = "the trip did not take: a call went through"
            continue
        before = stats.snap()
        s.res["rejected"] = await _time_loop(s.rejected, s.is_async, plan.loop_ops,
                                             plan.loop_repeat)
        s.res["rejected_commands_per_call"] = _commands(stats, before) / (
            plan.loop_ops * plan.loop_repeat)


def half_open_rejection(port: int, stats: fp.CmdStats, plan: Plan) -> dict[str, Any]:
    """A HALF_OPEN rejection once this process knows every probe is taken: local."""
    cfg = _cfg(failure_threshold=1, recovery_timeout=0.05, probe_lease=30.0)
    a = CircuitBreaker("bench-halfopen", cfg, redis=redis.Redis(host="127.0.0.1", port=port))
    other = CircuitBreaker("bench-halfopen", cfg,
                           redis=redis.Redis(host="127.0.0.1", port=port))
    try:
        with contextlib.suppress(_Boom):
            a.call(_boom)
        time.sleep(0.1)
        permit = other.admit()  # the fleet's only probe, held by another process
        assert permit.is_probe
        first = _rejects(a)()  # one round trip: learns no probe is left
        before = stats.snap()
        t = asyncio.run(_time_loop(_rejects(a), False, plan.loop_ops, plan.loop_repeat))
        n = _commands(stats, before)
        other.finish(permit)
        return {"first_rejected": first, **t, "commands_per_call":
                n / (plan.loop_ops * plan.loop_repeat), "state": a.get_state().value}
    finally:
        a.close()
        other.close()


# -- throughput, memory, scale -----------------------------------------------------------------


def _server_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / fp._TICK


def throughput(port: int, server_pid: int, plan: Plan, nproc: int = 8) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("strict", "batched"):
        procs = [subprocess.Popen([sys.executable, str(HERE / "_load_worker.py"), str(port),
                                   f"bench-load-{mode}", mode, str(plan.load_seconds)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for _ in range(nproc)]
        try:
            for p in procs:
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            cpu0, t0 = _server_cpu_s(server_pid), time.monotonic()
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            lines = [p.communicate(timeout=plan.load_seconds + 60)[0].split() for p in procs]
            wall, cpu = time.monotonic() - t0, _server_cpu_s(server_pid) - cpu0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        calls = sum(int(x[1]) for x in lines)
        batches = sum(int(x[3]) for x in lines)
        out[mode] = {"processes": nproc, "seconds": wall, "calls": calls,
                     "calls_per_s": calls / wall, "rejected": sum(int(x[2]) for x in lines),
                     "script_calls": batches if mode == "batched" else calls,
                     "redis_cpu_pct": 100.0 * cpu / wall,
                     "redis_cpu_us_per_call": 1e6 * cpu / calls if calls else math.nan}
    return out


def _own_bytes(admin: redis.Redis, b: Any, sharers: int = 0) -> int:
    """MEMORY USAGE of a breaker's own keys, plus its share of its prefix's sequence hash
    when `sharers` breakers share it (the hash exists once per prefix, not per breaker)."""
    own = sum(int(admin.memory_usage(k, samples=0) or 0)
              for k in (b.keys.state, b.keys.window, b.keys.probes))
    if sharers:
        own += int(admin.memory_usage(b.keys.seq, samples=0) or 0) // sharers
    return own


def memory(port: int, plan: Plan) -> dict[str, Any]:
    """MEMORY USAGE of a breaker's keys after 10 and after `memory_outcomes` outcomes,
    recorded in calls of 1,000 outcomes with the test clock moving 100 ms per call."""
    admin = redis.Redis(host="127.0.0.1", port=port)
    out: dict[str, Any] = {}
    shapes = {"time (60 s, 10 buckets)": dict(window_type="time", window_size=60.0,
                                              window_buckets=10),
              "count (100 calls)": dict(window_type="count", window_size=100)}
    for label, kw in shapes.items():
        name = f"bench-mem-{kw['window_type']}"
        b = CircuitBreaker(name, _cfg(failure_threshold=1_000_000, minimum_calls=100, **kw),
                           redis=redis.Redis(host="127.0.0.1", port=port))
        b.set_test_clock(1_700_000_000_000)

        def usage(b: CircuitBreaker = b) -> int:
            return _own_bytes(admin, b)

        def record(n: int, per_call: int, step_ms: int, b: CircuitBreaker = b) -> None:
            done = 0
            while done < n:
                k = min(per_call, n - done)
                extra: list[Any] = [""]
                for i in range(k):
                    extra += [b.snapshot.generation, 1 if (done + i) % 10 == 0 else 0, "", 0]
                b._store.run(b._core.calls.build("record", *extra))
                done += k
                b.set_test_clock((b.test_clock or 0) + step_ms)
        b.refresh()
        # 10 outcomes, one per 6 s bucket: the time window at its full shape. Then N
        # outcomes at a steady rate over 10 windows' worth of test time (N/10 of them
        # fill the window once), so that N/10 and N compare like with like.
        record(10, 1, 6000)
        small = usage()
        step = max(1, 600_000 * 1000 // plan.memory_outcomes)  # ms per call of 1,000
        record(plan.memory_outcomes // 10 - 10, 1000, step)
        tenth = usage()
        record(plan.memory_outcomes - plan.memory_outcomes // 10, 1000, step)
        big = usage()
        out[label] = {"after_10": small, "after_tenth": tenth, "after_n": big,
                      "prefix_bytes": int(admin.memory_usage(b.keys.seq, samples=0) or 0),
                      "n": plan.memory_outcomes,
                      "state": admin.hget(b.keys.state, "state").decode()}  # type: ignore[union-attr]
        b.close()
    admin.close()
    return out


def scale(port: int, plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    admin = redis.Redis(host="127.0.0.1", port=port)
    stats = fp.CmdStats(admin)
    for n in plan.scale_ns:
        for mode in ("strict", "batched"):
            out[f"{mode} x{n}"] = _scale_sync(port, n, mode, 0.0, plan, admin, stats)
        out[f"asyncio batched x{n}"] = asyncio.run(_scale_async(port, n, 0.0, plan, admin,
                                                                stats))
    admin.close()
    return out


def _scale_sync(port: int, n: int, mode: str, linger: float, plan: Plan, admin: redis.Redis,
                stats: fp.CmdStats) -> dict[str, Any]:
    """One row of `scale`: `n` breakers of one client, calls round robin, every outcome
    applied in Redis before the clock stops (the writer thread sends while the calls go
    on; what it has not sent by their end is the flush's)."""
    client = redis.Redis(host="127.0.0.1", port=port)
    gc.collect()
    rss0 = _rss()
    mem0 = int(admin.info("memory")["used_memory"])
    t0 = time.monotonic()
    bs = [CircuitBreaker(f"bench-scale-{mode}-{linger}-{n}-{i}",
                         _cfg(consistency=mode, batch_linger=linger), redis=client)
          for i in range(n)]
    build_s = time.monotonic() - t0
    # batched: several calls per breaker, so each one's batching is steady
    calls = max(plan.scale_calls, n * (SCALE_CALLS_PER_BREAKER if mode == "batched" else 1))
    for b in bs:
        b.call(_noop)
    for b in bs:
        b.flush(30)
    before = stats.snap()
    pc = time.perf_counter_ns
    t = pc()
    for i in range(calls):
        bs[i % n].call(_noop)
    rss1 = _rss()  # the breakers and their calls, not the flush's passing waiters
    for b in bs:
        b.flush(60)
    el = (pc() - t) / calls / 1000.0
    cmds = _commands(stats, before)
    sample = bs[:: max(1, n // 100)]
    redis_bytes = statistics.fmean(_own_bytes(admin, b, n) for b in sample)
    row = {
        "breakers": n, "mode": mode + (f", linger {linger:g} s" if linger else ""),
        "us_per_call": el, "calls": calls, "commands_per_outcome": cmds / calls,
        # RSS moves in pages: meaningless for a single breaker
        "process_bytes_per_breaker": (rss1 - rss0) / n if n >= 100 else math.nan,
        "redis_bytes_per_breaker": redis_bytes,
        "redis_used_memory_delta_per_breaker":
            (int(admin.info("memory")["used_memory"]) - mem0) / n,
        "construct_s": build_s,
    }
    for b in bs:
        b.close()
    client.close()
    return row


async def _ayield() -> int:
    await asyncio.sleep(0)  # as a call that awaits I/O does: the writer task gets the loop
    return 1


async def _scale_async(port: int, n: int, linger: float, plan: Plan, admin: redis.Redis,
                       stats: fp.CmdStats) -> dict[str, Any]:
    """The asyncio twin of one batched row of `scale` (flushed at once with gather)."""
    client = aredis.Redis(host="127.0.0.1", port=port)
    bs = [AsyncCircuitBreaker(f"bench-scale-async-{linger}-{n}-{i}",
                              _cfg(consistency="batched", batch_linger=linger), redis=client)
          for i in range(n)]
    calls = max(plan.scale_calls, n * SCALE_CALLS_PER_BREAKER)
    for b in bs:
        await b.call(_ayield)
    await asyncio.gather(*(b.flush(30) for b in bs))
    before = stats.snap()
    pc = time.perf_counter_ns
    t = pc()
    for i in range(calls):
        await bs[i % n].call(_ayield)
    await asyncio.gather(*(b.flush(60) for b in bs))
    el = (pc() - t) / calls / 1000.0
    cmds = _commands(stats, before)
    conns = len(admin.client_list(_type="normal"))
    sample = bs[:: max(1, n // 100)]
    redis_bytes = statistics.fmean(_own_bytes(admin, b, n) for b in sample)
    for b in bs:
        await b.close()
    await client.aclose()
    return {"breakers": n, "mode": "asyncio batched" + (f", linger {linger:g} s" if linger
                                                          else ""),
            "us_per_call": el, "calls": calls,
            "commands_per_outcome": cmds / calls, "process_bytes_per_breaker": math.nan,
            "redis_bytes_per_breaker": redis_bytes, "connections": conns}


def inprocess(plan: Plan) -> dict[str, Any]:
    """The in-process store (`redis=None`) against in-memory peers, interleaved block by
    block: a successful call, and a transition (a trip and a reset in turn: the time of
    both, halved). Peers not installed are left out."""
    subjects: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]] = {}
    mem = CircuitBreaker("bench-inproc-call", _cfg())
    trip_b = CircuitBreaker("bench-inproc-trip", _cfg(failure_threshold=1))

    def d_flip() -> None:
        try:  # noqa: SIM105 (timed: cheaper than suppress)
            trip_b.call(_boom)
        except _Boom:
            pass
        trip_b.reset()

    subjects["distbreaker, in-process store"] = (lambda: mem.call(_noop), d_flip)
    try:
        import pybreaker

        pb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
        pbt = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=30)

        def pb_flip() -> None:
            try:  # noqa: SIM105 (timed: cheaper than suppress)
                pbt.call(_boom)
            except (_Boom, pybreaker.CircuitBreakerError):
                pass
            pbt.close()

        subjects["pybreaker (memory)"] = (lambda: pb.call(_noop), pb_flip)
    except ImportError:
        pass
    try:
        import circuitbreaker

        cb = circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=30)
        cbt = circuitbreaker.CircuitBreaker(failure_threshold=1, recovery_timeout=30)
        guarded, guarded_boom = cb(_noop), cbt(_boom)

        def cb_flip() -> None:
            try:  # noqa: SIM105 (timed: cheaper than suppress)
                guarded_boom()
            except _Boom:
                pass
            cbt.reset()

        subjects["circuitbreaker"] = (guarded, cb_flip)
    except ImportError:
        pass
    calls: dict[str, list[float]] = {k: [] for k in subjects}
    flips: dict[str, list[float]] = {k: [] for k in subjects}
    pc = time.perf_counter_ns
    n, nf = plan.loop_ops * 10, plan.loop_ops
    for _ in range(plan.blocks * 2):
        for name, (call, flip) in subjects.items():
            t = pc()
            for _ in range(n):
                call()
            calls[name].append((pc() - t) / n / 1000.0)
            if flip is not None:
                t = pc()
                for _ in range(nf):
                    flip()
                flips[name].append((pc() - t) / nf / 2 / 1000.0)
    mem.close()
    trip_b.close()
    return {name: {"call_us": statistics.median(calls[name]),
                   "transition_us": statistics.median(flips[name]) if flips[name] else None}
            for name in subjects}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- targets, report, plots ----------------------------------------------------------------------


def _by(subjects: list[Subject], name: str) -> Subject:
    return next(s for s in subjects if s.name == name)


def _med(s: Subject, what: str) -> float:
    r = s.res.get(what)
    if r is None:
        return math.nan
    return float(r["median"] if "median" in r else r["median_us"])


def targets(r: dict[str, Any], groups: dict[str, list[Subject]]) -> list[dict[str, Any]]:
    items: list[tuple[str, float, str, float]] = []
    fpr = r["fast_path"]
    items.append(("is_available() CLOSED / (dict lookup + monotonic())",
                  fpr["is_available_closed_ratio"], "<=", T_IS_AVAILABLE))
    for g, subs in groups.items():
        floor = _med(_by(subs, "EVALSHA 'return 1' (floor)"), "ok")
        strict, batched = _by(subs, "distbreaker strict"), _by(subs, "distbreaker batched")
        recording = [s for s in subs if s.kind == "peer" and s.records_in_redis]
        interlock = [s for s in subs if s.kind == "peer" and "interlock" in s.name]
        items.append((f"{g}: strict call / EVALSHA round trip", _med(strict, "ok") / floor,
                      "<=", T_STRICT_RATIO))
        items.append((f"{g}: strict call, Redis commands per call",
                      strict.res["ok_commands_per_call"], "==", 1.0))
        items.append((f"{g}: batched call (us)", _med(batched, "ok"), "<=", T_BATCHED_US))
        items.append((f"{g}: batched call, script calls per call",
                      batched.res["ok_commands_per_call"], "<=", 1.0))
        if recording:
            cheapest = min(_med(s, "ok") for s in recording)
            items.append((f"{g}: cheapest recording peer's call / batched call",
                          cheapest / _med(batched, "ok"), ">=", T_BATCHED_VS_PEERS))
            cheapest_rej = min(s.res["rejected"]["median_us"] for s in recording
                               if "rejected" in s.res)
            items.append((f"{g}: cheapest recording peer's rejection / ours",
                          cheapest_rej / strict.res["rejected"]["median_us"], ">=",
                          T_REJECT_VS_PEERS))
        for s in interlock:
            items.append((f"{g}: batched call / {s.name} call",
                          _med(batched, "ok") / _med(s, "ok"), "<", 1.0))
            if "rejected" in s.res:
                items.append((f"{g}: our rejection / {s.name} rejection",
                              strict.res["rejected"]["median_us"]
                              / s.res["rejected"]["median_us"], "<", 1.0))
        items.append((f"{g}: rejection while OPEN, Redis commands per call",
                      strict.res["rejected_commands_per_call"], "==", 0.0))
    items.append(("HALF_OPEN rejection (no probe left), Redis commands per call",
                  r["half_open"]["commands_per_call"], "==", 0.0))
    t = r["trip"]["spin"]
    items.append(("trip seen by 8 processes, p99 (ms; interlock-cb polls every 1000)",
                  t["latency_ms"]["p99"] if not t["missed"] else math.inf, "<", 10.0))
    for label, m in r["memory"].items():
        items.append((f"memory per breaker, {label}: after {m['n']:,} / after "
                      f"{m['n'] // 10:,} outcomes", m["after_n"] / m["after_tenth"], "<=", 1.0))
        if label.startswith("time"):
            items.append((f"Redis memory per breaker, {label} (bytes)", m["after_n"], "<=",
                          T_REDIS_BYTES))
    for x in r["scale"].values():
        if x["breakers"] >= 10_000 and x["mode"] == "batched":
            items.append((f"Redis memory per breaker, {x['breakers']:,} breakers, defaults "
                          "(bytes)", x["redis_bytes_per_breaker"], "<=", T_REDIS_BYTES))
        if x["breakers"] >= 10_000 and not math.isnan(x["process_bytes_per_breaker"]):
            items.append((f"process memory per breaker, {x['breakers']:,} {x['mode']} "
                          "breakers (bytes, RSS)", x["process_bytes_per_breaker"], "<=",
                          T_PROCESS_BYTES))
    beat = [x for x in r["idle"] if x["mode"] == "heartbeat"]
    fewest, most = beat[0], beat[-1]
    items.append((f"idle: 1,000 processes x {fewest['breakers']} breakers, commands/s "
                  f"(from {fewest['procs']} measured)", fewest["fleet_1000_commands_per_s"],
                  "<=", T_IDLE_FLEET))
    items.append((f"idle: commands per process, {most['breakers']} / {fewest['breakers']} "
                  "breakers", most["commands_per_s_per_process"]
                  / max(fewest["commands_per_s_per_process"], 1e-9), "<=", T_IDLE_GROWTH))
    for mode in ("batched", "asyncio batched"):
        rows = sorted((x for x in r["scale"].values() if x["mode"] == mode),
                      key=lambda x: x["breakers"])
        if len(rows) > 1:
            items.append((f"{mode}: us per call, {rows[-1]['breakers']:,} / "
                          f"{rows[0]['breakers']:,} breakers",
                          rows[-1]["us_per_call"] / rows[0]["us_per_call"], "<=",
                          T_SCALE_GROWTH))
    ip = r["inprocess"]
    ours = ip["distbreaker, in-process store"]
    if "circuitbreaker" in ip:
        items.append(("in-process store: call / circuitbreaker call", ours["call_us"]
                      / ip["circuitbreaker"]["call_us"], "<=", T_INPROC_VS_CB))
    items.append(("in-process store: one transition (us)", ours["transition_us"], "<=",
                  T_TRANSITION_US))
    st = r["storm"]
    items.append((f"storm: {st['procs']} x {st['breakers']} trips seen, p99 (ms)",
                  st["p99_ms"] if not st["missed"] else math.inf, "<=", T_STORM_P99_MS))
    out = []
    for name, value, op, target in items:
        met = {"<=": value <= target, "<": value < target, ">=": value >= target,
               "==": value == target}[op]
        out.append({"name": name, "value": value, "op": op, "target": target, "met": met})
    return out


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x >= 100:
        return f"{x:,.0f}{unit}"
    if x >= 10:
        return f"{x:.1f}{unit}"
    return f"{x:.2f}{unit}"


def render(r: dict[str, Any], groups: dict[str, list[Subject]]) -> str:
    m = r["machine"]
    L: list[str] = []
    add = L.append
    add("# distbreaker benchmark results")
    add("")
    add(f"Generated by `python benchmarks/run.py{' --quick' if r['quick'] else ''}` "
        f"on {r['date']}, in {r['elapsed_s']:.0f} s. Medians unless noted; every ratio "
        "compares numbers measured in this same run.")
    add("")
    add(f"Machine: {m['cpu_model']}, {m['nproc']} CPUs, {m['platform']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}. "
        f"Python {m['python']}, redis-py {m['redis_py']} ({m['parser']}, RESP{m['resp']}, "
        f"hiredis {'yes' if m['hiredis'] else 'no'}), redis-server {m['redis_server']} "
        "on loopback, started by the benchmark.")
    add("")
    add("Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".")
    if r["missing_peers"]:
        add("")
        add("Not installed, so not measured: " + "; ".join(r["missing_peers"])
            + " (`pip install -e '.[bench]'`).")
    add("")
    add("## Targets")
    add("")
    add("| target | measured | wanted | |")
    add("| --- | ---: | ---: | --- |")
    for t in r["targets"]:
        add(f"| {t['name']} | {_fmt(t['value'])} | {t['op']} {_fmt(t['target'])} | "
            f"{'met' if t['met'] else '**missed**'} |")
    for g, subs in groups.items():
        floor = _med(_by(subs, "EVALSHA 'return 1' (floor)"), "ok")
        peers_ = [s for s in subs if s.kind == "peer"]
        fastest_peer = min((_med(s, "ok") for s in peers_), default=math.nan)
        add("")
        add(f"## {g}: side by side (microseconds per operation)")
        add("")
        add("| subject | check | check cmds | call | call p99 | call / EVALSHA | "
            "call / fastest peer | call cmds | rejected (OPEN) | rejected cmds | "
            "fleet-wide window |")
        add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for s in subs:
            ok = s.res.get("ok", {})
            chk = s.res.get("check", {}).get("median_us")
            rej = s.res.get("rejected", {}).get("median_us")
            add(f"| {s.name} | {_fmt(chk)} | {_fmt(s.res.get('check_commands_per_call'))} | "
                f"{_fmt(ok.get('median'))} | {_fmt(ok.get('p99'))} | "
                f"{_fmt(ok.get('median', math.nan) / floor)}x | "
                f"{_fmt(ok.get('median', math.nan) / fastest_peer)}x | "
                f"{_fmt(s.res.get('ok_commands_per_call'))} | {_fmt(rej)} | "
                f"{_fmt(s.res.get('rejected_commands_per_call'))} | "
                f"{'yes' if s.shares_window else ('no' if s.kind == 'peer' else '')} |")
        notes = [f"- {s.name}: {s.note}" for s in subs if s.note]
        if notes:
            add("")
            add("How each uses Redis (commands counted with INFO commandstats around each "
                "subject's blocks; interlock-cb's once-a-second HGETALL poll, sent by its "
                "own thread whenever it runs, is not counted against the other subjects):")
            add("")
            L.extend(notes)
    fpr, ho = r["fast_path"], r["half_open"]
    add("")
    add("## distbreaker's local fast path")
    add("")
    add(f"- `is_available()`: {fpr['is_available_closed_ns']['best']:.0f} ns CLOSED, "
        f"{fpr['is_available_open_ns']['best']:.0f} ns OPEN; a dict lookup + "
        f"`time.monotonic()` {fpr['baseline_ns']['best']:.0f} ns "
        f"({fpr['is_available_closed_ratio']:.2f}x).")
    add(f"- Rejected call while OPEN: {fpr['reject_open']['best_us']:.2f} us best, "
        f"{fpr['reject_open']['redis_commands']} Redis commands in "
        f"{fpr['reject_open']['calls']:,} calls.")
    add(f"- HALF_OPEN rejection once every probe is known taken: {ho['median_us']:.2f} us, "
        f"{ho['commands_per_call']:.3f} commands per call (the first one asked Redis).")
    add("")
    add("## Trip propagation to other processes (pub/sub push)")
    add("")
    add("| workers' loop | workers | rounds | p50 ms | p90 ms | p99 ms | max ms | missed |")
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, x in r["trip"].items():
        lat = x["latency_ms"]
        add(f"| {key} | {x['workers']} | {x['rounds']} | {lat['median']:.2f} | "
            f"{lat['p90']:.2f} | {lat['p99']:.2f} | {lat['max']:.2f} | {x['missed']} |")
    add("")
    add("`spin`: each worker calls `is_available()` in a loop that never releases the GIL, "
        "so the listener thread runs only at the GIL switch interval (5 ms); `yield`: the "
        "loop calls `time.sleep(0)` between checks, as a worker doing I/O does. interlock-cb "
        "polls Redis once a second (1,000 ms).")
    add("")
    add("## Throughput: 8 processes on one breaker")
    add("")
    add("| mode | calls/s | script calls | Redis CPU % | Redis CPU us per call |")
    add("| --- | ---: | ---: | ---: | ---: |")
    for mode, x in r["throughput"].items():
        add(f"| {mode} | {x['calls_per_s']:,.0f} | {x['script_calls']:,} | "
            f"{x['redis_cpu_pct']:.0f} | {x['redis_cpu_us_per_call']:.2f} |")
    add("")
    add("## In-process store against in-memory peers (one process, no Redis)")
    add("")
    add("| subject | successful call (us) | / circuitbreaker | one transition (us) |")
    add("| --- | ---: | ---: | ---: |")
    ip = r["inprocess"]
    base = ip.get("circuitbreaker", {}).get("call_us")
    for name, x in ip.items():
        rel = f"{x['call_us'] / base:.2f}x" if base else "-"
        add(f"| {name} | {x['call_us']:.2f} | {rel} | {_fmt(x['transition_us'])} |")
    add("")
    add("Measured interleaved, block by block. A transition is a trip (one failing call "
        "with a threshold of 1) and a reset in turn, their time halved. distbreaker's call "
        "also keeps this process's metrics (counts, latency ring, history) and its "
        "transitions fire the state-change hook and the listeners' events; a plain "
        "success is applied to the model in place, without a script call.")
    add("")
    add("## Redis memory per breaker (MEMORY USAGE of its own keys)")
    add("")
    add("| window | after 10 outcomes | after N/10 | after N outcomes | N |")
    add("| --- | ---: | ---: | ---: | ---: |")
    for label, x in r["memory"].items():
        add(f"| {label} | {x['after_10']:,} B | {x['after_tenth']:,} B | {x['after_n']:,} B "
            f"| {x['n']:,} |")
    add("")
    add("The 10 outcomes of the time window are one per bucket, so the window already has "
        "its full shape; the N outcomes then arrive at a steady rate over ten windows of "
        "test time, so after N/10 the window is full once and after N ten times over. The "
        "counts are stored as decimal integers, so a window holding more calls takes a few "
        "bytes more; a count window holds one field per slot, so it grows until its ring "
        "is full (window_size slots) and not after. A breaker's own keys are its state "
        "hash, its window hash and its probe set (absent unless leases are out); the "
        "prefix's sequence hash, "
        f"{next(iter(r['memory'].values())).get('prefix_bytes', 0):,} B, exists once per "
        "prefix, whatever the number of breakers (the many-breakers table below counts "
        "each breaker's share of it).")
    add("")
    add("## Cost per outcome with many breakers (one process, calls spread over them)")
    add("")
    add("| breakers | mode | timed calls | us per call | Redis commands per outcome | process "
        "bytes per breaker | Redis bytes per breaker (its keys, and its share of the prefix's) |")
    add("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for x in r["scale"].values():
        add(f"| {x['breakers']:,} | {x['mode']} | {x['calls']:,} | {x['us_per_call']:.2f} | "
            f"{x['commands_per_outcome']:.3f} | {_fmt(x['process_bytes_per_breaker'])} | "
            f"{x['redis_bytes_per_breaker']:,.0f} |")
    add("")
    add(f"Batched rows time at least {SCALE_CALLS_PER_BREAKER} calls per breaker, round "
        "robin, after one untimed call each, and the clock stops once every outcome is "
        "applied in Redis (flush() of every breaker; asyncio flushes them together). With "
        "`batch_linger` 0 a breaker's outcome goes out as soon as its previous batch is "
        "back, so when each breaker is called less often than a round trip takes, every "
        "outcome is a record call of its own (commands per outcome above): the cost per "
        "outcome is then the call plus one record's work, in Python and inside Redis, "
        "whatever the batching; the due ones share one pipeline per round trip. "
        "Process bytes are the growth of RSS over the breakers' construction and calls.")
    add("")
    add("## An idle fleet (no calls at all)")
    add("")
    add("| mode | processes | breakers each | script calls/s | commands/s (all, "
        "inside scripts too) | per process | 1,000 processes | worker CPU ms/s |")
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for x in r["idle"]:
        add(f"| {x['mode']} | {x['procs']} | {x['breakers']} | "
            f"{x['script_calls_per_s']:,.1f} | {x['commands_per_s']:,.1f} | "
            f"{x['commands_per_s_per_process']:.2f} | "
            f"{x['fleet_1000_commands_per_s']:,.0f} | {x['worker_cpu_ms_per_s']:.2f} |")
    add("")
    add("`heartbeat`: this release, one HMGET of the prefix's message sequence per "
        "0.75 x max_staleness per process; `reread`: the heartbeat switched off, every "
        "breaker re-reads its snapshot every max_staleness (a Cluster client still does).")
    st = r["storm"]
    add("")
    add(f"## A transition storm: {st['procs']} processes x {st['breakers']} breakers, all "
        "forced open in one pipeline")
    add("")
    add("| deliveries | missed | p50 ms | p99 ms | max ms | worker CPU per storm ms |")
    add("| ---: | ---: | ---: | ---: | ---: | ---: |")
    add(f"| {st['deliveries']:,} | {st['missed']} | {st['p50_ms']:.1f} | "
        f"{st['p99_ms']:.1f} | {st['max_ms']:.1f} | "
        f"{st['worker_cpu_ms_per_storm_median']:.0f} |")
    add("")
    add("Plots: `latency.png` (successful guarded calls), `propagation.png` (trip "
        "propagation). Raw numbers: `results.json`.")
    return "\n".join(L) + "\n"


def plots(r: dict[str, Any], groups: dict[str, list[Subject]], out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    fig, axes = plt.subplots(1, len(groups), figsize=(13, 5.5), squeeze=False)
    for ax, (g, subs) in zip(axes[0], groups.items(), strict=False):
        subs = [s for s in subs if s.samples]
        ax.boxplot([s.samples for s in subs], vert=False, showfliers=False, whis=(1, 99))
        ax.set_yticks(range(1, len(subs) + 1), [s.name for s in subs], fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("microseconds per successful guarded call (box: quartiles, "
                      "whiskers: p1-p99)", fontsize=8)
        ax.set_title(g)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    made.append("latency.png")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, x in r["trip"].items():
        xs = sorted(x["samples_ms"])
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"distbreaker, {key}")
    ax.axvline(1000, color="grey", linestyle="--", label="interlock-cb poll interval")
    ax.set_xscale("log")
    ax.set_xlabel("ms from the trip to is_available() == False in another process")
    ax.set_ylabel("fraction of observations")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "propagation.png", dpi=110)
    plt.close(fig)
    made.append("propagation.png")
    return made


async def _side_by_side(subjects: list[Subject], stats: fp.CmdStats, plan: Plan) -> None:
    try:
        await measure(subjects, stats, plan)
    finally:
        for s in subjects:
            if s.close is not None:
                with contextlib.suppress(Exception):
                    await _run(s.close, s.is_async)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the results")
    ap.add_argument("--redis-server", default=os.environ.get("DISTBREAKER_REDIS_SERVER",
                                                             fp.DEFAULT_REDIS_SERVER))
    a = ap.parse_args(argv)
    plan = QUICK if a.quick else FULL
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    server = fp.RedisServer(a.redis_server)
    r: dict[str, Any] = {"quick": a.quick, "plan": plan.__dict__,
                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    groups: dict[str, list[Subject]] = {}
    try:
        server.start()
        assert server.proc is not None
        port, spid = server.port, server.proc.pid
        admin = redis.Redis(host="127.0.0.1", port=port)
        stats = fp.CmdStats(admin)
        sha = admin.script_load("return 1")
        r["machine"] = fp.machine_info(admin, os.cpu_count() or 1)
        pkgs = ["distbreaker", "redis", *sorted({p.package for p in peers.PEERS.values()})]
        r["versions"] = {p: _version(p) for p in pkgs}
        step = lambda what: print(f"running: {what} ...", file=sys.stderr, flush=True)  # noqa: E731
        step("side by side, sync")
        sync_peers, miss_s = peer_subjects(port, want_async=False)
        groups["sync"] = sync_subjects(port, sha) + sync_peers
        asyncio.run(_side_by_side(groups["sync"], stats, plan))
        step("side by side, asyncio")

        async def async_group() -> None:
            async_peers, miss_a = peer_subjects(port, want_async=True)
            r["missing_peers"] = miss_s + miss_a
            groups["asyncio"] = async_subjects(port, sha) + async_peers
            await _side_by_side(groups["asyncio"], stats, plan)

        asyncio.run(async_group())
        step("local fast path")
        fpp = fp.QUICK if a.quick else fp.FULL
        r["fast_path"] = fp.bench_fast_path(port, stats, fpp)
        r["half_open"] = half_open_rejection(port, stats, plan)
        step("trip propagation, 8 processes")
        r["trip"] = {key: fp._trip_rounds(port, admin, f"bench-trip-{key}", 8,
                                          plan.trip_rounds, key, None)
                     for key in ("spin", "yield")}
        step("throughput, 8 processes")
        r["throughput"] = throughput(port, spid, plan)
        step("in-process store against in-memory peers")
        r["inprocess"] = inprocess(plan)
        step("memory per breaker")
        r["memory"] = memory(port, plan)
        step("many breakers")
        r["scale"] = scale(port, plan)
        step(f"idle fleet, {plan.idle_procs} processes")
        r["idle"] = bench_idle.run(port, plan.idle_procs, list(plan.idle_breakers),
                                   plan.idle_seconds)
        step(f"transition storm, {plan.storm_procs} x {plan.storm_breakers}")
        r["storm"] = bench_storm.storm(port, plan.storm_procs, plan.storm_breakers,
                                       plan.storm_rounds)
        r["subjects"] = {g: {s.name: {"kind": s.kind, "records_in_redis": s.records_in_redis,
                                      "shares_window": s.shares_window, "note": s.note,
                                      **s.res} for s in subs} for g, subs in groups.items()}
        r["targets"] = targets(r, groups)
        r["elapsed_s"] = time.monotonic() - started
    finally:
        server.stop()
    r["plots"] = plots(r, groups, out)
    text = render(r, groups)
    (out / "RESULTS.md").write_text(text)
    (out / "results.json").write_text(json.dumps(fp._json_safe(r), indent=1) + "\n")
    print(text)
    missed = [t["name"] for t in r["targets"] if not t["met"]]
    print(f"targets missed: {len(missed)}" + ("" if not missed else ": " + "; ".join(missed)),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
