"""Fork safety, config drift, a restricted ACL user, and TLS, against real redis-servers."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from distbreaker import CircuitBreaker, CircuitBreakerConfig, CircuitOpenError, CircuitState
from distbreaker.providers import CircuitBreakerManager

from redis_server import RedisServer

ACL_LINE = (
    "ACL SETUSER distbreaker on >s3cret-pass resetkeys ~distbreaker:* resetchannels "
    "&distbreaker:* -@all +fcall +function|load +evalsha +script|load +script|exists "
    "+subscribe +ping +time +hmget +hget +hset +hdel +del +pexpire +publish +zremrangebyscore "
    "+zcard +zrange +zadd +zrem +zcount +scan +hgetall +pttl +type"
)


def _readme_acl_line() -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for line in readme.splitlines():
        if line.startswith("ACL SETUSER distbreaker"):
            return line
    raise AssertionError("README has no ACL SETUSER line")


def _child_fork(port: int, name: str, q: Any) -> None:
    # uses the breaker created in the parent before the fork (global set below)
    b = _FORKED["b"]
    try:
        for _ in range(3):
            with contextlib.suppress(ZeroDivisionError):
                b.call(lambda: 1 / 0)
        q.put(("state", b.get_state().value))
        # wait for the parent's release to arrive through the child's own listener
        deadline = time.monotonic() + 5
        while not b.is_available() and time.monotonic() < deadline:
            time.sleep(0.01)
        q.put(("available", b.is_available()))
        q.put(("threads", sorted(t.name for t in __import__("threading").enumerate())))
    except BaseException as e:  # report, never hang the parent
        q.put(("error", repr(e)))


_FORKED: dict[str, Any] = {}


@pytest.mark.multiprocess
def test_breaker_created_before_fork_works_in_child(redis_server: RedisServer,
                                                    redis_client: redis.Redis) -> None:
    cfg = CircuitBreakerConfig(failure_threshold=3, recovery_timeout=60, max_staleness=60)
    b = CircuitBreaker("forky", cfg, redis=redis.Redis(port=redis_server.port))
    assert b.call(lambda: 1) == 1  # the parent has a listener thread and connections
    time.sleep(0.1)
    _FORKED["b"] = b
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_fork, args=(redis_server.port, "forky", q))
    p.start()
    try:
        got = dict([q.get(timeout=10)])
        assert got == {"state": "open"}, got
        assert redis_client.hget("distbreaker:v1:{forky}", "state") == b"open"
        b.reset()  # the child must learn this through its own listener
        avail = q.get(timeout=10)
        assert avail == ("available", True), avail
        threads = q.get(timeout=10)
        assert any(n.startswith("distbreaker-listener") for n in threads[1]), threads
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
    assert p.exitcode == 0
    b.close()


def test_config_drift_is_warned_once_and_reported(redis_client: redis.Redis,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    a = CircuitBreaker("drifty", CircuitBreakerConfig(failure_threshold=5, max_staleness=60),
                       redis=redis_client)
    a.call(lambda: 1)
    m = CircuitBreakerManager(redis_client, CircuitBreakerConfig(failure_threshold=9,
                                                                 max_staleness=60))
    with caplog.at_level(logging.WARNING, "distbreaker"):
        b = CircuitBreaker("drifty", CircuitBreakerConfig(failure_threshold=9, max_staleness=60),
                           redis=redis_client)
        b.refresh()
        b.refresh()
    assert b.config_drift
    assert caplog.text.count("processes sharing a breaker should share its config") == 1
    m.register_provider("x")  # a manager's health shows drift per provider
    pb = m.get_breaker("x")
    pa = CircuitBreaker("provider_x", CircuitBreakerConfig(failure_threshold=2), redis=redis_client)
    pa.call(lambda: 1)
    assert m.get_system_health()["providers"]["x"]["config_drift"] is True
    for x in (a, b, pa, pb):
        x.close()


def test_restricted_acl_user_runs_the_breaker() -> None:
    srv = RedisServer().start()
    try:
        admin = srv.client()
        line = _readme_acl_line()
        assert line == ACL_LINE
        admin.execute_command(*line.split())
        c = redis.Redis(port=srv.port, username="distbreaker", password="s3cret-pass")
        with pytest.raises(redis.exceptions.NoPermissionError):
            c.get("other:key")
        seen: list[Any] = []
        cfg = CircuitBreakerConfig(failure_threshold=2, recovery_timeout=0.1, success_threshold=1,
                                   max_staleness=60)
        b = CircuitBreaker("acl", cfg, redis=c, on_state_change=lambda *x: seen.append(x[2]))
        other = CircuitBreaker("acl", cfg, redis=redis.Redis(
            port=srv.port, username="distbreaker", password="s3cret-pass"))
        for _ in range(2):
            with pytest.raises(ZeroDivisionError):
                b.call(lambda: 1 / 0)
        with pytest.raises(CircuitOpenError):
            b.call(lambda: 1)
        time.sleep(0.15)
        assert b.call(lambda: 1) == 1
        b.force_open()
        deadline = time.monotonic() + 3  # the push reaches the other restricted client
        while other.is_available() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not other.is_available()
        b.release()
        admin.script_flush()
        admin.function_flush()
        b.reset()  # reloads the library with FUNCTION LOAD as the restricted user
        assert admin.info("commandstats").get("cmdstat_fcall", {}).get("calls", 0) > 0
        assert b.get_metrics().fleet is not None
        assert seen == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED,
                        CircuitState.OPEN, CircuitState.CLOSED]  # force_open, release
        assert not b.store_degraded and not other.store_degraded
        b.close()
        other.close()
    finally:
        srv.stop()


def _make_certs(d: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=distbreaker-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "ext.cnf")


def test_tls(tmp_path: Path) -> None:
    _make_certs(tmp_path)
    srv = RedisServer()
    tls_port = srv.port
    srv.extra = ("--port", "0", "--tls-port", str(tls_port), "--tls-cert-file",
                 str(tmp_path / "server.crt"), "--tls-key-file", str(tmp_path / "server.key"),
                 "--tls-ca-cert-file", str(tmp_path / "ca.crt"), "--tls-auth-clients", "no")
    srv.proc = subprocess.Popen(
        ["redis-server", "--save", "", "--appendonly", "no", "--dir", srv.dir, *srv.extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://127.0.0.1:{tls_port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url, ssl_ca_certs=str(tmp_path / "ca.crt")).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "TLS redis-server did not start"
                time.sleep(0.05)
        c = redis.Redis.from_url(url, ssl_ca_certs=str(tmp_path / "ca.crt"))
        cfg = CircuitBreakerConfig(failure_threshold=2, max_staleness=60)
        b = CircuitBreaker("tls", cfg, redis=c)
        b2 = CircuitBreaker("tls", cfg, redis=redis.Redis.from_url(
            url, ssl_ca_certs=str(tmp_path / "ca.crt")))
        time.sleep(0.2)
        for _ in range(2):
            with pytest.raises(ZeroDivisionError):
                b.call(lambda: 1 / 0)
        assert c.hget("distbreaker:v1:{tls}", "state") == b"open"
        deadline = time.monotonic() + 3
        while b2.is_available() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not b2.is_available() and not b.store_degraded
        b.close()
        b2.close()
    finally:
        srv.stop()
    assert os.path.exists(tmp_path / "ca.crt")
