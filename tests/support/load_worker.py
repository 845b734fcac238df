"""One worker process of the load tests (tests/test_under_load.py).

Run as ``python tests/support/load_worker.py '<json spec>'``. The spec names the breaker's Redis
(``url``), a second, private Redis for control (``control_url``: barriers and switches,
which no fault on the breaker's Redis can disturb), the breaker, its config, the scenario
(``mode``) and its parameters. The worker:

1. builds its breaker (unless the mode builds it later), RPUSHes its id on ``<ns>:ready``;
2. waits for BLPOP ``<ns>:go``, whose item is the start time (``time.monotonic()``, one
   clock for every process on the machine);
3. runs its scenario and prints one JSON line on stdout, its result.

Failovers are counted three ways, each of which must say 0 where none is allowed:
``store_failovers`` from the metrics, StoreEvent(degraded=True) heard by a listener, and
WARNING records of the ``distbreaker`` logger whose event is ``distbreaker.store_down``.

Every worker kills itself (SIGALRM) after ``timeout`` seconds so that nothing hangs.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from distbreaker import CircuitBreaker, CircuitBreakerConfig, CircuitOpenError, CircuitState
from distbreaker.events import StoreEvent, TransitionEvent


class Boom(Exception):
    """The backend's own failure."""


class Watch(logging.Handler):
    """Counts what a breaker tells about Redis outages and transitions, as it happens."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.mu = threading.Lock()  # not `lock`: logging.Handler has its own
        self.store_down_events: list[float] = []  # StoreEvent(degraded=True), monotonic
        self.store_up_events = 0
        self.store_down_logs: list[str] = []  # "distbreaker.store_down" warnings
        self.transitions: list[dict[str, Any]] = []  # TransitionEvents heard
        self.hooks: list[list[str]] = []  # on_state_change calls (old, new)

    # logging.Handler
    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "distbreaker.store_down":
            with self.mu:
                self.store_down_logs.append(record.getMessage()[:200])

    # breaker listener
    def listener(self, event: Any) -> None:
        if isinstance(event, StoreEvent):
            with self.mu:
                if event.degraded:
                    self.store_down_events.append(time.monotonic())
                else:
                    self.store_up_events += 1
        elif isinstance(event, TransitionEvent):
            with self.mu:
                self.transitions.append({
                    "gen": event.generation, "old": str(event.old_state),
                    "new": str(event.new_state), "local": event.local,
                    "override": event.override, "at": time.monotonic()})

    def hook(self, name: str, old: CircuitState, new: CircuitState) -> None:
        with self.mu:
            self.hooks.append([str(old), str(new)])

    def report(self, b: CircuitBreaker | None) -> dict[str, Any]:
        m = None
        err = None
        if b is not None:
            try:
                m = b.get_metrics()
            except Exception as e:  # reported, not hidden: the test shows it
                err = f"{type(e).__name__}: {e}"
        with self.mu:
            out: dict[str, Any] = {
                "store_down_events": len(self.store_down_events),
                "store_up_events": self.store_up_events,
                "store_down_logs": len(self.store_down_logs),
                "store_down_log_lines": self.store_down_logs[:5],
            }
        if b is not None:
            out["metrics_error"] = err
            out["store_degraded_at_end"] = b.store_degraded
        if m is not None:
            out.update(
                total_calls=m.total_calls, successful_calls=m.successful_calls,
                failed_calls=m.failed_calls, ignored_calls=m.ignored_calls,
                rejected_calls=m.rejected_calls, stale_outcomes=m.stale_outcomes,
                lost_outcomes=m.lost_outcomes, pending_outcomes=m.pending_outcomes,
                store_failovers=m.store_failovers,
                unshared_outcomes=m.unshared_outcomes,
                fleet_calls=None if m.fleet is None else m.fleet.calls,
            )
        return out


def emit(**obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.p: dict[str, Any] = spec.get("params", {})
        self.ns: str = spec["ns"]
        self.wid: int = spec.get("wid", 0)
        self.control = redis.Redis.from_url(spec["control_url"], socket_timeout=60)
        self.cfg = CircuitBreakerConfig(**spec["config"])
        self.watch = Watch()
        logging.getLogger("distbreaker").addHandler(self.watch)
        self.breaker: CircuitBreaker | None = None
        self.start = 0.0

    def build(self, name: str | None = None, client: redis.Redis | None = None
              ) -> CircuitBreaker:
        b = CircuitBreaker(name or self.spec["name"], self.cfg,
                           redis=client or redis.Redis.from_url(self.spec["url"]),
                           on_state_change=self.watch.hook)
        b.add_listener(self.watch.listener)
        return b

    def barrier(self) -> None:
        self.control.rpush(f"{self.ns}:ready", self.wid)
        got = self.control.blpop([f"{self.ns}:go"], timeout=60)
        if got is None:
            raise SystemExit(f"worker {self.wid}: no go within 60 s")
        self.start = float(got[1])
        delay = self.start - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def run(self) -> None:
        mode = self.spec["mode"]
        if not self.p.get("build_after_go"):
            self.breaker = self.build()
        self.barrier()
        getattr(self, f"mode_{mode}")()

    # -- scenarios ----------------------------------------------------------------------

    def mode_steady(self) -> None:
        """`threads` threads, each calling at `rate` calls/s until start + `duration`; the
        backend always succeeds. Per call: the time breaker.call took beyond the backend's
        own time."""
        b = self.breaker
        assert b is not None
        n_threads, rate, duration = self.p["threads"], self.p["rate"], self.p["duration"]
        limit = self.p["overhead_limit"]
        period = 1.0 / rate
        end = self.start + duration
        lock = threading.Lock()
        agg: dict[str, Any] = {"ok": 0, "rejected": 0, "exceptions": 0, "exception_types": {},
                               "max_overhead_s": 0.0, "worst_at": 0.0, "over_limit": 0,
                               "over_50ms": 0, "worst": []}

        def loop(i: int) -> None:
            ok = rejected = exceptions = over_limit = over_50 = 0
            types: dict[str, int] = {}
            worst: list[tuple[float, float]] = []
            spent = [0.0]

            def backend() -> int:
                t0 = time.perf_counter()
                spent[0] = time.perf_counter() - t0
                return 1

            nxt = self.start + i * period / n_threads
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                if nxt > now:
                    time.sleep(nxt - now)
                spent[0] = 0.0
                t0 = time.perf_counter()
                try:
                    b.call(backend)
                    ok += 1
                except CircuitOpenError:
                    rejected += 1
                except BaseException as e:  # anything else reached the caller
                    exceptions += 1
                    k = f"{type(e).__module__}.{type(e).__name__}"
                    types[k] = types.get(k, 0) + 1
                overhead = time.perf_counter() - t0 - spent[0]
                if overhead > limit:
                    over_limit += 1
                if overhead > 0.05:
                    over_50 += 1
                if len(worst) < 5 or overhead > worst[-1][0]:
                    worst.append((overhead, time.monotonic() - self.start))
                    worst.sort(reverse=True)
                    del worst[5:]
                nxt = max(nxt + period, time.monotonic() - period)  # late: no burst
            with lock:
                agg["ok"] += ok
                agg["rejected"] += rejected
                agg["exceptions"] += exceptions
                agg["over_limit"] += over_limit
                agg["over_50ms"] += over_50
                for k, v in types.items():
                    agg["exception_types"][k] = agg["exception_types"].get(k, 0) + v
                agg["worst"] = sorted(agg["worst"] + [[round(o, 4), round(t, 3)]
                                                      for o, t in worst], reverse=True)[:5]
                if worst and worst[0][0] > agg["max_overhead_s"]:
                    agg["max_overhead_s"], agg["worst_at"] = worst[0][0], round(worst[0][1], 3)

        threads = [threading.Thread(target=loop, args=(i,), name=f"caller-{i}")
                   for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        flushed = b.flush(10)
        rep = self.watch.report(b)
        b.close()
        emit(kind="result", wid=self.wid, flushed=flushed, **agg, **rep)

    def mode_flip(self) -> None:
        """Call all the time (a call every `interval` s) until `<ns>:stop` exists; the
        backend fails while `<ns>:fail` exists (read on every call)."""
        b = self.breaker
        assert b is not None
        fail_key, stop_key = f"{self.ns}:fail", f"{self.ns}:stop"
        interval = self.p["interval"]
        calls = failed = rejected = exceptions = 0
        types: dict[str, int] = {}

        def backend() -> int:
            if self.control.exists(fail_key):
                raise Boom("backend down")
            return 1

        next_stop_check = 0.0
        while True:
            now = time.monotonic()
            if now >= next_stop_check:
                if self.control.exists(stop_key):
                    break
                next_stop_check = now + 0.05
            calls += 1
            try:
                b.call(backend)
            except Boom:
                failed += 1
            except CircuitOpenError:
                rejected += 1
            except BaseException as e:
                exceptions += 1
                k = f"{type(e).__module__}.{type(e).__name__}"
                types[k] = types.get(k, 0) + 1
            time.sleep(interval)
        time.sleep(self.p.get("linger", 0.0))
        rep = self.watch.report(b)
        with self.watch.mu:
            heard = list(self.watch.transitions)
            hooks = list(self.watch.hooks)
        b.close()
        emit(kind="result", wid=self.wid, calls=calls, failed=failed, rejected=rejected,
             exceptions=exceptions, exception_types=types, heard=heard, hooks=hooks,
             state=str(b.get_state()), **rep)

    def mode_trips(self) -> None:
        """`runs` times, on a fresh breaker name each: `threads` threads are admitted
        together and all fail together (each backend waits until all are inside); right
        after the last call returns, compare this process's view with Redis."""
        from distbreaker._keys import BreakerKeys

        client = redis.Redis.from_url(self.spec["url"])
        plain = redis.Redis.from_url(self.spec["url"], socket_timeout=10)
        n = self.p["threads"]
        together = self.p.get("together", True)
        runs: list[dict[str, Any]] = []
        exceptions: dict[str, int] = {}
        failovers = 0
        for run in range(self.p["runs"]):
            name = f"{self.spec['name']}-{run}"
            b = self.build(name, client)
            assert b.get_state() is CircuitState.CLOSED and b.snapshot.known, b.snapshot
            start = threading.Barrier(n)
            inside = threading.Barrier(n)
            outcomes: list[str] = []

            def backend(inside: threading.Barrier = inside) -> None:
                if together:
                    inside.wait(10)
                raise Boom("backend down")

            def one(b: CircuitBreaker = b, start: threading.Barrier = start,
                    backend: Callable[[], None] = backend,
                    outcomes: list[str] = outcomes) -> None:
                start.wait(10)
                try:
                    b.call(backend)
                    outcomes.append("ok")
                except Boom:
                    outcomes.append("failed")
                except CircuitOpenError:
                    outcomes.append("rejected")
                except BaseException as e:
                    k = f"{type(e).__module__}.{type(e).__name__}"
                    exceptions[k] = exceptions.get(k, 0) + 1
                    outcomes.append(k)

            threads = [threading.Thread(target=one, name=f"t{i}") for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            snap = b.snapshot  # at once: no refresh, no waiting for pushes
            local_state = b.get_state()
            keys = BreakerKeys.for_name(name)
            st, gen, forced = plain.hmget(keys.state, "state", "generation", "forced")
            redis_state = bytes(forced or st or b"").decode()
            redis_gen = int(gen or 0)
            behind = (redis_state == "open" and local_state is not CircuitState.OPEN) or (
                snap.generation < redis_gen)
            runs.append({"run": run, "outcomes": sorted(outcomes), "local": str(local_state),
                         "local_gen": snap.generation, "redis": redis_state,
                         "redis_gen": redis_gen, "behind": behind,
                         "degraded": b.store_degraded})
            failovers = b.get_metrics().store_failovers  # one guard: the process's count
            b.close()
        rep = self.watch.report(None)
        rep["store_failovers"] = failovers
        emit(kind="result", wid=self.wid, runs=runs, exceptions=exceptions, **rep)

    def mode_kills(self) -> None:
        """Call at `rate` until start + `quiet_at`; then only poll is_available() (every
        millisecond, no calls) until it turns False or start + `deadline`."""
        b = self.breaker
        assert b is not None
        period = 1.0 / self.p["rate"]
        calls = rejected = exceptions = 0
        types: dict[str, int] = {}
        nxt = self.start
        quiet = self.start + self.p["quiet_at"]
        while time.monotonic() < quiet:
            try:
                b.call(lambda: 1)
            except CircuitOpenError:
                rejected += 1
            except BaseException as e:
                exceptions += 1
                k = f"{type(e).__module__}.{type(e).__name__}"
                types[k] = types.get(k, 0) + 1
            calls += 1
            nxt = max(nxt + period, time.monotonic() - period)
            d = nxt - time.monotonic()
            if d > 0:
                time.sleep(d)
        available_at_quiet = b.is_available()
        unavailable_at = None
        end = self.start + self.p["deadline"]
        while time.monotonic() < end:
            if not b.is_available():
                unavailable_at = time.monotonic()
                break
            time.sleep(0.001)
        rep = self.watch.report(b)
        state = str(b.get_state())
        b.close()
        emit(kind="result", wid=self.wid, calls=calls, rejected=rejected,
             exceptions=exceptions, exception_types=types,
             available_at_quiet=available_at_quiet, unavailable_at=unavailable_at,
             state=state, **rep)

    def mode_probe(self) -> None:
        """A fresh process: build the breaker after the go, then call (a call every
        `interval` s) until one is admitted or `deadline` s have passed."""
        t_build = time.monotonic()
        b = self.breaker = self.build()
        first_state = str(b.get_state())
        admitted_after = None
        rejections = 0
        retry_afters: list[float | None] = []
        executed = 0
        exceptions: dict[str, int] = {}

        def backend() -> int:
            nonlocal executed
            executed += 1
            return 1

        t0 = time.monotonic()
        end = t0 + self.p["deadline"]
        while time.monotonic() < end:
            try:
                b.call(backend)
                admitted_after = time.monotonic() - t0
                break
            except CircuitOpenError as e:
                rejections += 1
                if len(retry_afters) < 5:
                    retry_afters.append(e.retry_after)
            except BaseException as e:
                k = f"{type(e).__module__}.{type(e).__name__}"
                exceptions[k] = exceptions.get(k, 0) + 1
            time.sleep(self.p["interval"])
        state_after = str(b.get_state())
        rep = self.watch.report(b)
        b.close()
        emit(kind="result", wid=self.wid, build_s=round(t0 - t_build, 3),
             first_state=first_state, admitted_after=admitted_after, rejections=rejections,
             retry_afters=retry_afters, executed=executed, exceptions=exceptions,
             state_after=state_after, **rep)


def main() -> int:
    spec = json.loads(sys.argv[1])
    signal.alarm(int(spec.get("timeout", 120)))  # default action: the process ends
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    Worker(spec).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
