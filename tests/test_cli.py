"""The operator CLI against a real Redis, as an operator runs it (real processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
import redis

from distbreaker import CircuitBreaker, CircuitBreakerConfig, CircuitState
from distbreaker.events import TransitionEvent

from redis_server import RedisServer, free_port


def cli(*args: str, url: str | None = None, stdin: str = "",
        check: int | None = 0) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "distbreaker", *args]
    if url is not None:
        argv += ["--redis-url", url]
    p = subprocess.run(argv, capture_output=True, text=True, input=stdin, timeout=60)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def trip(client: redis.Redis, name: str, **cfg: Any) -> CircuitBreaker:
    b = CircuitBreaker(name, CircuitBreakerConfig(failure_threshold=2, **cfg), redis=client)
    b.call(lambda: 1)
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            b.call(lambda: 1 / 0)
    return b


def hgetall(client: redis.Redis, name: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in
            client.hgetall(f"distbreaker:v1:{{{name}}}").items()}


def test_list_and_inspect_json_match_redis(redis_server: RedisServer,
                                           redis_client: redis.Redis) -> None:
    a = trip(redis_client, "provider_a")
    b = CircuitBreaker("provider_b", CircuitBreakerConfig(window_type="count", window_size=20,
                                                          minimum_calls=5), redis=redis_client)
    for i in range(6):
        if i % 3 == 0:
            with pytest.raises(KeyError):
                b.call(lambda: {}[1])
        else:
            b.call(lambda: 1)
    out = json.loads(cli("list", "--json", url=redis_server.url).stdout)
    by = {x["name"]: x for x in out}
    assert set(by) == {"provider_a", "provider_b"}
    for name, x in by.items():
        assert x["fields"] == hgetall(redis_client, name)
    assert by["provider_a"]["state"] == "open" and 0 < by["provider_a"]["retry_after_s"] <= 30
    assert by["provider_b"]["window"] == {"type": "count", "size": 20, "calls": 6,
                                          "failures": 2, "slow": 0}
    assert by["provider_b"]["failure_rate"] == pytest.approx(2 / 6, abs=1e-3)
    one = json.loads(cli("inspect", "provider_a", "--json", url=redis_server.url).stdout)
    assert one["fields"] == hgetall(redis_client, "provider_a")
    assert one["config_fingerprint"] == a.config.fingerprint
    text = cli("inspect", "provider_b", url=redis_server.url).stdout
    assert "consecutive_failures" in text and "failures in a row" in text
    table = cli("list", url=redis_server.url).stdout
    assert "provider_a" in table and "open" in table
    a.close()
    b.close()


def test_time_window_totals_match_the_breaker(redis_server: RedisServer,
                                              redis_client: redis.Redis) -> None:
    b = CircuitBreaker("tw", CircuitBreakerConfig(failure_threshold=100, window_size=30),
                       redis=redis_client)
    for i in range(10):
        if i % 2:
            b.call(lambda: 1)
        else:
            with pytest.raises(KeyError):
                b.call(lambda: {}[1])
    fleet = b.get_metrics().fleet
    x = json.loads(cli("inspect", "tw", "--json", url=redis_server.url).stdout)
    assert fleet is not None
    assert (x["window"]["calls"], x["window"]["failures"]) == (fleet.calls, fleet.failures)
    assert x["window"]["type"] == "time" and x["window"]["buckets"] == 10
    b.close()


_WORKER = """
import sys, time, json, redis
from distbreaker import CircuitBreaker, CircuitBreakerConfig
b = CircuitBreaker(sys.argv[2], CircuitBreakerConfig(max_staleness=60),
                   redis=redis.Redis.from_url(sys.argv[1]))
print("ready", flush=True)
last = None
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    a = b.is_available()
    if a != last:
        print(json.dumps([time.monotonic(), a]), flush=True)
        last = a
    time.sleep(0.001)
"""


@pytest.mark.multiprocess
def test_open_and_release_reach_every_worker(redis_server: RedisServer,
                                             redis_client: redis.Redis) -> None:
    CircuitBreaker("provider_x", redis=redis_client).call(lambda: 1)
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, redis_server.url, "provider_x",
                               "8"], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        t_open = time.monotonic()
        cli("open", "provider_x", url=redis_server.url)
        time.sleep(2.0)
        t_release = time.monotonic()
        cli("release", "provider_x", url=redis_server.url)
        outs = [p.communicate(timeout=30)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for out in outs:
        seen = [json.loads(line) for line in out.splitlines() if line.startswith("[")]
        closed_at = [t for t, a in seen if not a and t >= t_open]
        assert closed_at and closed_at[0] - t_open < 1.0, seen
        back = [t for t, a in seen if a and t >= t_release]
        assert back and back[0] - t_release < 1.0, seen
    h = hgetall(redis_client, "provider_x")
    assert h["forced"] == "" and h["state"] == "closed"


def test_force_commands_and_exit_codes(redis_server: RedisServer,
                                       redis_client: redis.Redis) -> None:
    url = redis_server.url
    trip(redis_client, "svc")
    res = json.loads(cli("close", "svc", "--json", url=url).stdout)
    assert res == {"name": "svc", "override": "closed", "state": "closed", "changed": True,
                   "generation": 2}
    assert hgetall(redis_client, "svc")["forced"] == "closed"
    assert "unchanged" in cli("close", "svc", url=url).stdout
    cli("release", "svc", url=url)
    assert hgetall(redis_client, "svc")["forced"] == ""
    # a name Redis does not know: exit 1, one line, unless --create
    p = cli("open", "ghost", url=url, check=1)
    assert p.stderr.count("\n") == 1 and "--create" in p.stderr
    cli("open", "ghost", "--create", url=url)
    assert hgetall(redis_client, "ghost")["forced"] == "open"
    cli("inspect", "nobody", url=url, check=1)
    # usage and connection errors: exit 2
    assert "hash tag" in cli("inspect", "a{b}", url=url, check=2).stderr
    cli("list", url="redis://127.0.0.1:1/0", check=2)
    cli("list", url="http://example", check=2)
    cli("frobnicate", check=2)
    cli("reset", url=url, check=2)
    # reset asks unless --yes
    cli("reset", "svc", url=url, stdin="n\n", check=1)
    assert hgetall(redis_client, "svc")["generation"] != "0"
    cli("reset", "svc", url=url, stdin="y\n")
    assert hgetall(redis_client, "svc")["state"] == "closed"
    res = json.loads(cli("reset", "--all", "--yes", "--json", url=url).stdout)
    assert sorted(res["reset"]) == ["ghost", "svc"]
    assert hgetall(redis_client, "ghost")["forced"] == ""
    # the fingerprint of the workers' config is kept by operator commands
    assert hgetall(redis_client, "svc")["config_fingerprint"] == \
        CircuitBreakerConfig(failure_threshold=2).fingerprint


def test_prefix_and_env_url(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    b = CircuitBreaker("p1", redis=redis_client, prefix="team-a")
    b.call(lambda: 1)
    env = dict(os.environ, DISTBREAKER_REDIS_URL=redis_server.url)
    p = subprocess.run([sys.executable, "-m", "distbreaker", "list", "--json", "--prefix",
                        "team-a"], capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode == 0 and [x["name"] for x in json.loads(p.stdout)] == ["p1"]
    p = subprocess.run([sys.executable, "-m", "distbreaker", "list", "--json"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert json.loads(p.stdout) == []
    b.close()


def test_watch_streams_transitions(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    b = CircuitBreaker("watched", CircuitBreakerConfig(failure_threshold=1), redis=redis_client)
    b.call(lambda: 1)
    p = subprocess.Popen([sys.executable, "-m", "distbreaker", "watch", "--json",
                          "--interval", "0.3", "--count", "4", "--redis-url", redis_server.url],
                         stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    with pytest.raises(KeyError):
        b.call(lambda: {}[0])
    out, _ = p.communicate(timeout=30)
    lines = [json.loads(x) for x in out.splitlines()]
    events = [x for x in lines if "event" in x]
    assert events and events[0]["name"] == "watched" and events[0]["to"] == "open"
    snaps = [x for x in lines if "breakers" in x]
    assert snaps and snaps[-1]["breakers"][0]["state"] == "open"
    b.close()


def test_serve_metrics_answers_a_scrape(redis_server: RedisServer,
                                        redis_client: redis.Redis) -> None:
    trip(redis_client, "provider_m1")
    CircuitBreaker("provider_m2", redis=redis_client).call(lambda: 1)
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "distbreaker", "serve-metrics", "--port",
                          str(port), "--host", "127.0.0.1", "--redis-url", redis_server.url],
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                              timeout=2).read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline and p.poll() is None
                time.sleep(0.1)
    finally:
        p.terminate()
        p.wait(10)
    assert 'distbreaker_state{breaker="provider_m1",state="open"} 1.0' in body
    assert 'distbreaker_state{breaker="provider_m2",state="closed"} 1.0' in body
    assert 'distbreaker_window_calls{breaker="provider_m2"} 1.0' in body
    assert "distbreaker_fleet_breakers 2.0" in body


def test_process_collector_and_listeners(redis_client: redis.Redis) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from distbreaker.prometheus import ProcessCollector

    events: list[Any] = []
    b = CircuitBreaker("pc", CircuitBreakerConfig(failure_threshold=1, max_staleness=60),
                       redis=redis_client)
    b.add_listener(events.append)
    b.add_listener(lambda e: 1 / 0)  # a broken listener is logged, never raised
    other = CircuitBreaker("pc", CircuitBreakerConfig(failure_threshold=1, max_staleness=60),
                           redis=redis.Redis(port=redis_client.connection_pool
                                             .connection_kwargs["port"]))
    seen_fleet: list[Any] = []
    other.add_listener(seen_fleet.append)
    time.sleep(0.2)
    with pytest.raises(KeyError):
        b.call(lambda: {}[0])
    from distbreaker import CircuitOpenError

    with pytest.raises(CircuitOpenError):
        b.call(lambda: 1)
    deadline = time.monotonic() + 3
    while not seen_fleet and time.monotonic() < deadline:
        time.sleep(0.01)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["TransitionEvent", "RejectionEvent"]
    assert isinstance(events[0], TransitionEvent) and events[0].local
    assert events[0].new_state is CircuitState.OPEN
    fleet = [e for e in seen_fleet if isinstance(e, TransitionEvent)]
    assert len(fleet) == 1 and not fleet[0].local and fleet[0].new_state is CircuitState.OPEN
    reg = CollectorRegistry()
    reg.register(ProcessCollector([b]))
    text = generate_latest(reg).decode()
    assert 'distbreaker_process_calls_total{breaker="pc",outcome="failure"} 1.0' in text
    assert 'distbreaker_process_rejections_total{breaker="pc"} 1.0' in text
    assert 'distbreaker_process_state{breaker="pc",state="open"} 1.0' in text
    b.close()
    other.close()


def test_a_breaker_does_not_hear_its_own_push_as_news() -> None:
    """The origin in a pushed message lets the process that made a transition report it
    once, as local, even when the push overtakes the script's reply (or the reply is
    lost): a second copy is not news."""
    import time as _t

    from distbreaker._protocol import Push

    b = CircuitBreaker("own", CircuitBreakerConfig(max_staleness=60))
    events: list[Any] = []
    b.add_listener(events.append)
    b.refresh()
    now = int(_t.monotonic() * 1000) + 10
    push = Push("t", CircuitState.CLOSED, CircuitState.OPEN, 1, now + 1000, now, "", "own",
                b._core.calls.origin)
    b._engine.apply_push(push, _t.monotonic())
    assert [(e.new_state, e.local) for e in events] == [(CircuitState.OPEN, True)]
    assert b.get_state() is CircuitState.OPEN
    b._engine.apply_push(push, _t.monotonic())
    assert len(events) == 1
    events.clear()
    other = Push("t", CircuitState.OPEN, CircuitState.HALF_OPEN, 2, now, now + 1, "", "own",
                 "someone")
    b._engine.apply_push(other, _t.monotonic())
    assert [(e.new_state, e.local) for e in events] == [(CircuitState.HALF_OPEN, False)]


def test_remove_listener() -> None:
    b = CircuitBreaker("quiet", CircuitBreakerConfig(max_staleness=60))
    events: list[Any] = []
    b.add_listener(events.append)
    b.force_open()
    assert len(events) == 1
    b.remove_listener(events.append)
    b.release()
    assert len(events) == 1  # removed: hears nothing more
