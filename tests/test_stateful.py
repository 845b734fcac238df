"""Stateful differential test: the Lua scripts on a real Redis against the pure model.

A hypothesis `RuleBasedStateMachine` sends the very same script calls (same arguments, same
`rnd`, same test time through ARGV[6], i.e. `build_call(now_ms=...)`) to two stores:
`MemoryStore` (distbreaker/_model.py) and `RedisStore` (lua/*.lua on the session's private
redis-server; every example starts with FLUSHDB and a fresh breaker name). Rules:

* acquire: an admission with a fresh lease id;
* record: a batch of 1-5 outcomes (the current or an older generation, code 0-4, a granted
  lease or '', no retry-after or some);
* operator: force open / force closed / release ('') / reset, at most every CALM steps;
* snapshot;
* time_step: 0 ms to about twice the longest period, or to just before / at / after the
  next deadline in the state (open_until, a held probe lease's end, a bucket boundary);
* call: what a client does, as one rule: wait, acquire, record the outcome under the
  generation and lease the admission returned (or not: the call is still running).

After every step the full reply arrays must be equal (snapshot: all but updated_at_ms), and
so must the transition messages published on each side. An invariant, run after every
step, compares full snapshots (half-open successes, reopen count, opened_at, active probes
included) and checks what must hold whatever the sequence: the generation never decreases,
active probes never exceed half_open_max_calls, 0 <= failures <= calls and 0 <= slow <=
calls in every window total. Each config must also reach all three states.

Hypothesis runs derandomized and without an example database, so CI sees the same examples
on every run. A failure prints the minimal sequence of rules that reproduces it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any, ClassVar

import hypothesis.strategies as st
import pytest
import redis
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from distbreaker import CircuitBreakerConfig
from distbreaker._keys import BreakerKeys
from distbreaker._model import ModelConfig
from distbreaker._protocol import ScriptCall, build_call, decode_push
from distbreaker.stores import MemoryStore, RedisStore

from redis_server import RedisServer

T0 = 1_700_000_000_000
CHANNEL = "stateful-test:v1:events"
SNAP_UPDATED_AT = 17  # updated_at_ms: the Lua skips writes that change nothing
CALM = 4  # steps between two operator actions (force, reset), or they undo too much

# Small thresholds and short periods, so that every example moves through all three states.
CONFIGS: dict[str, CircuitBreakerConfig] = {
    "time": CircuitBreakerConfig(
        failure_threshold=2, recovery_timeout=1.0, success_threshold=2,
        failure_rate_threshold=0.5, minimum_calls=3, window_type="time", window_size=2.0,
        window_buckets=4, slow_call_rate_threshold=0.5, half_open_max_calls=2,
        max_recovery_timeout=4.0, backoff_multiplier=2.0, backoff_jitter=0.2,
        probe_lease=0.7,
    ),
    "count": CircuitBreakerConfig(
        failure_threshold=3, recovery_timeout=0.5, success_threshold=1,
        failure_rate_threshold=0.5, minimum_calls=2, window_type="count", window_size=4,
        slow_call_rate_threshold=0.5, half_open_max_calls=1, max_recovery_timeout=3.0,
        backoff_multiplier=3.0, backoff_jitter=0.5, probe_lease=1.0,
    ),
}

SETTINGS = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    # no explain phase: its tracing makes reporting a failure much slower
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)


def _norm(raw: Any) -> list[Any]:
    return [v.decode() if isinstance(v, bytes) else v for v in raw]


def _waits(cfg: CircuitBreakerConfig) -> st.SearchStrategy[int | tuple[str, int]]:
    """How far to move the clock: a number of ms (0 to about twice the longest period, the
    periods' edges drawn often), or (deadline, delta) for delta ms after the next deadline
    in the state, where `<` and `<=` differ: the open period ends, a probe lease expires,
    the time window rolls over to a new bucket."""
    m = ModelConfig.parse(cfg.script_arg)
    periods = [m.recovery_ms, m.max_recovery_ms, m.lease_ms] + (
        [] if m.count_window else [m.bucket_ms, m.bucket_ms * m.window_n])
    edges = sorted({max(0, p + d) for p in periods for d in (-1, 0, 1)} | {0, 1})
    deadlines = ["open_until", "lease"] + ([] if m.count_window else ["bucket"])
    return st.one_of(
        st.sampled_from(edges),
        st.integers(0, 2 * max(periods)),
        st.tuples(st.sampled_from(deadlines), st.sampled_from([-1, 0, 0, 1])),
    )


_CODE = st.sampled_from([0, 1, 1, 1, 2, 3, 4])  # failures often, to trip and to reopen
_CALL_CODE = st.sampled_from([None, None, 0, 0, 1, 1, 2, 3, 4])
_RETRY_AFTER = st.sampled_from([0, 0, 1, 300, 2500, 100_000])  # from the provider, in ms
_LEASE = st.one_of(st.none(), st.integers(0, 63))  # None: no lease, i: the i-th newest granted
_OUTCOME = st.tuples(
    st.sampled_from([0, 0, 0, 1, 2]),  # generation age: mostly the current one
    _CODE,
    _LEASE,
    _RETRY_AFTER,
)
_RND = st.one_of(st.sampled_from([0.0, 0.5, 0.999999]), st.floats(0, 1, exclude_max=True))


class LuaVsModel(RuleBasedStateMachine):
    """Drives both stores; `_machine` sets `client` and `cfg` and adds the rules that
    move the clock, whose steps depend on the config."""

    client: ClassVar[redis.Redis]
    cfg: ClassVar[CircuitBreakerConfig]
    seen: ClassVar[set[str]]  # states reached, over all examples of one config
    _names = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.client.flushdb()
        self.mcfg = ModelConfig.parse(self.cfg.script_arg)
        self.keys = BreakerKeys.for_name(f"sm{next(self._names)}")
        self.lua = RedisStore(self.client)
        self.model = MemoryStore(clock_ms=lambda: self.now)
        self.model_msgs: list[str] = []
        self.model.subscribe(CHANNEL, self.model_msgs.append)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(CHANNEL)
        self._lua_messages()  # wait for the subscription, drop anything older
        self.now = T0
        self.gen = 0
        self.granted: list[str] = []
        self.lease_ids = itertools.count()
        self.states_seen: set[str] = set()
        self.calm = CALM  # steps since the last force or reset
        self.open_until = 0
        self.held: dict[str, int] = {}  # granted leases not given back yet -> their end

    def teardown(self) -> None:
        self.pubsub.close()

    # -- plumbing -------------------------------------------------------------------------

    def _lua_messages(self) -> list[str]:
        """Everything published to CHANNEL up to now: PING is answered after them."""
        self.pubsub.ping()
        out: list[str] = []
        for _ in range(10_000):
            m = self.pubsub.get_message(timeout=5.0)
            if m is None:
                continue
            if m["type"] == "pong":
                return out
            if m["type"] == "message":
                out.append(m["data"].decode())
        raise AssertionError("no PONG from the pub/sub connection")

    def _run(self, op: str, rnd: float = 0.5, extra: list[Any] | None = None) -> list[Any]:
        call: ScriptCall = build_call(op, self.keys, self.cfg, CHANNEL, rnd=rnd,
                                      now_ms=self.now, extra=extra or [])
        a = _norm(self.lua.run(call))
        b = _norm(self.model.run(call))
        if op == "snapshot":
            a[SNAP_UPDATED_AT] = b[SNAP_UPDATED_AT] = 0
        where = f"{op} at t0+{self.now - T0} rnd={rnd!r} extra={call.args[6:]}"
        assert a == b, f"{where}\n  lua:   {a}\n  model: {b}"
        ma, mb = self._lua_messages(), list(self.model_msgs)
        self.model_msgs.clear()
        assert ma == mb, f"{where}: published\n  lua:   {ma}\n  model: {mb}"
        for m in ma:
            assert decode_push(m) is not None, m
        self._check_reply(b)
        return b

    def _check_reply(self, r: list[Any]) -> None:
        if len(r) == 3:  # record.lua's short reply: still plainly CLOSED
            r = [r[0], "closed", "", r[1], 0, r[2], "", 0, -1, -1, -1, -1, 0, ""]
        elif len(r) == 7:  # the short reply with window counts (batched mode)
            r = [r[0], "closed", "", r[1], 0, r[2], "", 0, -1, r[3], r[4], r[5], r[6], ""]
        assert r[3] >= self.gen, f"generation went back from {self.gen} to {r[3]}: {r}"
        if r[3] != self.gen:
            self.held.clear()  # a transition clears the probes
        self.gen = r[3]
        self.open_until = r[4]
        self.states_seen.add(r[1])
        c, f, s = r[9], r[10], r[11]
        if (c, f, s) != (-1, -1, -1):
            assert 0 <= f <= c and 0 <= s <= c, f"bad window totals {c} {f} {s}: {r}"
            if self.mcfg.count_window:
                assert c <= self.mcfg.window_n, r
        assert r[8] <= self.mcfg.half_open_max, f"probes_free above half_open_max_calls: {r}"
        assert r[12] >= 0, r

    def _advance(self, wait: int | tuple[str, int]) -> None:
        if isinstance(wait, int):
            self.now += wait
            return
        deadline, delta = wait
        if deadline == "open_until":
            target = self.open_until
        elif deadline == "lease":
            target = min((t for t in self.held.values() if t > self.now), default=0)
        else:
            target = (self.now // self.mcfg.bucket_ms + 1) * self.mcfg.bucket_ms
        self.now = max(self.now, target + delta)

    # -- rules ----------------------------------------------------------------------------

    @initialize(rnd=_RND)
    def first_snapshot(self, rnd: float) -> None:
        r = self._run("snapshot", rnd)
        assert r[0] == 0 and r[1] == "closed" and r[3] == 0, r  # nothing stored yet

    def _acquire(self, rnd: float) -> tuple[list[Any], str]:
        lease = f"l{next(self.lease_ids)}"  # fresh for every admission
        r = self._run("acquire", rnd, [lease])
        if r[0] == 2:
            assert r[1] == "half_open" and r[2] == "" and 0 <= r[8] < self.mcfg.half_open_max, r
            self.granted.append(lease)
            self.held[lease] = self.now + self.mcfg.lease_ms
        elif r[0] == 1:
            assert r[2] == "closed" or (r[2] == "" and r[1] == "closed"), r
        else:
            assert r[0] == 0 and (r[2] == "open" or (r[2] == "" and r[1] != "closed")), r
        return r, lease

    @rule(rnd=_RND)
    def acquire(self, rnd: float) -> None:
        self._acquire(rnd)

    @rule(groups=st.lists(_OUTCOME, min_size=1, max_size=5), rnd=_RND,
          mode=st.sampled_from(["", "c"]))
    def record(self, groups: list[tuple[int, int, int | None, int]], rnd: float,
               mode: str) -> None:
        extra: list[Any] = [mode]
        for age, code, pick, ra in groups:
            lease = ""
            if pick is not None and self.granted:  # 0: the newest lease, likely still held
                lease = self.granted[-1 - pick % len(self.granted)]
                self.held.pop(lease, None)
            extra += [max(0, self.gen - age), code, lease, ra]
        r = self._run("record", rnd, extra)
        assert 0 <= r[0] <= len(groups), r

    # One rule for the operator, and not too often: an override sticks until released.
    @precondition(lambda self: self.calm >= CALM)
    @rule(action=st.sampled_from(["force open", "force closed", "release", "reset"]),
          rnd=_RND)
    def operator(self, action: str, rnd: float) -> None:
        self.calm = 0
        if action == "reset":
            r = self._run("reset", rnd)
            assert (r[0], r[1], r[2], r[12]) == (1, "closed", "", 0), r
        else:
            mode = {"force open": "open", "force closed": "closed", "release": ""}[action]
            r = self._run("force", rnd, [mode])
            assert r[2] == mode, r

    @rule(rnd=_RND)
    def snapshot(self, rnd: float) -> None:
        self._run("snapshot", rnd)

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def full_state_agrees(self) -> None:
        self.calm += 1  # invariants run once after every step
        # snapshot writes nothing, so it may run between any two steps
        r = self._run("snapshot")
        assert r[0] == 1 or r[3] == 0, r
        active = r[19]
        assert 0 <= active <= self.mcfg.half_open_max, f"{active} active probes: {r}"
        if r[1] == "half_open":
            assert r[8] == self.mcfg.half_open_max - active, r
        assert r[15] >= 0 and r[14] >= 0, r
        assert r[14] < self.mcfg.success_threshold or r[1] != "half_open", r


def _machine(name: str, client: redis.Redis) -> type[LuaVsModel]:
    """The machine for one config, with its own clock steps; `seen` collects states."""
    cfg = CONFIGS[name]

    class Machine(LuaVsModel):
        seen: ClassVar[set[str]] = set()

        @rule(wait=_waits(cfg))
        def time_step(self, wait: int | tuple[str, int]) -> None:
            self._advance(wait)

        # What a client does, as one rule (swarm testing turns rules off per example, and
        # must not separate the three): wait, acquire, and unless the call is still running
        # (or its process died: code None), record its outcome under the generation and
        # lease that the admission returned.
        @rule(wait=_waits(cfg), outcome=st.tuples(_CALL_CODE, _RETRY_AFTER), rnd=_RND)
        def call(self, wait: int | tuple[str, int], outcome: tuple[int | None, int],
                 rnd: float) -> None:
            self._advance(wait)
            r, lease = self._acquire(rnd)
            code, ra = outcome
            if r[0] != 0 and code is not None:
                self.held.pop(lease, None)
                self._run("record", rnd, ["", r[3], code, lease if r[0] == 2 else "", ra])

        def teardown(self) -> None:
            self.seen.update(self.states_seen)
            super().teardown()

    Machine.client = client
    Machine.cfg = cfg
    Machine.__name__ = Machine.__qualname__ = f"LuaVsModel_{name}"
    return Machine


@pytest.fixture
def stateful_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis_server.client()
    yield c
    c.flushdb()
    c.close()


@pytest.mark.timeout(600)  # passing takes seconds; shrinking a failure can take a minute
@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_lua_and_model_agree_statefully(cfg_name: str, stateful_client: redis.Redis) -> None:
    machine = _machine(cfg_name, stateful_client)
    run_state_machine_as_test(machine, settings=SETTINGS)
    # the sequences must reach every state, or the comparison proves little
    assert machine.seen == {"closed", "open", "half_open"}, machine.seen
