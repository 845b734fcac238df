"""This process's counters: the latency and history rings, at and past their sizes."""

from __future__ import annotations

import tracemalloc

from distbreaker import CircuitBreaker, CircuitBreakerConfig, MemoryStore
from distbreaker.metrics import HISTORY_SIZE, Counters


def test_rings_keep_the_last_calls_in_order_across_wraparound() -> None:
    c = Counters()
    n = 1000  # past both rings several times (256 latencies, 100 records)
    for k in range(n):
        failed = None if k % 7 == 0 else k % 3 == 0
        c.outcome(failed, float(k), slow=k % 5 == 0, timeout=k % 11 == 0)
    m = c.view("x", "closed", None)
    hist = m.request_history
    assert len(hist) == HISTORY_SIZE
    assert [r.latency_s for r in hist] == [float(k) for k in range(n - HISTORY_SIZE, n)]
    for r in hist:
        k = int(r.latency_s)
        want = "ignored" if k % 7 == 0 else "failure" if k % 3 == 0 else "success"
        assert (r.outcome, r.slow, r.timeout) == (want, k % 5 == 0, k % 11 == 0)
    assert [r.at for r in hist] == sorted(r.at for r in hist)
    last = [float(k) for k in range(n - 256, n)]
    assert m.mean_latency_s == sum(last) / 256
    assert m.p95_latency_s == sorted(last)[int(0.95 * 256)]
    assert (m.total_calls, m.ignored_calls) == (n, sum(1 for k in range(n) if k % 7 == 0))


def test_rings_below_their_size_and_after_clear() -> None:
    c = Counters()
    for k in range(3):
        c.outcome(False, 0.5 + k, False, False)
    m = c.view("x", "closed", None)
    assert [r.latency_s for r in m.request_history] == [0.5, 1.5, 2.5]
    assert m.mean_latency_s == 1.5
    c.clear()
    m = c.view("x", "closed", None)
    assert m.request_history == () and m.mean_latency_s == 0.0 and m.total_calls == 0
    c.outcome(True, 2.0, False, False)
    assert [r.outcome for r in c.view("x", "closed", None).request_history] == ["failure"]


def test_a_busy_breaker_holds_kilobytes_not_tens_of_them() -> None:
    """Counted, not timed: the process memory a breaker holds once its rings are full
    (the metrics held 50 KB of float and tuple objects per busy breaker before)."""
    store = MemoryStore()
    b = CircuitBreaker("svc", CircuitBreakerConfig(), redis=store)
    for _ in range(50):
        b.call(lambda: 1)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(2000):
            b.call(lambda: 1)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(x.size_diff for x in after.compare_to(before, "filename")
                if "distbreaker" in x.traceback[0].filename)
    assert grown < 4096, grown
    b.close()


def test_a_fork_in_the_middle_of_an_outcome_leaves_rings_that_read() -> None:
    """A child forked while another thread was inside `outcome` inherits rings appended
    to but a call not counted; after the fork hook they agree again and read."""
    c = Counters()
    for k in range(5):
        c.outcome(False, float(k), False, False)
    c._lat.append(99.0)  # the parent's thread stopped here, halfway through a sixth
    c._at.append(0.0)
    c.after_fork()
    m = c.view("x", "closed", None)
    assert [r.latency_s for r in m.request_history] == [0.0, 1.0, 2.0, 3.0, 4.0]
    c.outcome(True, 5.0, False, False)
    hist = c.view("x", "closed", None).request_history
    assert [r.latency_s for r in hist][-1] == 5.0 and hist[-1].outcome == "failure"
