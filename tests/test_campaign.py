"""A fault campaign: four worker processes share one breaker through a Redis that fails in
every way we know, one fault at a time, while the backend fails now and then.

Setup: a private redis-server holds the breaker (the *data* server), a TCP proxy (in its
own process, tests/support/tcp_proxy.py) stands between it and the workers, and a second private
redis-server (*control*) carries the test's orders and the workers' reports, so no fault
ever disturbs them. The workers (tests/support/campaign_worker.py) are sync strict, sync batched,
asyncio strict and asyncio batched, calling a guarded backend about 150 times a second.
The test also listens to the breaker's channel directly (not through the proxy) and
samples the state in Redis and every worker's `get_state()` every 50 ms.

Faults (seeded; the seed is printed on failure, DISTBREAKER_CAMPAIGN_SEED replays it):
CLIENT PAUSE ALL, SIGSTOP/SIGCONT, kill -9 and restart empty on the same port, FUNCTION
FLUSH + SCRIPT FLUSH, FLUSHALL, killing the pub/sub connections, OOM (maxmemory just
above used_memory, noeviction), proxy latency, proxy drop_all (RST) and proxy blackhole;
each lasts 0.1-2 s, with quiet periods between. Every fourth round the backend fails for
1-2.5 s instead (the breakers trip, probe, reopen, close), sometimes with a fault during
the outage or the recovery. Between rounds the workers pause at a checkpoint and report
their counters. DISTBREAKER_CAMPAIGN_S sets the campaign's length (default 60 s).

Invariants (see `Campaign.check` for the exact rules and their margins):

1. no exception but CircuitOpenError and the backend's own reaches a caller;
2. no guarded call takes more than redis_timeout + 0.1 s beyond the backend's own time;
3. exactly once: no process hears the same transition twice, and every transition Redis
   published while no process was failed over is followed by exactly one on_state_change
   in the fleet (and none fires for a transition Redis never made);
4. HALF_OPEN never wedges: after the backend recovers the whole fleet is CLOSED within the
   longest open period + 3 s; no process waits in HALF_OPEN without a probe for more than
   probe_lease + 2 s;
5. reconvergence: within 2 s of the end of each fault, every process's state equals the
   state in Redis;
6. outcomes accounted: between two checkpoints without a transition, what the processes
   recorded equals what Redis counted plus unshared + pending + stale outcomes, with lost
   outcomes (fate unknown) allowed either way;
7. no needless failover: faults during which Redis keeps answering (pub/sub kills, flushes)
   or stays silent for less than failover_after - 0.2 s make no process fail over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import distbreaker
from distbreaker import CircuitBreakerConfig
from distbreaker._keys import BreakerKeys, channel_for
from distbreaker._protocol import decode_push

from redis_server import RedisServer

HERE = Path(__file__).resolve().parent
WORKER = HERE / "support" / "campaign_worker.py"
PROXY = HERE / "support" / "tcp_proxy.py"

CAMPAIGN_S = float(os.environ.get("DISTBREAKER_CAMPAIGN_S", "60"))
RATE = 150  # calls per second per worker
WORKERS = [("w0", "sync", "strict"), ("w1", "sync", "batched"),
           ("w2", "async", "strict"), ("w3", "async", "batched")]
SUB_NAME = "campaign-subscriber"  # the test's own channel listener: pub/sub kills spare it

CONFIG: dict[str, Any] = dict(
    failure_threshold=5, recovery_timeout=0.5, success_threshold=2, half_open_max_calls=1,
    max_recovery_timeout=2.0, backoff_multiplier=2.0, backoff_jitter=0.1, probe_lease=1.0,
    max_staleness=1.0,
    # only the consecutive-failure rule trips; the window (one hour) keeps every outcome of
    # the run, so Redis's count can be compared with the processes' own
    minimum_calls=1_000_000, window_size=3600.0, window_buckets=10,
    # a request whose caller went on is settled (answered or lost) within 1 s, so that
    # every outcome of a fault is settled by the next checkpoint (2.3 s after its end)
    redis_background_timeout=1.0,
)
_DEFAULTS = CircuitBreakerConfig()
REDIS_TIMEOUT = _DEFAULTS.redis_timeout
FAILOVER_AFTER = _DEFAULTS.failover_after
CALL_BOUND = REDIS_TIMEOUT + 0.1
MAX_OPEN = CONFIG["max_recovery_timeout"] * (1 + CONFIG["backoff_jitter"])
CLOSE_BOUND = MAX_OPEN + 3.0  # backend back -> whole fleet CLOSED
HALF_OPEN_BOUND = CONFIG["probe_lease"] + 2.0  # rejected in HALF_OPEN, no probe
RECONVERGE_S = 2.0
SETTLE_S = RECONVERGE_S + 0.3  # after each fault, before the next checkpoint

DURATIONAL = ("pause", "sigstop", "kill", "oom", "latency", "blackhole")
FAULT_KINDS = ("pause", "sigstop", "kill", "script_flush", "flushall", "pubsub_kill", "oom",
               "latency", "drop_all", "blackhole")
WIPES = ("kill", "flushall")


def _short(port: int, timeout: float = 0.15, name: str | None = None) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=timeout, socket_connect_timeout=timeout,
                       retry=Retry(NoBackoff(), 0), client_name=name)


def _effective(state: bytes | str | None, forced: bytes | str | None) -> str:
    """The effective state of a state hash: the override wins; no hash is CLOSED."""
    def text(v: bytes | str | None) -> str:
        return v.decode() if isinstance(v, bytes) else (v or "")

    f = text(forced)
    return f if f in ("open", "closed") else (text(state) or "closed")


class ProxyProcess:
    """tests/support/tcp_proxy.py in its own process, driven over stdin."""

    def __init__(self, target_port: int) -> None:
        self.proc = subprocess.Popen([sys.executable, str(PROXY), str(target_port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        head = self.proc.stdout.readline().split()
        assert head and head[0] == "port", head
        self.port = int(head[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._lock = threading.Lock()

    def _say(self, line: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            got = self.proc.stdout.readline().strip()
        assert got == "ok", f"proxy answered {got!r} to {line!r}"

    def set_latency(self, s: float) -> None:
        self._say(f"latency {s}")

    def blackhole(self, on: bool) -> None:
        self._say(f"blackhole {int(on)}")

    def drop_all(self) -> None:
        self._say("drop")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self._say("stop")
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Subscriber(threading.Thread):
    """Counts what Redis publishes on the breaker's channel, directly (no proxy)."""

    def __init__(self, port: int, channel: str, name: str) -> None:
        super().__init__(name="campaign-subscriber", daemon=True)
        self.port, self.channel, self.name_ = port, channel, name
        self.stopped = False
        self.messages: list[dict[str, Any]] = []  # transitions (from != to) of our breaker
        self.other = 0
        self.connected: list[list[float]] = []  # [since, until (inf while connected)]

    def run(self) -> None:
        while not self.stopped:
            ps = None
            try:
                ps = _short(self.port, 0.5, SUB_NAME).pubsub()
                ps.subscribe(self.channel)
                while not self.stopped:
                    msg = ps.get_message(timeout=0.1)
                    if msg is None:
                        continue
                    if msg["type"] == "subscribe":
                        self.connected.append([time.time(), float("inf")])
                    elif msg["type"] == "message":
                        self._take(msg["data"], time.time())
            except Exception:
                if self.connected and self.connected[-1][1] == float("inf"):
                    self.connected[-1][1] = time.time()
                time.sleep(0.02)
            finally:
                if ps is not None:
                    with contextlib.suppress(Exception):
                        ps.close()
        if self.connected and self.connected[-1][1] == float("inf"):
            self.connected[-1][1] = time.time()

    def _take(self, data: bytes, recv: float) -> None:
        p = decode_push(data)
        if p is None or p.name != self.name_:
            self.other += 1
            return
        if p.from_state is p.to_state:
            return
        self.messages.append({"recv": recv, "t": p.now_ms / 1000.0, "ev": p.event,
                              "from": p.from_state.value, "to": p.to_state.value,
                              "gen": p.generation, "forced": p.forced or "-",
                              "origin": p.origin})

    def connected_over(self, a: float, b: float) -> bool:
        return any(s <= a and b <= e for s, e in self.connected)


class Monitor(threading.Thread):
    """Every 50 ms: the effective state in Redis and every worker's last report."""

    def __init__(self, data_port: int, control: redis.Redis, keys: BreakerKeys,
                 ns: str) -> None:
        super().__init__(name="campaign-monitor", daemon=True)
        self.data_port, self.control, self.keys, self.ns = data_port, control, keys, ns
        self.stopped = False
        self.samples: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        data = _short(self.data_port, 0.15, "campaign-monitor")
        while not self.stopped:
            t = time.time()
            red: list[Any] | None
            try:
                st, forced, gen = data.hmget(self.keys.state, ["state", "forced", "generation"])
                red = [_effective(st, forced), int(gen or 0)]
            except Exception:
                red = None
            try:
                live = {(k.decode() if isinstance(k, bytes) else k): json.loads(v)
                        for k, v in self.control.hgetall(f"{self.ns}:live").items()}
            except Exception:  # the control server is never faulted; do not die on a blip
                live = {}
            with self.lock:
                self.samples.append({"t": t, "redis": red, "workers": live})
            time.sleep(0.05)
        data.close()

    def latest(self) -> dict[str, Any] | None:
        with self.lock:
            return self.samples[-1] if self.samples else None


def _agree(sample: dict[str, Any], want: str | None = None) -> bool:
    """Redis was read, every worker reported within 0.25 s, and all say the same state
    (`want`, if given)."""
    red = sample["redis"]
    if red is None or len(sample["workers"]) != len(WORKERS):
        return False
    state = red[0] if want is None else want
    if red[0] != state:
        return False
    return all(abs(sample["t"] - w[0]) <= 0.25 and w[1] == state
               for w in sample["workers"].values())


@dataclasses.dataclass
class Fault:
    kind: str
    start: float
    end: float = 0.0
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""
    during: str = ""  # "", "backend down" or "recovery"

    @property
    def duration(self) -> float:
        return self.end - self.start


class Campaign:
    def __init__(self, seed: int, duration: float, out: Path) -> None:
        self.seed, self.duration, self.out = seed, duration, out
        self.rng = random.Random(seed)
        self.name = f"campaign-{uuid.uuid4().hex[:6]}"
        self.ns = f"ctl:{self.name}"
        self.keys = BreakerKeys.for_name(self.name)
        self.faults: list[Fault] = []
        self.backend: list[list[float]] = []  # [down, up]
        self.closings: list[dict[str, Any]] = []  # backend up -> fleet CLOSED
        self.wipes: list[float] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.reports: dict[str, dict[str, Any]] = {}
        self.stderr: dict[str, str] = {}
        self.harness: list[str] = []  # the harness's own trouble: not the library's
        self.deck: list[str] = []
        self.t0 = time.time()
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._stopped_server = False
        self.final_sample: dict[str, Any] | None = None

    # -- setup and teardown --------------------------------------------------------------

    def start(self) -> None:
        self.data = RedisServer().start()
        self.control_server = RedisServer().start()
        self.ctl = self.control_server.client(socket_timeout=10)
        self.proxy = ProxyProcess(self.data.port)
        self.sub = Subscriber(self.data.port, channel_for("distbreaker"), self.name)
        self.sub.start()
        self.monitor = Monitor(self.data.port, self.control_server.client(socket_timeout=10),
                               self.keys, self.ns)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(  # a PYTHONPATH of the caller's comes first
            [*filter(None, [env.get("PYTHONPATH")]), str(HERE.parent), str(HERE)])
        for wid, kind, consistency in WORKERS:
            spec = {"id": wid, "kind": kind, "url": self.proxy.url,
                    "control_url": self.control_server.url, "name": self.name, "ns": self.ns,
                    "config": {**CONFIG, "consistency": consistency}, "rate": RATE}
            log = open(self.out / f"{wid}.stdout", "wb")  # noqa: SIM115 - closed in stop()
            err = open(self.out / f"{wid}.stderr", "wb")  # noqa: SIM115
            self.procs.append((wid, subprocess.Popen(
                [sys.executable, str(WORKER), json.dumps(spec)], cwd=str(HERE.parent),
                env=env, stdout=log, stderr=err)))
            log.close()
            err.close()
        deadline = time.monotonic() + 30
        while self.ctl.llen(f"{self.ns}:ready") < len(WORKERS):
            assert time.monotonic() < deadline, "workers did not start"
            for wid, p in self.procs:
                assert p.poll() is None, f"{wid} exited: {self._stderr(wid)[-2000:]}"
            time.sleep(0.05)
        deadline = time.monotonic() + 5
        while not self.sub.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        self.monitor.start()
        self.t0 = time.time()

    def _stderr(self, wid: str) -> str:
        p = self.out / f"{wid}.stderr"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        """Stop everything that was started (start() may have failed half-way)."""
        has = self.__dict__
        if self._stopped_server and "data" in has and self.data.proc is not None:
            with contextlib.suppress(Exception):
                os.kill(self.data.proc.pid, signal.SIGCONT)
        if "ctl" in has:
            with contextlib.suppress(Exception):
                self.ctl.set(f"{self.ns}:stop", 1)
        for wid, p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                self.harness.append(f"{wid} did not exit within 30 s of stop: killed")
                p.kill()
                p.wait()
            out = (self.out / f"{wid}.stdout").read_text(errors="replace").strip()
            self.stderr[wid] = self._stderr(wid)
            if p.returncode != 0 or not out:
                self.harness.append(f"{wid} exited with {p.returncode}: "
                                    f"{self.stderr[wid][-3000:]}")
                continue
            self.reports[wid] = json.loads(out.splitlines()[-1])
        for t in ("monitor", "sub"):
            if t in has:
                has[t].stopped = True
        if "proxy" in has:
            self.proxy.stop()
        for t in ("monitor", "sub"):
            if t in has and has[t].is_alive():
                has[t].join(2)
        for srv in ("data", "control_server"):
            if srv in has:
                has[srv].stop()

    # -- the campaign ----------------------------------------------------------------------

    def rel(self, t: float) -> float:
        return round(t - self.t0, 3)

    def run(self) -> None:
        end = time.monotonic() + self.duration
        self.checkpoint("start")
        rnd = 0
        while time.monotonic() < end - 3.0:
            rnd += 1
            if rnd % 4 == 2:
                self.backend_round()
            else:
                time.sleep(self.rng.uniform(0.3, 0.8))
                self.inject(self.next_fault())
                time.sleep(SETTLE_S)
            self.checkpoint(f"round {rnd}")
        time.sleep(0.5)
        self.checkpoint("final")
        last = self.monitor.latest()
        if last is None or not _agree(last, "closed"):
            self.final_sample = last
        else:
            self.final_sample = None

    def next_fault(self) -> str:
        if not self.deck:  # every kind once, in a random order, then again
            self.deck = list(FAULT_KINDS)
            self.rng.shuffle(self.deck)
        return self.deck.pop()

    def _duration(self) -> float:
        # short ones (under failover_after) should be ridden out without a failover
        if self.rng.random() < 0.4:
            return self.rng.uniform(0.1, 0.3)
        return self.rng.uniform(0.3, 2.0)

    def set_backend(self, failing: bool) -> None:
        if failing:
            self.ctl.set(f"{self.ns}:backend", "fail")
            self.backend.append([time.time(), float("inf")])
        else:
            self.ctl.delete(f"{self.ns}:backend")
            self.backend[-1][1] = time.time()

    def backend_round(self) -> None:
        time.sleep(self.rng.uniform(0.2, 0.5))
        down_s = self.rng.uniform(1.0, 2.5)
        fault_at = self.rng.uniform(0.2, down_s + 1.5) if self.rng.random() < 0.6 else None
        t_down = time.monotonic()
        self.set_backend(True)
        extra = 0.0
        if fault_at is not None and fault_at < down_s:
            time.sleep(fault_at)
            f = self.inject(self.next_fault(), during="backend down")
            time.sleep(max(0.0, t_down + down_s - time.monotonic()))
        else:
            time.sleep(down_s)
        self.set_backend(False)
        up = time.time()
        if fault_at is not None and fault_at >= down_s:
            time.sleep(max(0.0, fault_at - down_s))
            f = self.inject(self.next_fault(), during="recovery")
            extra = f.duration + RECONVERGE_S
        deadline = up + CLOSE_BOUND + extra
        closed_at = None
        while time.time() < deadline + 0.5:
            s = self.monitor.latest()
            if s is not None and s["t"] > up and _agree(s, "closed"):
                closed_at = s["t"]
                break
            time.sleep(0.05)
        self.closings.append({"up": up, "closed": closed_at, "deadline": deadline})
        time.sleep(SETTLE_S if fault_at is not None else 0.3)

    def window_calls(self) -> tuple[int, int]:
        """(calls in the shared window, generation), read directly from the data server."""
        with _short(self.data.port, 1.0) as c:
            p = c.pipeline(transaction=False)
            p.hget(self.keys.window, "c")
            p.hget(self.keys.state, "generation")
            calls, gen = p.execute()
        return int(calls or 0), int(gen or 0)

    def checkpoint(self, label: str) -> None:
        k = str(len(self.checkpoints))
        key = f"{self.ns}:ckpt:{k}"
        self.ctl.set(f"{self.ns}:hold", k)
        deadline = time.monotonic() + 8
        try:
            while self.ctl.llen(key) < len(WORKERS):
                if time.monotonic() > deadline:
                    self.harness.append(f"checkpoint {label}: only {self.ctl.llen(key)} of "
                                        f"{len(WORKERS)} workers reported within 8 s")
                    return
                time.sleep(0.005)
            workers = {r["id"]: r for r in map(json.loads, self.ctl.lrange(key, 0, -1))}
            calls = gen = None
            for _ in range(20):
                try:
                    calls, gen = self.window_calls()
                    break
                except redis.RedisError:
                    time.sleep(0.1)
            if calls is None:
                self.harness.append(f"checkpoint {label}: could not read the window")
            self.checkpoints.append({"label": label, "t": time.time(), "workers": workers,
                                     "calls": calls, "gen": gen})
        finally:
            self.ctl.delete(f"{self.ns}:hold")

    # -- faults ------------------------------------------------------------------------------

    def inject(self, kind: str, during: str = "") -> Fault:
        f = Fault(kind, time.time(), during=during)
        d = self._duration() if kind in DURATIONAL else 0.0
        f.params["d"] = round(d, 3)
        direct = _short(self.data.port, 1.0, "campaign-faults")
        try:
            if kind in WIPES:  # what the window holds just before it is erased
                try:
                    f.params["pre_calls"], f.params["pre_gen"] = self.window_calls()
                except redis.RedisError as e:
                    f.note = f"pre-wipe read failed: {e}"
            f.start = time.time()
            if kind == "pause":
                direct.execute_command("CLIENT", "PAUSE", int(d * 1000), "ALL")
                time.sleep(d)
                f.end = f.start + d
            elif kind == "sigstop":
                assert self.data.proc is not None
                os.kill(self.data.proc.pid, signal.SIGSTOP)
                self._stopped_server = True
                try:
                    time.sleep(d)
                finally:
                    os.kill(self.data.proc.pid, signal.SIGCONT)
                    self._stopped_server = False
                f.end = time.time()
            elif kind == "kill":
                self.data.kill()
                self.wipes.append(f.start)
                time.sleep(d)
                self.data.start()
                f.end = time.time()
            elif kind == "script_flush":
                direct.function_flush()
                direct.script_flush()
                f.end = time.time()
            elif kind == "flushall":
                direct.flushall()
                self.wipes.append(f.start)
                f.end = time.time()
            elif kind == "pubsub_kill":
                victims = [c["id"] for c in direct.client_list(_type="pubsub")
                           if c.get("name") != SUB_NAME]
                for cid in victims:
                    direct.execute_command("CLIENT", "KILL", "ID", cid)
                f.params["killed"] = len(victims)
                f.end = time.time()
            elif kind == "oom":
                used = int(direct.info("memory")["used_memory"])
                direct.config_set("maxmemory-policy", "noeviction")
                direct.config_set("maxmemory", used + 1024)
                try:
                    try:
                        direct.set("campaign:oomprobe", "x")
                        direct.delete("campaign:oomprobe")
                        f.note = "OOM not in effect (a probe SET succeeded)"
                    except redis.ResponseError as e:
                        f.note = f"in effect: {str(e)[:40]}"
                    time.sleep(d)
                finally:
                    direct.config_set("maxmemory", 0)
                f.end = time.time()
            elif kind == "latency":
                lat = self.rng.uniform(0.03, 0.15)
                f.params["latency"] = round(lat, 3)
                self.proxy.set_latency(lat)
                time.sleep(d)
                self.proxy.set_latency(0)
                f.end = time.time()
            elif kind == "drop_all":
                self.proxy.drop_all()
                f.end = time.time()
            elif kind == "blackhole":
                self.proxy.blackhole(True)
                time.sleep(d)
                self.proxy.blackhole(False)
                f.end = time.time()
            else:  # pragma: no cover
                raise AssertionError(kind)
        finally:
            with contextlib.suppress(Exception):
                direct.close()
        self.faults.append(f)
        return f

    # -- evidence ------------------------------------------------------------------------------

    def degraded(self) -> dict[str, list[list[float]]]:
        """Per worker, when it ran on its local fallback: from its StoreEvents, and from
        the 50 ms samples of store_degraded (whichever shows more)."""
        out: dict[str, list[list[float]]] = {}
        for wid, r in self.reports.items():
            iv: list[list[float]] = []
            for e in r["events"]:
                if e[1] != "S":
                    continue
                if e[2] and (not iv or iv[-1][1] != float("inf")):
                    iv.append([e[0], float("inf")])
                elif not e[2] and iv and iv[-1][1] == float("inf"):
                    iv[-1][1] = e[0]
            prev = None
            for s in self.monitor.samples:
                w = s["workers"].get(wid)
                if w is not None and w[3]:
                    if prev is not None and w[0] - prev[1] < 0.2:
                        prev[1] = w[0]
                    else:
                        prev = [w[0] - 0.05, w[0]]
                        iv.append(prev)
            out[wid] = iv
        return out

    @staticmethod
    def _overlaps(iv: list[list[float]], a: float, b: float) -> bool:
        return any(s <= b and a <= e for s, e in iv)

    def _epoch(self, t: float) -> int:
        return sum(1 for w in self.wipes if w <= t)

    def _unobservable(self, t: float) -> str:
        """Why a transition at `t` may have had both its reply and its push destroyed (no
        process could learn that it made it): "" if none."""
        for f in self.faults:
            if f.kind == "blackhole" and f.start - 0.05 <= t <= f.end + 0.3:
                return "blackhole"
            if f.kind == "drop_all" and f.start - 0.05 <= t <= f.end + 0.05:
                return "drop_all"
            if f.kind == "kill" and f.start - 0.2 <= t <= f.start + 0.01:
                return "kill"
        return ""

    def _faults_over(self, a: float, b: float) -> list[Fault]:
        return [f for f in self.faults if f.start <= b and a <= f.end]

    def check(self) -> tuple[list[str], list[str]]:
        fails: list[str] = []
        info: list[str] = list(self.harness)
        if self.harness:
            fails.append("HARNESS: " + "; ".join(self.harness))
        deg = self.degraded()
        any_deg = [iv for ivs in deg.values() for iv in ivs]

        # 1. exceptions, 2. extra wait
        for wid, r in sorted(self.reports.items()):
            if r["unexpected_count"]:
                fails.append(f"[1 exceptions] {wid}: {r['unexpected_count']} unexpected, e.g. "
                             + "; ".join(f"t={self.rel(t)} {n}: {m}"
                                         for t, n, m in r["unexpected"][:5]))
            if r["slow_count"]:
                fails.append(
                    f"[2 extra wait] {wid}: {r['slow_count']} calls over {CALL_BOUND:.2f}s, "
                    f"max {r['max_overhead_s']}s at t={self.rel(r['worst_at'])}; first: "
                    + ", ".join(f"t={self.rel(t)} {o}s ({st}, {k})"
                                for t, o, st, k in r["slow_calls"][:8]))

        # 3a. no process hears one transition twice
        for wid, r in sorted(self.reports.items()):
            seen: Counter[tuple[Any, ...]] = Counter()
            at: dict[tuple[Any, ...], list[float]] = {}
            for e in r["events"]:
                if e[1] != "T" or self._overlaps(deg[wid], e[0] - 0.05, e[0] + 0.05):
                    continue  # a transition of its local fallback
                key = (self._epoch(e[0]), e[2], e[3], e[4])
                seen[key] += 1
                at.setdefault(key, []).append(self.rel(e[0]))
            dups = {k: n for k, n in seen.items() if n > 1}
            if dups:
                fails.append(f"[3 exactly once] {wid} heard {len(dups)} transitions more than "
                             "once: " + "; ".join(f"gen {k[1]} {k[2]}->{k[3]} x{n} at {at[k]}"
                                                  for k, n in list(dups.items())[:8]))

        # 3b. every published transition -> exactly one on_state_change in the fleet
        pubs = self.sub.messages
        hooks = [(wid, h) for wid, r in self.reports.items() for h in r["hooks"]]
        matched: dict[int, list[str]] = {i: [] for i in range(len(pubs))}
        unmatched: list[tuple[str, list[Any]]] = []
        for wid, h in hooks:
            t, old, new, gen = h
            if self._overlaps(deg[wid], t - 0.05, t + 0.05):
                continue  # its local fallback's transition
            cands = [(abs(t - p["t"]), i) for i, p in enumerate(pubs)
                     if p["from"] == old and p["to"] == new and p["gen"] == gen
                     and p["t"] - 0.05 <= t <= p["t"] + 2.0]
            if not cands:  # the snapshot may have moved on before the hook read it
                cands = [(abs(t - p["t"]), i) for i, p in enumerate(pubs)
                         if p["from"] == old and p["to"] == new
                         and p["t"] - 0.05 <= t <= p["t"] + 0.5]
            if cands:
                matched[min(cands)[1]].append(wid)
            else:
                unmatched.append((wid, h))
        checked = 0
        excluded: Counter[str] = Counter()
        for i, p in enumerate(pubs):
            why = self._unobservable(p["t"])
            if not why and self._overlaps(any_deg, p["t"] - 0.1, p["t"] + 1.0):
                why = "a process was failed over"
            if why:
                excluded[why] += 1
                continue
            checked += 1
            n = len(matched[i])
            if n != 1:
                fails.append(f"[3 exactly once] transition gen {p['gen']} {p['from']}->"
                             f"{p['to']} published at t={self.rel(p['t'])} (origin "
                             f"{p['origin'] or '-'}): on_state_change fired {n} times "
                             f"{matched[i]}; faults near: "
                             + ", ".join(f"{f.kind}@{self.rel(f.start)}" for f in
                                         self._faults_over(p["t"] - 2, p["t"] + 1)))
        for wid, h in unmatched:
            t = h[0]
            if (not self.sub.connected_over(t - 2.0, t + 0.2) or self._unobservable(t)
                    or self._overlaps(deg[wid], t - 1.0, t + 0.1)):
                continue
            fails.append(f"[3 exactly once] {wid}: on_state_change {h[1]}->{h[2]} (gen {h[3]}) "
                         f"at t={self.rel(t)} matches no transition Redis published")
        info.append(f"transitions published: {len(pubs)}, checked for exactly-once: {checked}, "
                    f"excluded: {dict(excluded)}; on_state_change calls: {len(hooks)}")
        # (not an invariant) each process should hear every transition: report misses
        misses: Counter[str] = Counter()
        for p in pubs:
            if self._unobservable(p["t"]) or self._overlaps(any_deg, p["t"] - 0.1,
                                                            p["t"] + 1.0):
                continue
            for wid, r in self.reports.items():
                if not any(e[1] == "T" and e[2] == p["gen"] and e[3] == p["from"]
                           and e[4] == p["to"] and p["t"] - 0.05 <= e[0] <= p["t"] + 2.0
                           for e in r["events"]):
                    misses[wid] += 1
        info.append(f"(info) checked transitions a process never heard as a TransitionEvent: "
                    f"{dict(misses) or 0}")

        # 4. HALF_OPEN never wedged
        for c in self.closings:
            if c["closed"] is None:
                last = [s for s in self.monitor.samples if s["t"] <= c["deadline"]][-1:]
                view = ({w: v[1:] for w, v in last[0]["workers"].items()}, last[0]["redis"]
                        ) if last else None
                fails.append(f"[4 half-open wedged] backend up at t={self.rel(c['up'])}: "
                             f"fleet not all CLOSED by t={self.rel(c['deadline'])}; last "
                             f"sample (processes, redis): {view}")
            else:
                info.append(f"backend up at t={self.rel(c['up'])}: fleet CLOSED "
                            f"{c['closed'] - c['up']:.2f}s later")
        for wid, r in sorted(self.reports.items()):
            for a, b, waited in r["half_open_waits"]:
                extra = sum(f.duration + RECONVERGE_S for f in self._faults_over(a - 2, b))
                if waited > HALF_OPEN_BOUND + extra:
                    fails.append(f"[4 half-open wedged] {wid} rejected in HALF_OPEN without a "
                                 f"probe for {waited}s from t={self.rel(a)} (bound "
                                 f"{HALF_OPEN_BOUND + extra:.1f}s)")

        # 5. reconvergence within 2 s of each fault's end
        for f in self.faults:
            window = [s for s in self.monitor.samples
                      if f.end <= s["t"] <= f.end + RECONVERGE_S]
            if not any(_agree(s) for s in window):
                show = window[-1] if window else None
                fails.append(
                    f"[5 reconvergence] {f.kind} {f.params} ended t={self.rel(f.end)}"
                    f"{' (' + f.during + ')' if f.during else ''}: no moment in the next "
                    f"{RECONVERGE_S}s where every process agreed with Redis; at "
                    f"t={self.rel(show['t']) if show else '-'}: redis="
                    f"{show['redis'] if show else None}, processes="
                    f"{ {w: v[1:] for w, v in show['workers'].items()} if show else None}")
        if getattr(self, "final_sample", None) is not None:
            s = self.final_sample
            fails.append(f"[5 reconvergence] at the end not all CLOSED and agreeing: "
                         f"redis={s['redis'] if s else None}, "
                         f"processes={s['workers'] if s else None}")

        # 6. outcomes accounted, checkpoint to checkpoint
        fails += self._check_outcomes(info)

        # 7. no needless failover
        for f in self.faults:
            quiet = ""
            if f.kind in ("pubsub_kill", "script_flush", "flushall"):
                quiet = "Redis kept answering"
            elif f.kind in ("pause", "sigstop", "blackhole") and (
                    f.duration <= FAILOVER_AFTER - 0.2):
                quiet = f"silent {f.duration:.2f}s < failover_after {FAILOVER_AFTER}s - 0.2"
            elif f.kind == "latency" and 2 * f.params["latency"] <= FAILOVER_AFTER - 0.15:
                quiet = (f"replies {2 * f.params['latency']:.2f}s late < failover_after "
                         f"{FAILOVER_AFTER}s - 0.15")
            if not quiet:
                continue
            # a request whose caller went on is settled within redis_background_timeout: a
            # failover the fault causes comes at the latest then (faults are 2.3 s apart)
            late = max(0.3, float(CONFIG.get("redis_background_timeout", 0.0)) + 0.2)
            who = [w for w, iv in deg.items() if self._overlaps(iv, f.start, f.end + late)]
            if who:
                fails.append(f"[7 needless failover] {f.kind} {f.params} at "
                             f"t={self.rel(f.start)} ({quiet}): failed over: {who}")
        return fails, info

    def _check_outcomes(self, info: list[str]) -> list[str]:
        fails = []
        ck = self.checkpoints
        rows = []
        for a, b in itertools.pairwise(ck):
            if a["calls"] is None or b["calls"] is None:
                continue
            if set(a["workers"]) != set(b["workers"]) or len(b["workers"]) != len(WORKERS):
                continue
            seg = [f for f in self.faults if a["t"] <= f.start <= b["t"]]
            pubs = [p for p in self.sub.messages if a["t"] - 0.1 <= p["t"] <= b["t"]]
            wiped = [f for f in seg if f.kind in WIPES]
            label = ",".join(f.kind for f in seg) or "none"
            if pubs or any(x[0] <= b["t"] and a["t"] <= x[1] for x in self.backend):
                continue  # a transition clears the window: nothing to compare
            lo_slack = hi_slack = 0
            if wiped:
                f = wiped[0]
                if len(wiped) > 1 or "pre_calls" not in f.params or f.params["pre_gen"] != a[
                        "gen"] or b["gen"] != 0:
                    info.append(f"outcomes {a['label']} -> {b['label']} ({label}): not "
                                "comparable (generation moved around the wipe)")
                    continue
                shared = f.params["pre_calls"] - a["calls"] + b["calls"]
                # outcomes applied between the read just before the wipe and the wipe itself
                lo_slack, hi_slack = 20, 5
            else:
                if a["gen"] != b["gen"]:
                    continue
                shared = b["calls"] - a["calls"]

            def delta(field: str, a: dict[str, Any] = a, b: dict[str, Any] = b) -> int | None:
                tot = 0
                for wid in b["workers"]:
                    x, y = a["workers"][wid].get(field), b["workers"][wid].get(field)
                    if x is None or y is None:
                        return None
                    tot += y - x
                return tot

            rec, stale, lost, pend = (delta(k) for k in ("recorded", "stale", "lost", "pending"))
            unshared = delta("unshared")
            assert rec is not None and stale is not None and lost is not None
            assert pend is not None
            u = unshared if unshared is not None else 0
            hi = rec - u - pend - stale
            lo = hi - lost
            row = (f"{a['label']} -> {b['label']} [{label}]: recorded {rec}, Redis counted "
                   f"{shared}, unshared {unshared}, pending {pend}, stale {stale}, lost {lost}")
            rows.append(row)
            if not lo - lo_slack <= shared <= hi + hi_slack:
                missing = "" if unshared is not None else \
                    " (metrics have no unshared_outcomes field)"
                fails.append(f"[6 outcomes] {row}: expected Redis to count between {lo} and "
                             f"{hi}{missing}")
        info.append(f"outcome segments compared: {len(rows)}")
        info.extend("  " + r for r in rows)
        return fails

    # -- the story, for a failure ----------------------------------------------------------------

    def render(self, fails: list[str], info: list[str]) -> str:
        out = [f"fault campaign: seed {self.seed} (DISTBREAKER_CAMPAIGN_SEED={self.seed} to "
               f"replay the schedule), {self.duration:.0f}s, breaker {self.name}, artifacts "
               f"in {self.out}", f"config: {CONFIG}",
               f"distbreaker: {distbreaker.__file__} (workers: "
               f"{sorted({str(r.get('distbreaker')) for r in self.reports.values()})})", "",
               "FAILED INVARIANTS:" if fails else "all invariants held",
               *(f"  {f}" for f in fails), "", "notes:",
               *(f"  {i}" for i in info), "", "timeline (t = seconds from start):"]
        events = [(f.start, f"fault {f.kind} {f.params} until t={self.rel(f.end)}"
                            f"{' [' + f.during + ']' if f.during else ''}"
                            f"{' ' + f.note if f.note else ''}") for f in self.faults]
        events += [(d, f"backend DOWN until t={self.rel(u)}") for d, u in self.backend]
        events += [(c["t"], f"checkpoint {c['label']}: window calls {c['calls']} gen "
                            f"{c['gen']}") for c in self.checkpoints]
        out += [f"  t={self.rel(t):8.3f}  {s}" for t, s in sorted(events)]
        out.append("")
        deg = self.degraded()
        for wid, r in sorted(self.reports.items()):
            m = r["metrics"] or {}
            keep = ("total_calls", "successful_calls", "failed_calls", "rejected_calls",
                    "stale_outcomes", "lost_outcomes", "pending_outcomes", "unshared_outcomes",
                    "store_failovers", "batches", "store_degraded", "state")
            out.append(f"{wid} ({r['kind']} {r['consistency']}): calls {r['calls']}, "
                       f"admitted {r['admitted']}, rejected {r['rejected']}, backend failures "
                       f"{r['backend_failures']}, probes {r['probes_admitted']}, max overhead "
                       f"{r['max_overhead_s']}s, slow {r['slow_count']}, unexpected "
                       f"{r['unexpected_count']}, hooks {len(r['hooks'])}, transition events "
                       f"{sum(1 for e in r['events'] if e[1] == 'T')}, max HALF_OPEN wait "
                       f"{r['max_half_open_wait_s']}s")
            out.append("    metrics: " + ", ".join(f"{k}={m.get(k)}" for k in keep))
            out.append("    failed over: " + (", ".join(
                f"{self.rel(a)}..{self.rel(b) if b != float('inf') else 'end'}"
                for a, b in deg.get(wid, [])) or "never"))
            if r["control_errors"]:
                out.append(f"    control errors: {r['control_errors']}")
            warn = [ln for ln in self.stderr.get(wid, "").splitlines() if "WARNING" in ln
                    or "ERROR" in ln]
            out.append(f"    stderr: {len(warn)} warning/error lines; first: "
                       + " | ".join(ln[:160] for ln in warn[:4]))
        return "\n".join(out)

    def dump(self) -> None:
        with open(self.out / "campaign.json", "w") as fh:
            json.dump({"seed": self.seed, "t0": self.t0, "config": CONFIG,
                       "faults": [dataclasses.asdict(f) for f in self.faults],
                       "backend": self.backend, "closings": self.closings,
                       "wipes": self.wipes, "checkpoints": self.checkpoints,
                       "published": self.sub.messages, "subscriber": self.sub.connected,
                       "reports": self.reports, "samples": self.monitor.samples},
                      fh, default=str)


@pytest.mark.multiprocess
@pytest.mark.timeout(int(CAMPAIGN_S) + 120)
def test_fault_campaign(tmp_path: Path) -> None:
    seed = int(os.environ.get("DISTBREAKER_CAMPAIGN_SEED") or random.SystemRandom().randrange(
        1 << 31))
    c = Campaign(seed, CAMPAIGN_S, tmp_path)
    print(f"fault campaign seed {seed}")
    try:
        c.start()
        c.run()
    finally:
        c.stop()
    fails, info = c.check()
    c.dump()
    story = c.render(fails, info)
    if fails:
        pytest.fail(story, pytrace=False)
    print(story)  # shown with -s / -rP

