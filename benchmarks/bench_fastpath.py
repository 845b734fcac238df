"""distbreaker fast-path benchmark.

    python benchmarks/bench_fastpath.py [--json OUT] [--quick]

Starts its own redis-server on a free loopback port (stopped at the end, also on error or
SIGTERM) and measures, against the targets in benchmarks/README.md:

* the local fast path: ``is_available()`` and a rejected call, against a dict-lookup +
  ``time.monotonic()`` baseline, and the Redis commands a rejected call sends (should be 0);
* the round-trip floor: PING and a bare EVALSHA of ``return 1`` (sync and redis.asyncio);
* a successful guarded call in strict mode (sync and async), its ratio to the bare EVALSHA
  and the Redis commands it sends per call (should be exactly 1);
* the server time of record.lua versus a trivial script (INFO commandstats);
* how fast a trip reaches 8 worker processes polling ``is_available()`` (pub/sub push).

Nothing is installed; only the standard library, redis-py and distbreaker are used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import queue
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aredis

import distbreaker
from distbreaker import (
    AsyncCircuitBreaker,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitOpenError,
    CircuitState,
)
from distbreaker.stores._scripts import OPS, script_source

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_trip_worker.py"
DEFAULT_REDIS_SERVER = "/usr/bin/redis-server"

# Targets (see benchmarks/README.md).
TARGET_IS_AVAILABLE_RATIO = 3.0
TARGET_REJECT_CMDS = 0
TARGET_CALL_RATIO = 1.3
TARGET_CALL_CMDS = 1.0
TARGET_RECORD_SERVER_US = 10.0
TARGET_TRIP_P99_MS = 10.0
AIM_TRIP_P99_MS = 5.0


@dataclass(frozen=True)
class Params:
    timeit_number: int
    timeit_repeat: int
    reject_number: int
    reject_repeat: int
    blocks: int
    block_ops: int
    warmup_ops: int
    workers: int
    rounds: int
    diag_rounds: int


FULL = Params(timeit_number=200_000, timeit_repeat=15, reject_number=20_000, reject_repeat=11,
              blocks=10, block_ops=3_000, warmup_ops=1_000, workers=8, rounds=20, diag_rounds=10)
QUICK = Params(timeit_number=50_000, timeit_repeat=5, reject_number=5_000, reject_repeat=5,
               blocks=3, block_ops=500, warmup_ops=200, workers=4, rounds=5, diag_rounds=0)


# -- the private redis-server ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process that this script started; `stop()` ends exactly it."""

    def __init__(self, exe: str) -> None:
        self.exe = exe
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="distbreaker-bench-")

    def start(self, timeout: float = 10.0) -> RedisServer:
        if not os.path.exists(self.exe):
            raise SystemExit(f"redis-server not found at {self.exe} (apt-get install redis-server)")
        for _attempt in range(3):
            self.port = _free_port()
            self.proc = subprocess.Popen(
                [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5) as c:
                        c.ping()
                    return self
                except redis.ConnectionError:
                    time.sleep(0.02)
            self._end_process()  # port taken in the meantime, or too slow: try another port
        raise RuntimeError("could not start redis-server")

    def _end_process(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.proc = None

    def stop(self) -> None:
        self._end_process()
        shutil.rmtree(self.dir, ignore_errors=True)


def private_server() -> RedisServer:
    """A started redis-server of this script's on a free loopback port (the binary from
    DISTBREAKER_REDIS_SERVER, else DEFAULT_REDIS_SERVER); the caller stops it."""
    return RedisServer(os.environ.get("DISTBREAKER_REDIS_SERVER", DEFAULT_REDIS_SERVER)).start()


# -- statistics and command accounting ----------------------------------------------------


def pct(sorted_xs: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_xs:
        return math.nan
    k = max(0, min(len(sorted_xs) - 1, math.ceil(q / 100.0 * len(sorted_xs)) - 1))
    return sorted_xs[k]


def summary(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"n": len(s), "median": pct(s, 50), "p90": pct(s, 90), "p99": pct(s, 99),
            "min": s[0] if s else math.nan, "max": s[-1] if s else math.nan,
            "mean": statistics.fmean(s) if s else math.nan}


def _script_internal_commands() -> frozenset[str]:
    """Commands that distbreaker's Lua scripts run inside Redis. INFO commandstats counts
    those too, so they are told apart from the commands the client sent."""
    names: set[str] = set()
    for op in OPS:
        names |= {m.lower() for m in re.findall(
            r"redis\.call\s*(?:\(|,)\s*'([A-Za-z]+)'", script_source(op))}
    return frozenset(names)


SCRIPT_INTERNAL = _script_internal_commands()
ADMIN_ONLY = frozenset({"info"})  # the benchmark's own INFO calls


class CmdStats:
    """INFO commandstats through a separate admin connection."""

    def __init__(self, admin: redis.Redis) -> None:
        self.admin = admin

    def snap(self) -> dict[str, tuple[int, int]]:
        raw = self.admin.info("commandstats")
        return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                for k, v in raw.items()}


@dataclass
class CmdDelta:
    calls: dict[str, int] = field(default_factory=dict)
    usec: dict[str, int] = field(default_factory=dict)

    def add(self, before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> None:
        for k, (c, u) in after.items():
            c0, u0 = before.get(k, (0, 0))
            if c != c0:
                self.calls[k] = self.calls.get(k, 0) + c - c0
                self.usec[k] = self.usec.get(k, 0) + u - u0

    def client_sent(self) -> dict[str, int]:
        """Commands the benchmarked client sent (not run inside a script, not our INFO)."""
        return {k: v for k, v in self.calls.items()
                if k not in SCRIPT_INTERNAL and k not in ADMIN_ONLY}

    def script_internal(self) -> dict[str, int]:
        return {k: v for k, v in self.calls.items() if k in SCRIPT_INTERNAL}

    def usec_per_call(self, cmd: str) -> float:
        c = self.calls.get(cmd, 0)
        return self.usec.get(cmd, 0) / c if c else math.nan


@contextlib.contextmanager
def counting(stats: CmdStats, into: CmdDelta) -> Iterator[None]:
    before = stats.snap()
    try:
        yield
    finally:
        into.add(before, stats.snap())


def _config(**kw: Any) -> CircuitBreakerConfig:
    """A config; `redis_timeout` (if this distbreaker has it) raised for the breakers whose
    Redis latency is not what is measured, so that a loaded machine does not send them to
    their local fallback in the middle of a measurement."""
    try:
        return CircuitBreakerConfig(**kw)
    except TypeError:  # an older distbreaker without that field
        kw.pop("redis_timeout", None)
        return CircuitBreakerConfig(**kw)


def _outages(b: Any) -> int:
    """Redis outages the breaker's store guard has seen (0 if it has none)."""
    return int(getattr(getattr(b, "_guard", None), "outages", 0) or 0)


# -- section 1: the local fast path --------------------------------------------------------


def _timeit_ns(stmt: str, g: dict[str, Any], number: int, repeat: int) -> dict[str, float]:
    t = timeit.Timer(stmt, globals=g)
    t.timeit(max(1, number // 10))  # warm up
    per_op = sorted(x / number * 1e9 for x in t.repeat(repeat=repeat, number=number))
    return {"median": statistics.median(per_op), "best": per_op[0], "worst": per_op[-1],
            "repeat": repeat, "number": number}


def _boom() -> None:
    raise RuntimeError("boom")


def _noop() -> None:
    return None


def bench_fast_path(port: int, stats: CmdStats, p: Params) -> dict[str, Any]:
    res: dict[str, Any] = {}
    cfg = _config(recovery_timeout=600.0, max_recovery_timeout=600.0, max_staleness=60.0,
                  redis_timeout=2.0)
    client = redis.Redis(host="127.0.0.1", port=port)
    b = CircuitBreaker("bench-fast", cfg, redis=client)
    try:
        b.reset()
        time.sleep(0.2)  # let the listener subscribe and do its first refresh
        d = {"k": 1}
        g: dict[str, Any] = {"d": d, "monotonic": time.monotonic, "b": b, "f": _noop,
                             "E": CircuitOpenError}
        res["baseline_ns"] = _timeit_ns('d["k"]; monotonic()', g, p.timeit_number,
                                        p.timeit_repeat)
        assert b.is_available() and b.get_state() is CircuitState.CLOSED
        res["is_available_closed_ns"] = _timeit_ns("b.is_available()", g, p.timeit_number,
                                                   p.timeit_repeat)
        # Trip it the normal way (failures): OPEN for 600 s, retry_after computed locally.
        for _ in range(cfg.failure_threshold):
            with contextlib.suppress(RuntimeError):
                b.call(_boom)
        assert b.get_state() is CircuitState.OPEN and not b.is_available(), b.get_state()
        res["is_available_open_ns"] = _timeit_ns("b.is_available()", g, p.timeit_number,
                                                 p.timeit_repeat)
        reject_stmt = "try:\n    b.call(f)\nexcept E:\n    pass"
        time.sleep(0.05)
        delta = CmdDelta()
        with counting(stats, delta):
            r = _timeit_ns(reject_stmt, g, p.reject_number, p.reject_repeat)
        n = max(1, p.reject_number // 10) + p.reject_number * p.reject_repeat  # warm-up + runs
        res["reject_open"] = {**r, "median_us": r["median"] / 1000, "best_us": r["best"] / 1000,
                              "calls": n, "redis_commands": sum(delta.client_sent().values()),
                              "redis_commands_by_name": delta.client_sent(),
                              "script_internal": delta.script_internal()}
        # Forced open (operator override): retry_after is None, same local path otherwise.
        b.force_open()
        assert not b.is_available()
        delta = CmdDelta()
        with counting(stats, delta):
            r = _timeit_ns(reject_stmt, g, p.reject_number, p.reject_repeat)
        res["reject_forced"] = {**r, "median_us": r["median"] / 1000,
                                "best_us": r["best"] / 1000, "calls": n,
                                "redis_commands": sum(delta.client_sent().values()),
                                "redis_commands_by_name": delta.client_sent()}
        b.reset()
    finally:
        b.close()  # client left open: see bench_sync_calls
    # timeit's convention: the best repeat is the least disturbed one; the median ratio is
    # kept too (it moves with the machine's load).
    for key in ("closed", "open"):
        x = res[f"is_available_{key}_ns"]
        res[f"is_available_{key}_ratio"] = x["best"] / res["baseline_ns"]["best"]
        res[f"is_available_{key}_ratio_median"] = x["median"] / res["baseline_ns"]["median"]
    return res


# -- sections 2-4: round trips, guarded calls, server time -------------------------------


def _sample_sync(fn: Callable[[], Any], n: int) -> list[float]:
    pc = time.perf_counter_ns
    out = [0.0] * n
    for i in range(n):
        t = pc()
        fn()
        out[i] = (pc() - t) / 1000.0
    return out


async def _sample_async(fn: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    pc = time.perf_counter_ns
    out = [0.0] * n
    for i in range(n):
        t = pc()
        await fn()
        out[i] = (pc() - t) / 1000.0
    return out


def _subject_result(samples: list[float], delta: CmdDelta, calls: int) -> dict[str, Any]:
    sent = delta.client_sent()
    internal = delta.script_internal()
    return {
        "us": summary(samples),
        "calls": calls,
        "redis_commands": sum(sent.values()),
        "redis_commands_per_call": sum(sent.values()) / calls if calls else math.nan,
        "redis_commands_by_name": sent,
        "script_internal_per_call": {k: v / calls for k, v in sorted(internal.items())},
        "evalsha_server_usec_per_call": delta.usec_per_call("evalsha"),
        # distbreaker's own calls: FCALL (Redis 7+), else EVALSHA
        "script_server_usec_per_call": delta.usec_per_call("fcall") if "fcall" in delta.calls
        else delta.usec_per_call("evalsha"),
        "ping_server_usec_per_call": delta.usec_per_call("ping"),
    }


# A script that returns a reply of record.lua's shape (14 fields), to price the RESP parse.
REPLY14_LUA = "return {1, 'closed', '', 0, 0, 1795745359566, '', 0, -1, 101, 0, 0, 0, ''}"


def _ladder_args(b: Any) -> tuple[Any, list[Any], list[Any]]:
    """The breaker's store and the KEYS/ARGV of a real record call (a success under the
    current generation): the same bytes `breaker.call` sends. Uses private API; the ladder
    is a diagnostic and is skipped if the internals change."""
    call = b._core.calls.build("record", "", b.snapshot.generation, 0, "", 0)
    return b._store, list(call.keys), list(call.args)


def bench_sync_calls(port: int, stats: CmdStats, sha_trivial: str, sha_reply14: str,
                     p: Params) -> dict[str, Any]:
    cfg = CircuitBreakerConfig(max_staleness=60.0)  # default redis_timeout: as users run it
    client = redis.Redis(host="127.0.0.1", port=port)
    bclient = redis.Redis(host="127.0.0.1", port=port)
    b = CircuitBreaker("bench-sync", cfg, redis=bclient)
    subjects: dict[str, Callable[[], Any]] = {
        "ping": client.ping,
        "evalsha": lambda: client.evalsha(sha_trivial, 0),
        "call": lambda: b.call(_noop),
    }
    try:
        b.reset()
        b.call(_noop)
        store, keys, args = _ladder_args(b)
        gen = b.snapshot.generation
        subjects["evalsha_args"] = lambda: client.evalsha(sha_trivial, len(keys), *keys, *args)
        subjects["evalsha_reply14"] = lambda: client.evalsha(sha_reply14, len(keys), *keys,
                                                             *args)
        subjects["record_script"] = lambda: store.run(
            b._core.calls.build("record", "", gen, 0, "", 0))
    except Exception as e:  # pragma: no cover - internals changed
        print(f"note: cost ladder skipped ({e!r})", file=sys.stderr)
    samples: dict[str, list[float]] = {k: [] for k in subjects}
    deltas = {k: CmdDelta() for k in subjects}
    try:
        for fn in subjects.values():
            _sample_sync(fn, p.warmup_ops)  # connections made, scripts loaded, caches warm
        time.sleep(0.2)  # the listener has subscribed and refreshed: nothing more in flight
        outages0 = _outages(b)
        for _ in range(p.blocks):  # interleaved blocks: drift hits every subject alike
            for k, fn in subjects.items():
                with counting(stats, deltas[k]):
                    samples[k] += _sample_sync(fn, p.block_ops)
        outages = _outages(b) - outages0
        assert b.get_state() is CircuitState.CLOSED
    finally:
        # Not bclient.close(): the listener thread notices close() only at its next tick,
        # and closing its client under it logs a spurious "listener lost Redis" warning.
        b.close()
        client.close()
    res = {k: _subject_result(samples[k], deltas[k], len(samples[k])) for k in subjects}
    res["call"]["redis_outages"] = outages
    return res


async def _bench_async_calls(port: int, stats: CmdStats, sha_trivial: str, sha_reply14: str,
                             p: Params) -> dict[str, Any]:
    cfg = CircuitBreakerConfig(max_staleness=60.0)  # default redis_timeout: as users run it
    client = aredis.Redis(host="127.0.0.1", port=port)
    bclient = aredis.Redis(host="127.0.0.1", port=port)
    b = AsyncCircuitBreaker("bench-async", cfg, redis=bclient)

    async def anoop() -> None:
        return None

    subjects: dict[str, Callable[[], Awaitable[Any]]] = {
        "ping": client.ping,
        "evalsha": lambda: client.evalsha(sha_trivial, 0),
        "call": lambda: b.call(anoop),
    }
    samples: dict[str, list[float]] = {k: [] for k in subjects}
    try:
        await b.reset()
        await b.refresh()
        await b.call(anoop)
        try:
            store, keys, args = _ladder_args(b)
            gen = b.snapshot.generation
            subjects["evalsha_args"] = lambda: client.evalsha(sha_trivial, len(keys), *keys,
                                                              *args)
            subjects["evalsha_reply14"] = lambda: client.evalsha(sha_reply14, len(keys), *keys,
                                                                 *args)
            subjects["record_script"] = lambda: store.run(
            b._core.calls.build("record", "", gen, 0, "", 0))
        except Exception as e:  # pragma: no cover - internals changed
            print(f"note: cost ladder skipped ({e!r})", file=sys.stderr)
        samples = {k: [] for k in subjects}
        deltas = {k: CmdDelta() for k in subjects}
        for fn in subjects.values():
            await _sample_async(fn, p.warmup_ops)
        await asyncio.sleep(0.2)  # the listener task has subscribed and refreshed
        outages0 = _outages(b)
        for _ in range(p.blocks):
            for k, fn in subjects.items():
                # INFO runs on the sync admin connection: it blocks the loop, between blocks
                with counting(stats, deltas[k]):
                    samples[k] += await _sample_async(fn, p.block_ops)
        outages = _outages(b) - outages0
        assert b.get_state() is CircuitState.CLOSED
    finally:
        await b.close()
        await client.aclose()
        # Stop the listener task before closing its client, or it logs "listener lost Redis"
        # (it would notice close() only at its next tick, up to 1 s later).
        task = getattr(b._engine._hub, "task", None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await bclient.aclose()
    res = {k: _subject_result(samples[k], deltas[k], len(samples[k])) for k in subjects}
    res["call"]["redis_outages"] = outages
    return res


def bench_async_calls(port: int, stats: CmdStats, sha_trivial: str, sha_reply14: str,
                      p: Params) -> dict[str, Any]:
    return asyncio.run(_bench_async_calls(port, stats, sha_trivial, sha_reply14, p))


# -- section 5: trip propagation across processes -------------------------------------------


class Worker:
    """One `_trip_worker.py` subprocess; a reader thread turns its stdout into a queue."""

    def __init__(self, port: int, name: str, switch_interval: float | None) -> None:
        cmd = [sys.executable, str(WORKER), "--port", str(port), "--name", name]
        if switch_interval:
            cmd += ["--switch-interval", repr(switch_interval)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("eof")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str, timeout: float = 15.0) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"worker {self.proc.pid}: no {prefix!r} in {timeout}s") from None
        if not line.startswith(prefix):
            raise RuntimeError(f"worker {self.proc.pid}: expected {prefix!r}, got {line!r}")
        return line

    def stop(self) -> None:
        p = self.proc
        if p.poll() is None:
            with contextlib.suppress(Exception):
                self.send("quit")
                assert p.stdin is not None
                p.stdin.close()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def _trip_rounds(port: int, admin: redis.Redis, name: str, nworkers: int, rounds: int,
                 mode: str, switch_interval: float | None) -> dict[str, Any]:
    cfg = _config(failure_threshold=1, recovery_timeout=600.0, max_recovery_timeout=600.0,
                  max_staleness=60.0, redis_timeout=2.0)
    client = redis.Redis(host="127.0.0.1", port=port)
    b = CircuitBreaker(name, cfg, redis=client)
    b.reset()
    workers: list[Worker] = []
    lat_ms: list[float] = []
    by_method: dict[str, list[float]] = {"force_open": [], "failure": []}
    trip_rtt_ms: list[float] = []
    missed = 0
    rng = random.Random(7)
    try:
        workers = [Worker(port, name, switch_interval) for _ in range(nworkers)]
        for w in workers:
            w.expect("hello closed", timeout=30.0)
        # Every worker's listener (plus ours) is subscribed before the first round.
        deadline = time.monotonic() + 15.0
        while True:
            subs = dict(admin.pubsub_numsub(b.channel)).get(b.channel.encode(), 0)
            if subs >= nworkers + 1:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {subs} subscribers after 15 s")
            time.sleep(0.02)
        time.sleep(0.2)
        for r in range(rounds):
            method = "force_open" if r % 2 == 0 else "failure"
            for w in workers:
                w.send(f"go {mode}")
            for w in workers:
                w.expect("spinning")
            time.sleep(0.03 + 0.03 * rng.random())  # every worker is deep in its loop
            t0 = time.monotonic()
            if method == "force_open":
                b.force_open()
            else:
                with contextlib.suppress(RuntimeError):
                    b.call(_boom)
            t1 = time.monotonic()
            trip_rtt_ms.append((t1 - t0) * 1000)
            if b.is_available():
                raise RuntimeError(f"the trip did not take ({method}): {b.get_state()}")
            for w in workers:
                line = w.expect("", timeout=10.0)
                parts = line.split()
                if parts[0] == "seen":
                    ms = (float(parts[1]) - t0) * 1000
                    lat_ms.append(ms)
                    by_method[method].append(ms)
                else:
                    missed += 1
            b.reset()  # back to CLOSED, announced: workers re-arm on the next "go"
    finally:
        for w in workers:
            w.stop()
        b.close()
    return {
        "mode": mode,
        "workers": nworkers,
        "rounds": rounds,
        "switch_interval_s": switch_interval or sys.getswitchinterval(),
        "latency_ms": summary(lat_ms),
        "latency_ms_by_method": {k: summary(v) for k, v in by_method.items() if v},
        "missed": missed,
        "trip_call_rtt_ms": summary(trip_rtt_ms),
        "samples_ms": [round(x, 4) for x in lat_ms],
    }


TRIP_VARIANTS = (
    # key, loop mode, workers (None: --workers), GIL switch interval in the workers, label
    ("spin", "spin", None, None, "tight is_available() loop (the target)"),
    ("yield", "yield", None, None, "is_available(); sleep(0)       [diag]"),
    ("spin_si_0.5ms", "spin", None, 0.0005, "tight loop, switchinterval 0.5ms [diag]"),
    ("spin_1_worker", "spin", 1, None, "tight loop, 1 worker only       [diag]"),
)


def bench_trip(port: int, admin: redis.Redis, p: Params) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for key, mode, workers, si, _label in TRIP_VARIANTS:
        rounds = p.rounds if key == "spin" else p.diag_rounds
        if rounds:
            res[key] = _trip_rounds(port, admin, f"bench-trip-{key}", workers or p.workers,
                                    rounds, mode, si)
    return res


# -- how busy the machine was with other work ----------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_snapshot(server_pid: int | None) -> dict[str, float] | None:
    """Machine-wide busy and steal CPU seconds, and the CPU seconds of this benchmark
    (itself, its waited-for workers, its redis-server)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy = sum(v) - v[3] - v[4]  # all but idle and iowait
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        if server_pid:
            with open(f"/proc/{server_pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ours += (int(fields[11]) + int(fields[12])) / _TICK
        return {"wall": time.monotonic(), "busy": busy / _TICK, "steal": v[7] / _TICK,
                "ours": ours}
    except (OSError, ValueError, IndexError):
        return None


def _foreign_load(a: dict[str, float] | None, b: dict[str, float] | None) -> dict[str, float]:
    """Share of the machine's CPU used by other processes between two snapshots (%)."""
    if a is None or b is None:
        return {}
    cap = (b["wall"] - a["wall"]) * (os.cpu_count() or 1)
    other = (b["busy"] - a["busy"]) - (b["ours"] - a["ours"])
    return {"other_processes_pct": max(0.0, 100.0 * other / cap),
            "steal_pct": 100.0 * (b["steal"] - a["steal"]) / cap,
            "seconds": b["wall"] - a["wall"]}


# -- reporting ---------------------------------------------------------------------------------


def machine_info(admin: redis.Redis, nproc: int) -> dict[str, Any]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    srv = admin.info("server")
    conn = admin.connection_pool.get_connection()
    try:
        resp, parser = getattr(conn, "protocol", None), type(conn._parser).__name__
    finally:
        admin.connection_pool.release(conn)
    try:
        import hiredis  # noqa: F401
        has_hiredis = True
    except ImportError:
        has_hiredis = False
    return {
        "cpu_model": cpu,
        "nproc": nproc,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "redis_py": redis.__version__,
        "redis_server": srv.get("redis_version"),
        "resp": resp or 2,
        "parser": parser,
        "hiredis": has_hiredis,
        "distbreaker": distbreaker.__version__,
        "gil_switch_interval_s": sys.getswitchinterval(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def _ok(met: bool) -> str:
    return "ok" if met else "MISSED"


def build_targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    fp, sc, ac = r["fast_path"], r["sync"], r["async"]
    t = r["trip"]["spin"]
    rec = sc["call"]["script_server_usec_per_call"]
    items = [
        ("is_available() CLOSED / baseline", fp["is_available_closed_ratio"], "<=",
         TARGET_IS_AVAILABLE_RATIO),
        ("is_available() OPEN / baseline", fp["is_available_open_ratio"], "<=",
         TARGET_IS_AVAILABLE_RATIO),
        ("rejected call: Redis commands", fp["reject_open"]["redis_commands"], "<=",
         TARGET_REJECT_CMDS),
        ("rejected call (forced): Redis commands", fp["reject_forced"]["redis_commands"], "<=",
         TARGET_REJECT_CMDS),
        ("sync call median / bare EVALSHA median", sc["call"]["us"]["median"]
         / sc["evalsha"]["us"]["median"], "<=", TARGET_CALL_RATIO),
        ("async call median / bare EVALSHA median", ac["call"]["us"]["median"]
         / ac["evalsha"]["us"]["median"], "<=", TARGET_CALL_RATIO),
        ("sync call: Redis commands per call", sc["call"]["redis_commands_per_call"], "==",
         TARGET_CALL_CMDS),
        ("async call: Redis commands per call", ac["call"]["redis_commands_per_call"], "==",
         TARGET_CALL_CMDS),
        ("record.lua server time (us/call)", rec, "<=", TARGET_RECORD_SERVER_US),
        ("trip propagation p99 (ms)", t["latency_ms"]["p99"] if not t["missed"] else math.inf,
         "<", TARGET_TRIP_P99_MS),
    ]
    out = []
    for name, value, op, target in items:
        met = {"<=": value <= target, "<": value < target, "==": value == target}[op]
        out.append({"name": name, "value": value, "op": op, "target": target, "met": met})
    return out


LADDER = (
    ("evalsha", "EVALSHA 'return 1', no args (floor)"),
    ("evalsha_args", "+ record's 3 KEYS/10 ARGV (pack, send, argv)"),
    ("evalsha_reply14", "+ a 14-field reply (RESP parse)"),
    ("record_script", "+ record's work in Redis (FCALL, raw conn)"),
    ("call", "+ distbreaker in Python = breaker.call"),
)


def render(r: dict[str, Any]) -> str:
    m, fp, sc, ac, tr = r["machine"], r["fast_path"], r["sync"], r["async"], r["trip"]
    L: list[str] = []
    add = L.append
    add(f"distbreaker fast-path benchmark{' (quick)' if r['quick'] else ''}"
        f"{'' if r['pin'] == 'none' else ', pinned: ' + r['pin']}")
    add(f"  {m['cpu_model']}, {m['nproc']} CPUs, {m['python_implementation']} {m['python']}, "
        f"redis-py {m['redis_py']} (RESP{m['resp']}, parser {m['parser']}), "
        f"redis-server {m['redis_server']}")
    fl = m.get("foreign_load", {})
    if fl.get("sections_1_3"):
        a_, b_ = fl["sections_1_3"], fl.get("section_4") or {}
        warn = max(a_["other_processes_pct"], b_.get("other_processes_pct", 0)) > 10
        add(f"  other processes used {a_['other_processes_pct']:.0f}% of the CPUs during "
            f"sections 1-3, {b_.get('other_processes_pct', math.nan):.0f}% during 4 "
            f"(steal {a_['steal_pct']:.0f}%/{b_.get('steal_pct', math.nan):.0f}%)"
            + ("  << NOISY: numbers are inflated" if warn else ""))
    add("")
    add("1. Local fast path (timeit: median and best of repeats; ratio of the bests)")
    base = fp["baseline_ns"]
    add(f"   {'what':44} {'median':>10} {'best':>10} {'ratio':>7}  target")
    blabel = 'baseline  d["k"]; monotonic()'
    add(f"   {blabel:44} {base['median']:8.1f}ns {base['best']:8.1f}ns {1.0:6.2f}x")
    for key, label in (("closed", "is_available()  CLOSED"), ("open", "is_available()  OPEN")):
        x = fp[f"is_available_{key}_ns"]
        ratio = fp[f"is_available_{key}_ratio"]
        add(f"   {label:44} {x['median']:8.1f}ns {x['best']:8.1f}ns {ratio:6.2f}x  "
            f"<= {TARGET_IS_AVAILABLE_RATIO:g}x {_ok(ratio <= TARGET_IS_AVAILABLE_RATIO)}")
    for key, label in (("reject_open", "rejected breaker.call(fn)  OPEN (tripped)"),
                       ("reject_forced", "rejected breaker.call(fn)  forced open")):
        x = fp[key]
        add(f"   {label:44} {x['median_us']:8.2f}us {x['best_us']:8.2f}us   "
            f"Redis commands: {x['redis_commands']} in {x['calls']} calls (target 0) "
            f"{_ok(x['redis_commands'] == 0)}")
    add("")
    add("2. Round trips and successful guarded calls (per op in us; interleaved blocks)")
    add(f"   {'what':44} {'median':>8} {'p99':>8} {'ratio':>7} {'cmds/call':>10}  target")
    for label, res in (("sync", sc), ("async", ac)):
        ev = res["evalsha"]["us"]["median"]
        for key, what in (("ping", "PING"), ("evalsha", "EVALSHA 'return 1'  (floor)"),
                          ("call", "breaker.call(noop)  strict, CLOSED")):
            x = res[key]
            ratio = x["us"]["median"] / ev
            line = (f"   {label + ' ' + what:44} {x['us']['median']:8.1f} {x['us']['p99']:8.1f} "
                    f"{ratio:6.2f}x {x['redis_commands_per_call']:10.3f}")
            if key == "call":
                met = ratio <= TARGET_CALL_RATIO and x["redis_commands_per_call"] == 1.0
                line += (f"  <= {TARGET_CALL_RATIO:g}x & 1 cmd {_ok(met)}"
                         f" (p99 {x['us']['p99'] / res['evalsha']['us']['p99']:.2f}x)")
            add(line)
    for label, res in (("sync", sc), ("async", ac)):
        if res["call"].get("redis_outages"):
            add(f"   !! {label}: the breaker saw {res['call']['redis_outages']} Redis outage(s) "
                "(a call slower than redis_timeout): calls in between ran on the local "
                "fallback, which sends nothing; cmds/call < 1 then")
    if "record_script" in sc:
        add("")
        add("   where a guarded call's time goes (median us; step = difference of medians;")
        add("   server = INFO commandstats FCALL/EVALSHA usec_per_call, inside the total)")
        add(f"   {'':44} {'sync':>8} {'step':>7} {'server':>7} {'async':>8} {'step':>7}")
        prev_s = prev_a = None
        for key, what in LADDER:
            if key not in sc or key not in ac:
                continue
            a_, s_ = ac[key]["us"]["median"], sc[key]["us"]["median"]
            srv = sc[key]["script_server_usec_per_call"]
            st_s = "" if prev_s is None else f"{s_ - prev_s:+7.1f}"
            st_a = "" if prev_a is None else f"{a_ - prev_a:+7.1f}"
            add(f"   {what:44} {s_:8.1f} {st_s:>7} {srv:7.2f} {a_:8.1f} {st_a:>7}")
            prev_s, prev_a = s_, a_
    add("")
    add("3. Server time per call (INFO commandstats usec_per_call; distbreaker: FCALL)")
    triv = sc["evalsha"]["evalsha_server_usec_per_call"]
    for label, res in (("sync", sc), ("async", ac)):
        rec = res["call"]["script_server_usec_per_call"]
        add(f"   {label:5}  record {rec:6.2f} us   bare 'return 1' "
            f"{res['evalsha']['evalsha_server_usec_per_call']:5.2f} us   "
            f"difference {rec - triv:5.2f} us   (DESIGN: 5-10 us) "
            f"{_ok(rec <= TARGET_RECORD_SERVER_US)}")
    inner = sc["call"]["script_internal_per_call"]
    add("   commands run inside record.lua per call: "
        + ", ".join(f"{k} {v:.2f}" for k, v in inner.items()))
    add("")
    t = tr["spin"]
    p_diag = r["params"]["diag_rounds"]
    add(f"4. Trip propagation: {t['workers']} worker processes x {t['rounds']} rounds "
        f"(diagnostics: {p_diag} rounds), half force_open(), half a failure trip")
    add("   ms from the parent's trip call to is_available() == False in each worker")
    add(f"   {'loop in the workers':44} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} {'missed':>6}")
    for key, _mode, _w, _si, label in TRIP_VARIANTS:
        if key not in tr:
            continue
        x = tr[key]
        label = f"{x['workers']}x {label}"
        s = x["latency_ms"]
        line = (f"   {label:44} {s['median']:7.2f} {s['p90']:7.2f} "
                f"{s['p99']:7.2f} {s['max']:7.2f} {x['missed']:6d}")
        if key == "spin":
            met = s["p99"] < TARGET_TRIP_P99_MS and not x["missed"]
            line += f"  p99 < {TARGET_TRIP_P99_MS:g} ms (aim {AIM_TRIP_P99_MS:g}) {_ok(met)}"
        add(line)
    add(f"   parent's trip call round trip: median {t['trip_call_rtt_ms']['median']:.3f} ms")
    add("")
    missed = [x for x in r["targets"] if not x["met"]]
    add("Targets: " + ("all met" if not missed else
                       f"{len(missed)} missed: " + "; ".join(
                           f"{x['name']} = {x['value']:.3g} (want {x['op']} {x['target']:g})"
                           for x in missed)))
    return "\n".join(L)


def _json_safe(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def _set_affinity(pid: int, cpus: set[int]) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(pid, cpus)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    ap.add_argument("--quick", action="store_true", help="a short run (< 20 s), for smoke tests")
    ap.add_argument("--pin", choices=("none", "same", "split"), default="none",
                    help="for sections 1-3: run this process and redis-server on the same CPU "
                         "(same) or on two different CPUs (split); default: the scheduler's "
                         "choice. The trip test always runs unpinned.")
    ap.add_argument("--redis-server", default=os.environ.get("DISTBREAKER_REDIS_SERVER",
                                                             DEFAULT_REDIS_SERVER))
    ap.add_argument("--workers", type=int, default=None, help="trip-propagation workers")
    ap.add_argument("--rounds", type=int, default=None, help="trip-propagation rounds")
    a = ap.parse_args(argv)
    p = QUICK if a.quick else FULL
    if a.workers or a.rounds:
        from dataclasses import replace
        p = replace(p, workers=a.workers or p.workers, rounds=a.rounds or p.rounds)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    all_cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
    cpus = sorted(all_cpus)
    if a.pin != "none" and len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs")
    server = RedisServer(a.redis_server)
    results: dict[str, Any] = {"quick": a.quick, "pin": a.pin, "params": p.__dict__}
    try:
        server.start()
        if a.pin != "none":
            assert server.proc is not None
            _set_affinity(0, {cpus[0]})  # before any thread of ours starts: they inherit it
            _set_affinity(server.proc.pid, {cpus[0] if a.pin == "same" else cpus[1]})
        admin = redis.Redis(host="127.0.0.1", port=server.port)
        stats = CmdStats(admin)
        sha_trivial = admin.script_load("return 1")
        sha_reply14 = admin.script_load(REPLY14_LUA)
        results["machine"] = machine_info(admin, len(cpus) or os.cpu_count() or 1)
        spid = server.proc.pid if server.proc else None
        c0 = _cpu_snapshot(spid)
        print("running: local fast path ...", file=sys.stderr, flush=True)
        results["fast_path"] = bench_fast_path(server.port, stats, p)
        print("running: sync round trips and calls ...", file=sys.stderr, flush=True)
        results["sync"] = bench_sync_calls(server.port, stats, sha_trivial, sha_reply14, p)
        print("running: async round trips and calls ...", file=sys.stderr, flush=True)
        results["async"] = bench_async_calls(server.port, stats, sha_trivial, sha_reply14, p)
        c1 = _cpu_snapshot(spid)
        if a.pin != "none":
            assert server.proc is not None
            _set_affinity(0, all_cpus)
            _set_affinity(server.proc.pid, all_cpus)
        gc.collect()
        print("running: trip propagation ...", file=sys.stderr, flush=True)
        results["trip"] = bench_trip(server.port, admin, p)
        results["machine"]["foreign_load"] = {
            "sections_1_3": _foreign_load(c0, c1), "section_4": _foreign_load(c1,
                                                                            _cpu_snapshot(spid))}
        results["targets"] = build_targets(results)
        results["elapsed_s"] = time.monotonic() - started
    finally:
        server.stop()
    print(render(results))
    print(f"(took {results['elapsed_s']:.1f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps(_json_safe(results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
