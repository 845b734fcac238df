"""The pure model, table-driven, with a fake clock: each row is a sequence of operations
and the state it must end in."""

from __future__ import annotations

from typing import Any

import pytest

from distbreaker import CircuitBreakerConfig
from distbreaker._model import BreakerModel, ModelConfig

CFG = CircuitBreakerConfig(failure_threshold=3, recovery_timeout=10, success_threshold=2,
                           minimum_calls=4, failure_rate_threshold=0.5, window_size=10,
                           window_buckets=10, half_open_max_calls=2, probe_lease=5,
                           backoff_jitter=0.0, max_recovery_timeout=25,
                           slow_call_rate_threshold=0.5)
C = ModelConfig.parse(CFG.script_arg)
FP = CFG.fingerprint


def run(steps: list[tuple[Any, ...]]) -> tuple[BreakerModel, list[Any]]:
    """Steps: (t_ms, op, arg). op: ok / fail / slow / acq / done / force / reset."""
    m = BreakerModel()
    last: list[Any] = []
    for t, op, *arg in steps:
        if op == "acq":
            last, _ = m.acquire(C, FP, "n", 0.5, t, arg[0])
        elif op == "force":
            last, _ = m.force(FP, "n", t, arg[0])
        elif op == "reset":
            last, _ = m.reset(FP, "n", t)
        else:
            code = {"ok": 0, "fail": 1, "slow": 2, "none": 4}[op]
            lease = arg[0] if arg else ""
            last, _ = m.record(C, FP, "n", 0.5, t, [(m.gen, code, lease, 0)])
    return m, last


F = [(0, "fail")]
TABLE: list[tuple[str, list[tuple[Any, ...]], dict[str, Any]]] = [
    ("two failures stay closed", F * 2, {"state": "closed", "cf": 2}),
    ("third failure trips", F * 3, {"state": "open", "gen": 1, "open_until": 10_000}),
    ("a success breaks the streak", F * 2 + [(0, "ok")] * 5 + F * 2,
     {"state": "closed", "cf": 2}),
    ("rate rule waits for minimum calls",
     [(0, "ok"), (0, "fail"), (0, "ok")], {"state": "closed"}),
    ("rate rule trips at 0.5 of 4",
     [(0, "ok"), (0, "fail"), (0, "ok"), (0, "fail")], {"state": "open"}),
    ("slow rule trips", [(0, "ok"), (0, "slow"), (0, "ok"), (0, "slow")], {"state": "open"}),
    ("open rejects before its time", F * 3 + [(9_999, "acq", "a")], {"state": "open"}),
    ("open turns half-open when due", F * 3 + [(10_000, "acq", "a")],
     {"state": "half_open", "gen": 2, "probes": {"a": 15_000}}),
    ("two probes at most", F * 3 + [(10_000, "acq", "a"), (10_000, "acq", "b"),
                                    (10_000, "acq", "c")],
     {"state": "half_open", "probes": {"a": 15_000, "b": 15_000}}),
    ("expired lease frees a permit",
     F * 3 + [(10_000, "acq", "a"), (10_000, "acq", "b"), (15_000, "acq", "c")],
     {"probes": {"c": 20_000}}),
    ("two probe successes close",
     F * 3 + [(10_000, "acq", "a"), (10_001, "ok", "a"), (10_002, "acq", "b"),
              (10_003, "ok", "b")], {"state": "closed", "gen": 3, "probes": {}}),
    ("probe failure reopens with backoff",
     F * 3 + [(10_000, "acq", "a"), (10_001, "fail", "a")],
     {"state": "open", "reopen": 1, "open_until": 30_001}),
    ("backoff is capped",
     F * 3 + [(10_000, "acq", "a"), (10_001, "fail", "a"), (30_001, "acq", "b"),
              (30_002, "fail", "b")], {"reopen": 2, "open_until": 55_002}),
    ("force open holds", [(0, "force", "open"), (10**9, "acq", "x")],
     {"forced": "open", "state": "closed", "gen": 1}),
    ("forced closed counts nothing", [(0, "force", "closed")] + F * 5,
     {"state": "closed", "cf": 0}),
    ("reset clears all", F * 3 + [(1, "force", "open"), (2, "reset")],
     {"state": "closed", "forced": "", "gen": 3, "cf": 0}),
    ("window forgets old buckets", F * 2 + [(10_000, "ok"), (10_000, "fail")],
     {"state": "closed", "cf": 1}),
]


@pytest.mark.parametrize(("title", "steps", "expect"), TABLE, ids=[t[0] for t in TABLE])
def test_model(title: str, steps: list[tuple[Any, ...]], expect: dict[str, Any]) -> None:
    m, _ = run(steps)
    for field, value in expect.items():
        assert getattr(m, field) == value, (title, field)


def test_stale_generation_is_not_counted() -> None:
    m = BreakerModel()
    for _ in range(3):
        m.record(C, FP, "n", 0.5, 0, [(0, 1, "", 0)])
    reply, msgs = m.record(C, FP, "n", 0.5, 1, [(0, 0, "", 0)])
    assert reply[0] == 0 and m.state == "open" and msgs == []


def test_one_message_per_transition() -> None:
    m = BreakerModel()
    msgs = []
    for _ in range(6):
        msgs += m.record(C, FP, "n", 0.5, 0, [(m.gen, 1, "", 0)])[1]
    assert msgs == ["v1 t closed open 1 10000 0 - - - n"]


@pytest.mark.parametrize("count_window", [False, True])
def test_plain_success_is_record_of_one_success(count_window: bool) -> None:
    """The in-process store's shortcut for a plain success (`plain_success`) leaves the
    model exactly as `record()` of the same success does, or refuses and changes nothing,
    over random histories (codes, generations, overrides, time steps)."""
    import copy
    import random

    cfg = C if not count_window else ModelConfig.parse(CircuitBreakerConfig(
        failure_threshold=3, minimum_calls=4, failure_rate_threshold=0.5, window_size=6,
        window_type="count", backoff_jitter=0.0).script_arg)
    rng = random.Random(7)
    applied = refused = 0
    for _ in range(300):
        m = BreakerModel()
        t = 0
        for _ in range(rng.randrange(0, 30)):
            t += rng.choice((0, 1, 500, 3000, 11_000))
            op = rng.random()
            if op < 0.8:
                m.record(cfg, FP, "n", 0.5, t, [(m.gen - (rng.random() < 0.1),
                                                rng.choice((0, 0, 1, 2, 3)), "", 0)])
            elif op < 0.9:
                m.acquire(cfg, FP, "n", 0.5, t, f"l{t}")
            else:
                m.force(FP, "n", t, rng.choice(("open", "closed", "")))
        t += rng.choice((0, 1, 999, 12_000))
        gen = m.gen - (rng.random() < 0.2)
        want = copy.deepcopy(m)
        before = copy.deepcopy(m)
        if m.plain_success(cfg, t, gen, FP):
            applied += 1
            reply, msgs = want.record(cfg, FP, "n", 0.5, t, [(gen, 0, "", 0)])
            assert msgs == [] and reply == [1, gen, t]
            assert m == want
        else:
            refused += 1
            assert m == before
    assert applied > 50 and refused > 50  # both sides exercised


def test_plain_success_refuses_what_is_not_plainly_closed() -> None:
    m = BreakerModel()
    assert not m.plain_success(C, 0, 0, FP)  # no state yet: the full path creates it
    m.record(C, FP, "n", 0.5, 0, [(0, 0, "", 0)])
    assert m.plain_success(C, 1, 0, FP) and m.window.calls == 2
    assert not m.plain_success(C, 2, 1, FP)  # another generation
    m.force(FP, "n", 3, "closed")
    assert not m.plain_success(C, 4, m.gen, FP)  # an override
