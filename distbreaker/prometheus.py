"""Prometheus metrics (extra ``prometheus``): this process's view and the fleet's.

`ProcessCollector` exports what the breakers of this process counted (calls by outcome,
rejections, transitions made here, probe admissions, local state, store degradation).
`FleetCollector` reads every breaker under a prefix from Redis on each scrape: one
sidecar (`distbreaker serve-metrics`) can export a whole fleet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._admin import list_breakers
from ._config import CircuitState

__all__ = ["FleetCollector", "ProcessCollector", "serve"]

_STATES = [s.value for s in CircuitState]


class ProcessCollector(Collector):
    """Metrics of this process's breakers. Pass breakers, a manager, or a callable that
    returns breakers (read on every scrape, so breakers added later are included)."""

    def __init__(self, breakers: Iterable[Any] | Any) -> None:
        self._source = breakers

    def _breakers(self) -> list[Any]:
        src = self._source
        if hasattr(src, "providers") and hasattr(src, "get_breaker"):
            return [src.get_breaker(p) for p in src.providers]
        if callable(src):
            return list(src())
        return list(src)

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily("distbreaker_process_calls",
                                    "Guarded calls finished in this process, by outcome",
                                    labels=["breaker", "outcome"])
        rejected = CounterMetricFamily("distbreaker_process_rejections",
                                       "Calls this process did not admit", labels=["breaker"])
        trans = CounterMetricFamily("distbreaker_process_transitions",
                                    "Transitions made by this process's scripts",
                                    labels=["breaker"])
        probes = CounterMetricFamily("distbreaker_process_probes",
                                     "Half-open probe permits granted to this process",
                                     labels=["breaker"])
        slow = CounterMetricFamily("distbreaker_process_slow_calls", "Slow calls",
                                   labels=["breaker"])
        timeouts = CounterMetricFamily("distbreaker_process_timeouts",
                                       "Calls over timeout_duration", labels=["breaker"])
        state = GaugeMetricFamily("distbreaker_process_state",
                                  "State as this process sees it (1 for the current one)",
                                  labels=["breaker", "state"])
        degraded = GaugeMetricFamily("distbreaker_store_degraded",
                                     "1 while Redis is unavailable to this process",
                                     labels=["breaker"])
        misconfigured = GaugeMetricFamily(
            "distbreaker_store_misconfigured",
            "1 while Redis refuses this process for a configuration reason (credentials, "
            "ACL, db index)", labels=["breaker"])
        unshared = CounterMetricFamily(
            "distbreaker_process_unshared_outcomes",
            "Outcomes applied only to this process's local fallback (Redis unavailable)",
            labels=["breaker"])
        lost = CounterMetricFamily(
            "distbreaker_process_lost_outcomes",
            "Outcomes sent to Redis whose fate is unknown (no reply in time)",
            labels=["breaker"])
        failovers = CounterMetricFamily(
            "distbreaker_store_failovers",
            "Times this process failed over from Redis to its local fallback",
            labels=["breaker"])
        for b in self._breakers():
            m = b.get_metrics()  # local counts, no I/O
            n = b.name
            calls.add_metric([n, "success"], m.successful_calls)
            calls.add_metric([n, "failure"], m.failed_calls)
            calls.add_metric([n, "ignored"], m.ignored_calls)
            rejected.add_metric([n], m.rejected_calls)
            trans.add_metric([n], m.state_changes)
            probes.add_metric([n], m.probes)
            slow.add_metric([n], m.slow_calls)
            timeouts.add_metric([n], m.timeouts)
            cur = b.get_state().value
            for s in _STATES:
                state.add_metric([n, s], 1.0 if s == cur else 0.0)
            degraded.add_metric([n], 1.0 if b.store_degraded else 0.0)
            misconfigured.add_metric([n], 0.0 if b.store_problem is None else 1.0)
            unshared.add_metric([n], m.unshared_outcomes)
            lost.add_metric([n], m.lost_outcomes)
            failovers.add_metric([n], m.store_failovers)
        yield from (calls, rejected, trans, probes, slow, timeouts, state, degraded,
                    misconfigured, unshared, lost, failovers)


class FleetCollector(Collector):
    """Every breaker under `prefix` as Redis holds it, read at scrape time."""

    def __init__(self, client: Any, prefix: str = "distbreaker") -> None:
        self.client = client
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("distbreaker_fleet_up", "1 if Redis answered this scrape")
        t0 = time.perf_counter()
        try:
            views = list_breakers(self.client, self.prefix)
        except Exception:
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield GaugeMetricFamily("distbreaker_fleet_scrape_seconds",
                                "Time to read every breaker from Redis",
                                value=time.perf_counter() - t0)
        yield GaugeMetricFamily("distbreaker_fleet_breakers", "Breakers in Redis",
                                value=len(views))
        fams: dict[str, GaugeMetricFamily] = {}

        def g(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
            if name not in fams:
                fams[name] = GaugeMetricFamily(name, doc, labels=["breaker", *(labels or [])])
            return fams[name]

        for v in views:
            d = v.to_dict()
            n = v.name
            for s in _STATES:
                g("distbreaker_state", "Effective fleet state (1 for the current one)",
                  ["state"]).add_metric([n, s], 1.0 if d["state"] == s else 0.0)
            g("distbreaker_override", "1 while an operator override holds the breaker",
              ["override"]).add_metric([n, v.forced or "none"], 1.0)
            w = d["window"]
            g("distbreaker_window_calls", "Calls in the shared window").add_metric(
                [n], w["calls"])
            g("distbreaker_window_failures", "Failures in the shared window").add_metric(
                [n], w["failures"])
            g("distbreaker_window_slow_calls", "Slow calls in the shared window").add_metric(
                [n], w["slow"])
            g("distbreaker_failure_rate", "Failure rate of the shared window").add_metric(
                [n], d["failure_rate"])
            g("distbreaker_consecutive_failures", "Failures in a row, fleet-wide").add_metric(
                [n], d["consecutive_failures"])
            g("distbreaker_generation", "Transitions and overrides so far (generation)"
              ).add_metric([n], d["generation"])
            g("distbreaker_active_probes", "Half-open probe leases held now").add_metric(
                [n], len(d["probes"]))
            ra = d["retry_after_s"]
            g("distbreaker_retry_after_seconds", "Seconds until a probe may go out"
              ).add_metric([n], -1.0 if ra is None else ra)
            g("distbreaker_config_drift", "1 if two configs wrote the breaker recently"
              ).add_metric([n], 1.0 if d["config_drift"] else 0.0)
        yield from fams.values()


def serve(collector: Collector, port: int, host: str = "0.0.0.0",
          stop: Callable[[], bool] | None = None) -> None:
    """Serve `collector` at http://host:port/metrics until interrupted (or `stop()`)."""
    reg = CollectorRegistry()
    reg.register(collector)
    start_http_server(port, addr=host, registry=reg)
    try:
        while not (stop and stop()):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
