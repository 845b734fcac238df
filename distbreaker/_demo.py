"""`distbreaker demo`: a small voice fleet rides out a vendor outage on a shared breaker.

The parent finds a Redis (the given URL, else a private ``redis-server`` on a free port,
else an embedded Redis-protocol server from fakeredis), spawns worker processes, shows a
live table, and prints a summary. Each worker serves simulated voice requests (speech to
text, then text to speech) through `CircuitBreakerManager.call_with_fallback`; the
``openai`` provider fails completely for part of the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

from ._config import CircuitBreakerConfig, CircuitState

PREFIX = "distbreaker-demo"
PROVIDERS = ("openai", "google", "azure")
FAILING = "openai"
CONFIG = CircuitBreakerConfig(
    failure_threshold=5, recovery_timeout=1.5, success_threshold=1, half_open_max_calls=1,
    failure_rate_threshold=0.5, minimum_calls=20, window_size=10, backoff_multiplier=1.5,
    max_recovery_timeout=3.0, backoff_jitter=0.1, probe_lease=2.0, max_staleness=1.0,
    key_ttl=600,
)
COUNTERS = ("calls", "failures", "rejected", "probes", "served_first", "fallback")


def outage_window(duration: float) -> tuple[float, float]:
    """The scripted outage of the failing provider: from 20% to 50% of the run."""
    return round(duration * 0.2, 3), round(duration * 0.5, 3)


# -- finding a Redis --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ping(url: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            return
        except redis.ConnectionError:
            if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"could not reach the demo's Redis at {url}") from None
            time.sleep(0.02)


@contextlib.contextmanager
def demo_redis(url: str | None) -> Iterator[tuple[str, str]]:
    """Yield (url, kind): the given URL, a private redis-server, or the embedded server.
    Whatever is started here is stopped on the way out, also on Ctrl-C."""
    if url:
        _wait_ping(url)
        yield url, "given"
        return
    exe = shutil.which("redis-server")
    if exe:
        port = _free_port()
        tmp = tempfile.mkdtemp(prefix="distbreaker-demo-")
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", tmp, "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            _wait_ping(url, proc)
            yield url, "redis-server"
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
            shutil.rmtree(tmp, ignore_errors=True)
        return
    try:
        from fakeredis import TcpFakeServer
    except ImportError:
        raise SystemExit(
            "distbreaker demo: no redis-server on PATH and no embedded server: "
            "install it with  pip install 'distbreaker[demo]'  or pass --redis-url"
        ) from None
    server = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, name="distbreaker-demo-redis",
                         daemon=True)
    t.start()
    try:
        url = f"redis://127.0.0.1:{server.server_address[1]}/0"
        _wait_ping(url)
        yield url, "embedded"
    finally:
        server.shutdown()
        server.server_close()


# -- the worker process -----------------------------------------------------------------


class ProviderError(Exception):
    """A simulated vendor failure (HTTP 503)."""


def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="distbreaker-demo-worker")
    ap.add_argument("--url", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--id", type=int, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--seed", type=int, required=True)
    a = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    import redis

    from .providers import CircuitBreakerManager

    rng = random.Random(a.seed)
    r = redis.Redis.from_url(a.url)
    k_stats, k_events, k_go = (f"{PREFIX}:{a.run}:{x}" for x in ("stats", "events", "go"))
    start_box: list[float] = []

    def on_change(name: str, old: CircuitState, new: CircuitState) -> None:
        t = time.monotonic() - start_box[0] if start_box else 0.0
        r.rpush(k_events, json.dumps({"breaker": name, "from": old.value, "to": new.value,
                                      "t": round(t, 3), "worker": a.id}))

    m = CircuitBreakerManager(r, CONFIG, prefix=PREFIX, on_state_change=on_change)
    for p in PROVIDERS:
        m.register_provider(p)
    r.incr(f"{PREFIX}:{a.run}:ready")
    item = r.blpop([k_go], timeout=60)
    if item is None:
        return 1
    start = float(item[1])
    start_box.append(start)
    out_from, out_to = outage_window(a.duration)
    stats: dict[str, int] = {}

    def bump(key: str, n: int = 1) -> None:
        stats[key] = stats.get(key, 0) + n

    def provider_call(kind: str) -> Any:
        def call(p: Any) -> str:
            b = m.get_breaker(p)
            snap = b.snapshot
            if snap.state is CircuitState.HALF_OPEN:  # only probes run while half-open
                bump(f"{p}:probes")
                bump(f"{p}:probes@{snap.generation}")
            bump(f"{p}:calls")
            time.sleep(rng.uniform(0.002, 0.006))
            t = time.monotonic() - start
            if p == FAILING and out_from <= t < out_to:
                bump(f"{p}:failures")
                raise ProviderError(f"{p} {kind}: 503 Service Unavailable")
            return f"{kind} by {p}"

        return call

    stt, tts = provider_call("stt"), provider_call("tts")
    last_flush = time.monotonic()
    end = start + a.duration
    while time.monotonic() < end:
        t = time.monotonic() - start
        in_outage = out_from <= t < out_to
        ok = True
        for fn in (stt, tts):
            try:
                served_by = m.call_with_fallback(PROVIDERS, fn).rsplit(" ", 1)[1]
                if served_by == PROVIDERS[0]:
                    bump("served_first")
                else:
                    bump("fallback")
                    bump(f"{served_by}:fallbacks")
            except Exception:
                ok = False
        bump("requests")
        bump("served" if ok else "failed_for_user")
        if in_outage:
            bump("outage_requests")
            if not ok:
                bump("outage_failed")
        now = time.monotonic()
        if now - last_flush > 0.2:
            _flush(r, k_stats, m, stats)
            last_flush = now
    _flush(r, k_stats, m, stats)
    r.incr(f"{PREFIX}:{a.run}:done")
    m.close()
    return 0


def _flush(r: Any, key: str, m: Any, stats: dict[str, int]) -> None:
    for p in PROVIDERS:
        rej = m.get_breaker(p).get_metrics().rejected_calls
        stats[f"{p}:rejected"] = rej - stats.get(f"_{p}:rej_sent", 0)
        stats[f"_{p}:rej_sent"] = rej
    pipe = r.pipeline(transaction=False)
    for k, v in stats.items():
        if v and not k.startswith("_"):
            pipe.hincrby(key, k, v)
    pipe.execute()
    for k in list(stats):
        if not k.startswith("_"):
            stats[k] = 0


# -- the parent -------------------------------------------------------------------------


def _read(r: Any, run: str) -> tuple[dict[str, int], list[dict[str, Any]]]:
    raw = r.hgetall(f"{PREFIX}:{run}:stats")
    stats = {k.decode(): int(v) for k, v in raw.items()}
    events = [json.loads(e) for e in r.lrange(f"{PREFIX}:{run}:events", 0, -1)]
    return stats, events


def _states(breakers: dict[str, Any]) -> dict[str, str]:
    out = {}
    for p, b in breakers.items():
        try:
            out[p] = b.refresh().value
        except Exception:
            out[p] = "?"
    return out


def summarize(stats: dict[str, int], events: list[dict[str, Any]], duration: float,
              workers: int, kind: str) -> dict[str, Any]:
    out_from, out_to = outage_window(duration)
    per: dict[str, Any] = {}
    for p in PROVIDERS:
        name = f"provider_{p}"
        evs = sorted((e for e in events if e["breaker"] == name), key=lambda e: e["t"])
        trips = [e for e in evs if e["from"] == "closed" and e["to"] == "open"]
        reopens = [e for e in evs if e["from"] == "half_open" and e["to"] == "open"]
        half_opens = [e for e in evs if e["to"] == "half_open"]
        closes = [e for e in evs if e["from"] == "half_open" and e["to"] == "closed"]
        per_gen = [v for k, v in stats.items() if k.startswith(f"{p}:probes@")]
        trip_t = next((e["t"] for e in trips if e["t"] >= out_from), None)
        rec_t = next((e["t"] for e in closes if e["t"] >= out_to), None)
        per[p] = {
            "breaker": name,
            "trips": len(trips),
            "reopens": len(reopens),
            "half_open_periods": len(half_opens),
            "probes": stats.get(f"{p}:probes", 0),
            "max_probes_per_half_open": max(per_gen, default=0),
            "rejected": stats.get(f"{p}:rejected", 0),
            "calls": stats.get(f"{p}:calls", 0),
            "failures": stats.get(f"{p}:failures", 0),
            "fallbacks": stats.get(f"{p}:fallbacks", 0),
            "time_to_trip_s": None if trip_t is None else round(trip_t - out_from, 3),
            "time_to_recover_s": None if rec_t is None else round(rec_t - out_to, 3),
            "recovered": (rec_t is not None) if trips else None,
            "transitions": [f'{e["t"]:.2f}s {e["from"]}->{e["to"]} (worker {e["worker"]})'
                            for e in evs],
        }
    return {
        "workers": workers,
        "duration_s": duration,
        "redis": kind,
        "failing_provider": FAILING,
        "outage_s": [out_from, out_to],
        "providers": per,
        "fleet": {
            "requests": stats.get("requests", 0),
            "requests_served": stats.get("served", 0),
            "requests_failed_for_user": stats.get("failed_for_user", 0),
            "requests_during_outage": stats.get("outage_requests", 0),
            "failed_during_outage": stats.get("outage_failed", 0),
            "fallbacks_used": stats.get("fallback", 0),
        },
    }


class _Table:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lines = 0
        self.tty = out.isatty()
        self.last = -1e9

    def show(self, t: float, duration: float, states: dict[str, str], stats: dict[str, int],
             outage: tuple[float, float], final: bool = False) -> None:
        if not self.tty and not final and time.monotonic() - self.last < 2.0:
            return  # not a terminal: a table every 2 s, not an animation
        self.last = time.monotonic()
        rows = [f"distbreaker demo  t={t:5.1f}s / {duration:.0f}s   outage of {FAILING}: "
                f"{outage[0]:.0f}s-{outage[1]:.0f}s "
                f"{'(NOW)' if outage[0] <= t < outage[1] else ''}",
                f"{'provider':10} {'state':10} {'calls':>7} {'failures':>9} {'rejected':>9} "
                f"{'probes':>7} {'fallbacks':>10}"]
        for p in PROVIDERS:
            rows.append(f"{p:10} {states.get(p, '?'):10} {stats.get(f'{p}:calls', 0):>7} "
                        f"{stats.get(f'{p}:failures', 0):>9} {stats.get(f'{p}:rejected', 0):>9} "
                        f"{stats.get(f'{p}:probes', 0):>7} {stats.get(f'{p}:fallbacks', 0):>10}")
        rows.append(f"requests {stats.get('requests', 0)}  served {stats.get('served', 0)}  "
                    f"failed for user {stats.get('failed_for_user', 0)}  "
                    f"fallbacks {stats.get('fallback', 0)}")
        if self.tty and self.lines:
            self.out.write(f"\x1b[{self.lines}F")
        for row in rows:
            self.out.write(row + ("\x1b[K" if self.tty else "") + "\n")
        if not self.tty:
            self.out.write("\n")
        self.out.flush()
        self.lines = len(rows)


def run_demo(workers: int = 4, duration: float = 25.0, redis_url: str | None = None,
             as_json: bool = False, seed: int | None = None,
             out: TextIO | None = None) -> dict[str, Any]:
    """Run the demo and return its summary (also printed: a table, or JSON with as_json)."""
    import redis

    from .providers import ProviderCircuitBreaker

    if workers < 1 or workers > 64:
        raise ValueError(f"--workers must be in [1, 64], got {workers}")
    if not 5 <= duration <= 3600:
        raise ValueError(f"--duration must be in [5, 3600] seconds, got {duration}")
    out = out or sys.stdout
    seed = random.randrange(1 << 30) if seed is None else seed
    run = f"{os.getpid()}-{random.randrange(1 << 30):x}"
    procs: list[subprocess.Popen[bytes]] = []
    with demo_redis(redis_url) as (url, kind):
        r = redis.Redis.from_url(url)
        breakers = {p: ProviderCircuitBreaker(p, CONFIG, redis=r, prefix=PREFIX)
                    for p in PROVIDERS}
        try:
            for b in breakers.values():
                b.reset()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            for i in range(workers):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "distbreaker._demo", "--url", url, "--run", run,
                     "--id", str(i), "--duration", str(duration), "--seed", str(seed + i)],
                    env=env, stdin=subprocess.DEVNULL,
                ))
            deadline = time.monotonic() + 60
            while int(r.get(f"{PREFIX}:{run}:ready") or 0) < workers:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError("demo workers did not start")
                time.sleep(0.05)
            start = time.monotonic() + 0.1
            r.lpush(f"{PREFIX}:{run}:go", *([repr(start)] * workers))
            table = None if as_json else _Table(out)
            outage = outage_window(duration)
            while True:
                done = int(r.get(f"{PREFIX}:{run}:done") or 0) >= workers
                if table is not None:
                    stats, _ = _read(r, run)
                    table.show(min(time.monotonic() - start, duration), duration,
                               _states(breakers), stats, outage, final=done)
                if done or all(p.poll() is not None for p in procs):
                    break
                if time.monotonic() > start + duration + 30:
                    raise RuntimeError("demo workers did not finish")
                time.sleep(0.25)
            for p in procs:
                p.wait(10)
            stats, events = _read(r, run)
            summary = summarize(stats, events, duration, workers, kind)
            summary["seed"] = seed
            summary["worker_exit_codes"] = [p.returncode for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(5)
            with contextlib.suppress(Exception):
                keys = list(r.scan_iter(f"{PREFIX}:{run}:*"))
                if keys:
                    r.delete(*keys)
            for b in breakers.values():
                b.close()
    if as_json:
        out.write(json.dumps(summary) + "\n")
    else:
        _print_summary(summary, out)
    return summary


def _print_summary(s: dict[str, Any], out: TextIO) -> None:
    f = s["fleet"]
    out.write(f"\nRedis: {s['redis']}   workers: {s['workers']}   outage of "
              f"{s['failing_provider']}: {s['outage_s'][0]}s-{s['outage_s'][1]}s\n")
    for p, v in s["providers"].items():
        out.write(f"  {p:8} trips={v['trips']} reopens={v['reopens']} probes={v['probes']} "
                  f"rejected={v['rejected']} calls={v['calls']} failures={v['failures']} "
                  f"time_to_trip_s={v['time_to_trip_s']} "
                  f"time_to_recover_s={v['time_to_recover_s']}\n")
        for t in v["transitions"]:
            out.write(f"           {t}\n")
    out.write(f"  fleet: {f['requests']} requests, {f['requests_served']} served, "
              f"{f['requests_failed_for_user']} failed for the user, "
              f"{f['fallbacks_used']} provider calls served by a fallback\n")
    out.flush()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
