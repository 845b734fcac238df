"""The Lua scripts against the pure model, their headers, and the NOSCRIPT path.

The differential test runs the same random sequences of script calls (same arguments,
same test clock, same random numbers) through the in-process model and through the Lua
on fakeredis and on a real Redis, and requires identical replies after every step.
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from distbreaker import CircuitBreaker, CircuitBreakerConfig
from distbreaker._keys import BreakerKeys, channel_for
from distbreaker._protocol import Code, ScriptCall, build_call, decode_reply
from distbreaker.stores import MemoryStore, RedisStore
from distbreaker.stores._scripts import OPS, _lua_dir, function_name, script_source

from redis_server import RedisServer

LUA = Path(str(_lua_dir()))  # the installed package's copy when testing a wheel
T0 = 1_700_000_000_000


def _norm(raw: Any) -> list[Any]:
    out = []
    for v in raw:
        out.append(v.decode() if isinstance(v, bytes) else v)
    return out


def _random_call(rng: random.Random, i: int, now: int, gen: int, leases: list[str],
                 keys: BreakerKeys, cfg: CircuitBreakerConfig) -> ScriptCall:
    op = rng.choices(["acquire", "record", "snapshot", "force", "reset"],
                     weights=[25, 60, 8, 5, 2])[0]
    extra: list[Any] = []
    if op == "acquire":
        extra = [f"l{i}"]
        leases.append(extra[0])
    elif op == "record" and rng.random() < 0.3:  # batched mode's compact runs
        runs = [(max(0, gen - rng.choice([0, 0, 0, 1])), rng.choice([0, 0, 1, 1, 2, 3]),
                 rng.choice([0, 0, 2500]), rng.choice([1, 1, 2, 7])) for _ in range(3)]
        extra = ["r", ";".join(",".join(map(str, r)) for r in runs)]
    elif op == "record":
        extra = [rng.choice(["", "c"])]
        for _ in range(rng.choice([1, 1, 1, 2, 5])):
            lease = leases.pop(rng.randrange(len(leases))) if leases and rng.random() < .5 else ""
            extra += [max(0, gen - rng.choice([0, 0, 0, 0, 1])),  # mostly the current one
                      rng.choice([0, 0, 1, 1, 1, 2, 3, 4]), lease, rng.choice([0, 0, 0, 2500])]
    elif op == "force":
        extra = [rng.choice(["open", "closed", "", ""])]
    return build_call(op, keys, cfg, channel_for("distbreaker"), rnd=rng.random(), now_ms=now,
                      extra=extra)


CONFIGS = [
    CircuitBreakerConfig(failure_threshold=3, recovery_timeout=5, minimum_calls=4,
                         failure_rate_threshold=0.5, window_size=10, window_buckets=5,
                         half_open_max_calls=2, success_threshold=2, probe_lease=3,
                         slow_call_rate_threshold=0.5, max_recovery_timeout=40),
    CircuitBreakerConfig(failure_threshold=5, recovery_timeout=2, minimum_calls=3,
                         failure_rate_threshold=0.6, window_type="count", window_size=5,
                         half_open_max_calls=1, success_threshold=1,
                         slow_call_rate_threshold=0.4, backoff_jitter=0.3),
]


@pytest.mark.parametrize("cfg_i", range(len(CONFIGS)))
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("backend", ["fakeredis", "redis"])
def test_lua_matches_the_model(backend: str, seed: int, cfg_i: int,
                               request: pytest.FixtureRequest) -> None:
    cfg = CONFIGS[cfg_i]
    client: Any
    if backend == "redis":
        client = request.getfixturevalue("redis_client")
    else:
        client = fakeredis.FakeRedis()
    lua, model = RedisStore(client), MemoryStore()
    rng = random.Random(seed * 7 + cfg_i)
    keys = BreakerKeys.for_name(f"diff{seed}")
    now, gen, leases = T0, 0, []
    ops = set()
    for step in range(300):
        now += rng.choice([0, 1, 7, 50, 400, 1500, 6000, 20000])
        call = _random_call(rng, step, now, gen, leases, keys, cfg)
        a = _norm(lua.run(call))
        b = _norm(model.run(call))
        if call.op == "snapshot":
            a[17] = b[17] = 0  # updated_at_ms: Lua skips writes that change nothing
        assert a == b, f"step {step}: {call.op} {call.args[6:]} -> lua {a} model {b}"
        if len(b) in (3, 7):  # record's short reply: still plainly CLOSED
            gen = b[1]
            ops.add((call.op, "closed", ""))
        else:
            gen = decode_reply(b).generation
            ops.add((call.op, b[1], b[2]))
    # the sequences must reach every state, or the comparison proves little
    assert {st for _, st, _ in ops} == {"closed", "open", "half_open"}


def test_every_script_has_a_header_matching_its_use() -> None:
    lib = (LUA / "_lib.lua").read_text()
    for n in range(1, 4):
        assert f"KEYS[{n}]" in lib
    for n in range(1, 7):
        assert f"ARGV[{n}]" in lib
    for op in OPS:
        text = (LUA / f"{op}.lua").read_text()
        header = text.split("\n\n", 1)[0]
        assert header.startswith(f"-- {op}:"), op
        assert "KEYS" in header and "ARGV" in header and "Returns" in header, op
        used = {int(m) for m in re.findall(r"ARGV\[(\d+)\]", text)}
        documented = {int(m) for m in re.findall(r"ARGV\[(\d+)", header)}
        assert used <= documented | set(range(1, 7)), (op, used, documented)
        assert "KEYS[" not in text.replace(header, ""), f"{op} must use the _lib key names"


def test_names_travel_only_as_keys_and_argv(fake_client: fakeredis.FakeRedis) -> None:
    # the script source is constant: a hostile name is just a key
    before = {op: script_source(op) for op in OPS}
    name = "x');redis.call('FLUSHALL')--"
    fake_client.set("keep", "1")
    b = CircuitBreaker(name, CircuitBreakerConfig(failure_threshold=1), redis=fake_client)
    with pytest.raises(ZeroDivisionError):
        b.call(lambda: 1 / 0)
    assert fake_client.get("keep") == b"1"
    assert fake_client.hget(f"distbreaker:v1:{{{name}}}", "state") == b"open"
    assert {op: script_source(op) for op in OPS} == before
    b.close()


def test_function_library_reloads_after_function_flush(redis_client: redis.Redis) -> None:
    b = CircuitBreaker("fflush", CircuitBreakerConfig(max_staleness=60), redis=redis_client)
    assert b.call(lambda: 1) == 1
    lib = f"distbreaker_{function_name('record').split('_')[1]}".encode()
    assert lib in repr(redis_client.function_list()).encode()
    redis_client.function_flush()
    assert b.call(lambda: 2) == 2  # "Function not found": loaded again, then run
    assert redis_client.hget("distbreaker:v1:{fflush}", "state") == b"closed"
    calls = redis_client.info("commandstats")
    assert calls["cmdstat_fcall"]["calls"] >= 2 and "cmdstat_evalsha" not in calls
    b.close()


def test_an_ignored_outcome_sends_nothing(redis_client: redis.Redis) -> None:
    """No outcome and no probe lease: nothing for Redis to do, so no round trip."""
    cfg = CircuitBreakerConfig(ignore_exceptions=(KeyError,), max_staleness=60)
    for consistency in ("strict", "batched"):
        b = CircuitBreaker(f"ign-{consistency}", dataclasses.replace(
            cfg, consistency=consistency), redis=redis_client)
        b.call(lambda: 1)
        assert b.flush(10)
        sent: list[str] = []  # the breaker's own store calls (server-wide counts would
        inner = b._store.run  # also see its listener's snapshot refreshes)

        def run(call: Any, *rest: Any, inner: Any = inner, sent: list[str] = sent) -> Any:
            sent.append(call.op)
            return inner(call, *rest)

        b._store.run = run  # type: ignore[method-assign]
        for _ in range(20):
            with b.protect() as permit:
                permit.mark_ignored()
            with pytest.raises(KeyError):
                b.call(lambda: {}[0])
        assert b.flush(10)
        assert "record" not in sent, sent
        assert b.get_metrics().ignored_calls == 40
        b.close()


def test_scripts_where_functions_are_not_allowed(redis_server: RedisServer,
                                                 redis_client: redis.Redis) -> None:
    """A user without FCALL rights (or Redis < 7) gets the same behaviour over EVALSHA,
    and the scripts reload after SCRIPT FLUSH."""
    redis_client.acl_setuser("nofcall", enabled=True, passwords=["+pw"], keys=["~*"],
                             channels=["*"], commands=["+@all", "-fcall", "-function"])
    c = redis.Redis(port=redis_server.port, username="nofcall", password="pw")
    b = CircuitBreaker("nofcall", CircuitBreakerConfig(failure_threshold=2, max_staleness=60),
                       redis=c)
    assert b.call(lambda: 1) == 1
    redis_client.script_flush()
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            b.call(lambda: 1 / 0)
    assert redis_client.hget("distbreaker:v1:{nofcall}", "state") == b"open"
    assert not b.store_degraded
    b.close()
    c.close()
    redis_client.acl_deluser("nofcall")


def test_noscript_after_script_flush(fake_client: Any) -> None:
    """The generic path (fakeredis here, Cluster clients too): redis-py's Script objects
    run EVALSHA and reload on NOSCRIPT."""
    redis_client = fake_client
    b = CircuitBreaker("flushy", CircuitBreakerConfig(max_staleness=60), redis=redis_client)
    assert b.call(lambda: 1) == 1
    redis_client.script_flush()
    assert b.call(lambda: 2) == 2  # redis-py's Script reloads on NOSCRIPT
    assert redis_client.hget("distbreaker:v1:{flushy}", "state") == b"closed"
    m = b.get_metrics()
    assert m.successful_calls == 2 and m.fleet is not None and m.fleet.calls == 2
    b.close()


def test_keys_readable_with_hgetall_and_expire(redis_client: redis.Redis) -> None:
    cfg = CircuitBreakerConfig(failure_threshold=2, key_ttl=3600, max_staleness=60)
    b = CircuitBreaker("readable", cfg, redis=redis_client)
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            b.call(lambda: 1 / 0)
    raw = redis_client.hgetall("distbreaker:v1:{readable}")
    h = {k.decode(): v.decode() for k, v in raw.items()}
    assert h["state"] == "open"
    assert h["generation"] == "1"
    assert int(h["open_until_ms"]) - int(h["opened_at_ms"]) == 30_000
    assert h["config_fingerprint"] == cfg.fingerprint
    assert {"consecutive_failures", "half_open_successes", "reopen_count", "forced",
            "updated_at_ms"} <= set(h)
    assert 0 < redis_client.ttl("distbreaker:v1:{readable}") <= 3600
    b.close()


def test_window_keys_expire_too(redis_client: redis.Redis) -> None:
    cfg = CircuitBreakerConfig(failure_threshold=100, key_ttl=3600, max_staleness=60)
    b = CircuitBreaker("ttl", cfg, redis=redis_client)
    for _ in range(3):
        b.call(lambda: 1)
    assert 0 < redis_client.ttl("distbreaker:v1:{ttl}:window") <= 3600
    b.close()


def test_record_batch_is_ordered_and_stops_counting_after_a_trip(
    redis_client: redis.Redis,
) -> None:
    cfg = CircuitBreakerConfig(failure_threshold=2)
    keys = BreakerKeys.for_name("batch")
    call = build_call("record", keys, cfg, channel_for("distbreaker"),
                      extra=["", *[0, int(Code.FAILED), "", 0] * 5])
    r = decode_reply(RedisStore(redis_client).run(call))
    assert r.decision == 2 and r.state == "open" and r.generation == 1
    assert r.transition_from == "closed"
