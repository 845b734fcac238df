"""An idle fleet: what a process that makes no calls costs Redis, and what it still sees.

Every breaker once re-read its snapshot every `max_staleness`, so an idle process cost one
script call per breaker per 2 s. Now the listener's heartbeat (distbreaker/_beat.py) reads
its prefix's message sequence once per beat and confirms every snapshot at once when
nothing was missed. These tests count commands (not time) and check that the staleness
bound still holds for what the heartbeat must catch: a message lost on the way, a gap in
the numbers, data lost by Redis, garbage in the sequence key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from polling import until

import distbreaker._subscriber
from distbreaker import CircuitBreaker, CircuitBreakerConfig, CircuitState
from distbreaker._beat import Beat, Step
from distbreaker._keys import BreakerKeys, seq_key_for

from redis_server import RedisServer

MS = 0.4  # max_staleness: a beat every 0.3 s, a tick of 0.1 s
CFG = CircuitBreakerConfig(max_staleness=MS, recovery_timeout=60.0)
SEQ = seq_key_for("distbreaker")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    s = RedisServer().start()
    yield s
    s.stop()


def _calls(r: redis.Redis, cmd: str) -> int:
    stats: dict[str, Any] = r.info("commandstats")
    return int(stats.get(f"cmdstat_{cmd}", {}).get("calls", 0))


def _idle_cost(server: RedisServer, n: int, seconds: float) -> tuple[int, int]:
    """(script calls, sequence reads) of one process holding `n` idle breakers."""
    r = redis.Redis(port=server.port)
    admin = server.client()
    breakers = [CircuitBreaker(f"idle{n}-{i}", CFG, redis=r) for i in range(n)]
    try:
        for b in breakers:
            assert b.call(lambda: 1) == 1  # a snapshot installed, then nothing
        time.sleep(3 * MS)  # the listener subscribed, re-read all once, and beats
        f0, h0 = _calls(admin, "fcall"), _calls(admin, "hmget")
        time.sleep(seconds)
        return _calls(admin, "fcall") - f0, _calls(admin, "hmget") - h0
    finally:
        for b in breakers:
            b.close()
        r.close()


def test_an_idle_process_costs_the_same_with_1_or_200_breakers(server: RedisServer
                                                                 ) -> None:
    seconds = 10 * MS
    one = _idle_cost(server, 1, seconds)
    many = _idle_cost(server, 200, seconds)
    # no breaker is re-read while nothing changes; the heartbeat is one read per beat,
    # 0.75 x max_staleness apart (about 13 in 4 s), whatever the number of breakers
    assert one[0] == 0 and many[0] == 0, (one, many)
    beats = seconds / (0.75 * MS)
    for _, reads in (one, many):
        assert 3 <= reads <= beats + 3, (one, many)  # fewer on a loaded machine, never more
    assert many[1] <= one[1] + 4, (one, many)


def _forced_open(r: redis.Redis, name: str) -> None:
    """Force `name` open by hand, as a lost message would leave it: the state changes and
    the sequence moves on, but the listener hears nothing."""
    keys = BreakerKeys.for_name(name)
    r.hset(keys.state, "forced", "open")
    r.hincrby(SEQ, "n", 1)


def test_a_lost_message_is_caught_by_the_next_beat(server: RedisServer) -> None:
    r = redis.Redis(port=server.port)
    b = CircuitBreaker("lost", CFG, redis=r)
    try:
        assert b.call(lambda: 1) == 1
        admin = server.client()
        assert until(lambda: admin.hget(SEQ, "e") is not None, 5.0)  # the listener is up
        _forced_open(admin, "lost")
        # the beat reads a number it has not heard, PINGs, and re-reads every snapshot
        assert until(lambda: not b.is_available(), 2 * MS + 1.0)
        assert b.get_state() is CircuitState.OPEN
    finally:
        b.close()
        r.close()


def test_a_ping_without_a_reply_means_a_dead_connection(
        server: RedisServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A pub/sub connection that died silently (a NAT dropped it) delivers nothing, PING
    replies included: the listener reconnects, re-reads everything, and the guard (the
    data path's) is not moved."""
    r = redis.Redis(port=server.port)
    b = CircuitBreaker("deadsub", CFG, redis=r)
    try:
        assert b.call(lambda: 1) == 1
        admin = server.client()
        assert until(lambda: admin.hget(SEQ, "e") is not None, 5.0)
        sent: list[Any] = []
        monkeypatch.setattr(distbreaker._subscriber.SocketReader, "ping",
                            lambda self, token: sent.append(token))
        with caplog.at_level(logging.INFO, logger="distbreaker"):
            _forced_open(admin, "deadsub")  # a number the listener has not heard
            assert until(lambda: sent, 2.0)  # it asked, and the reply never comes
            assert until(lambda: "no reply to a PING" in caplog.text, 5.0), caplog.text
            assert until(lambda: "listener subscribed again" in caplog.text, 5.0)
        assert until(lambda: not b.is_available(), 2.0)
        assert b.get_metrics().store_failovers == 0
    finally:
        b.close()
        r.close()


def test_a_gap_in_the_numbers_resyncs_at_once(server: RedisServer) -> None:
    r = redis.Redis(port=server.port)
    watched = CircuitBreaker("gap-watched", CFG, redis=r)
    other = CircuitBreaker("gap-other", CircuitBreakerConfig(max_staleness=60.0),
                           redis=redis.Redis(port=server.port))
    try:
        assert watched.call(lambda: 1) == 1
        admin = server.client()
        assert until(lambda: admin.hget(SEQ, "e") is not None, 5.0)
        _forced_open(admin, "gap-watched")  # lost: number 1 never heard
        other.force_open()  # number 2 arrives: the gap says 1 was missed
        assert until(lambda: not watched.is_available(), 1.0)
    finally:
        watched.close()
        other.close()
        r.close()


def test_data_lost_by_redis_is_seen_within_two_beats(server: RedisServer) -> None:
    r = redis.Redis(port=server.port)
    b = CircuitBreaker("flushed", CFG, redis=r)
    op = CircuitBreaker("flushed", CFG, redis=redis.Redis(port=server.port))
    try:
        op.force_open()
        assert until(lambda: not b.is_available(), 2.0)
        server.client().flushall()  # publishes nothing; the epoch goes with the data
        assert until(lambda: b.is_available(), 2 * MS + 1.0)
        assert b.get_state() is CircuitState.CLOSED
    finally:
        b.close()
        op.close()
        r.close()


def test_garbage_in_the_sequence_key_costs_the_heartbeat_only(
        server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    admin = server.client()
    admin.rpush(SEQ, "garbage")  # the wrong type: every HINCRBY and HMGET fails
    r = redis.Redis(port=server.port)
    with caplog.at_level(logging.WARNING, logger="distbreaker"):
        b = CircuitBreaker("garbled", CircuitBreakerConfig(max_staleness=MS,
                                                            failure_threshold=2), redis=r)
        try:
            assert b.call(lambda: 1) == 1
            assert until(lambda: "cannot use" in caplog.text, 5.0), caplog.text
            assert SEQ in caplog.text
            # transitions still happen and still reach other processes
            other = CircuitBreaker("garbled", CFG, redis=redis.Redis(port=server.port))
            assert other.call(lambda: 1) == 1
            for _ in range(2):
                with pytest.raises(ZeroDivisionError):
                    b.call(lambda: 1 / 0)
            assert b.get_state() is CircuitState.OPEN
            assert until(lambda: not other.is_available(), 2.0)
            other.close()
            # without the heartbeat, snapshots are re-read every max_staleness again
            f0 = _calls(admin, "fcall")
            time.sleep(4 * MS)
            assert _calls(admin, "fcall") - f0 >= 2
            assert admin.lrange(SEQ, 0, -1) == [b"garbage"]  # nothing of the user's lost
        finally:
            b.close()
            r.close()


# -- the heartbeat's rules, without Redis ---------------------------------------------------


def test_beat_confirms_when_every_number_was_heard() -> None:
    b = Beat("k", enabled=True)
    assert b.read(1.0, 0.3, None, None, claimed=True, first=True) is Step.NOTHING
    assert b.epoch == b.mine and b.last == 0
    b.push(1)
    b.push(2)
    assert not b.missed
    assert b.read(2.0, 0.3, b.mine.encode(), b"2", False, False) is Step.CONFIRM
    assert b.next_at == pytest.approx(2.3)


def test_beat_pings_for_numbers_not_heard_and_resyncs_if_they_never_come() -> None:
    b = Beat("k", enabled=True)
    b.read(1.0, 0.3, b"E", b"5", False, True)
    assert b.read(2.0, 0.3, b"E", b"7", False, False) is Step.PING
    assert not b.due(2.5)  # one PING at a time
    b.push(6)
    b.push(7)
    assert b.pong() == (Step.CONFIRM, 2.0)
    assert b.read(3.0, 0.3, b"E", b"9", False, False) is Step.PING
    b.push(8)  # 9 was lost on the way
    assert b.pong() == (Step.RESYNC, 3.0)
    assert b.last == 9
    assert b.pong() == (Step.NOTHING, 0.0)  # a stray reply


def test_beat_sees_a_gap_data_loss_and_a_dead_connection() -> None:
    b = Beat("k", enabled=True)
    b.read(1.0, 0.3, b"E", b"3", False, True)
    b.push(5)
    assert b.missed and b.last == 5
    b.missed = False
    b.push(4)  # older than what was heard: not a gap
    assert not b.missed and b.last == 5
    # the epoch vanished (FLUSHALL) and another listener wrote its own
    assert b.read(2.0, 0.3, None, None, False, False) is Step.RESYNC
    assert b.epoch is None and b.last == 0
    assert b.read(3.0, 0.3, b"F", b"0", False, False) is Step.CONFIRM  # adopted
    assert b.read(4.0, 0.3, b"G", b"0", False, False) is Step.RESYNC  # replaced
    assert b.read(5.0, 0.3, b"G", b"0", False, False) is Step.CONFIRM
    b.push(3)
    assert b.read(6.0, 0.3, b"G", b"1", False, False) is Step.RESYNC  # went back
    assert b.read(7.0, 0.3, b"G", b"2", False, False) is Step.PING
    assert not b.overdue(7.0 + 1.9, 0.3) and b.overdue(7.0 + 2.1, 0.3)


def test_beat_disables_itself_on_garbage_and_says_so(caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    b = Beat("prefix:v1:seq", enabled=True)
    with caplog.at_level(logging.WARNING, logger="distbreaker"):
        assert b.read(1.0, 0.3, b"E", b"x" * 1000, False, False) is Step.NOTHING
    assert not b.enabled and not b.due(100.0)
    assert "prefix:v1:seq" in caplog.text and len(caplog.text) < 600


def test_our_connections_need_no_handshake(server: RedisServer) -> None:
    """A new connection of ours sends its first request at once: no HELLO (redis-py 8
    speaks RESP3 by default, and its HELLO is a round trip that, through 120 ms of
    latency, every request a caller went on from waited for twice, read as silence)."""
    from distbreaker._clients import derive_client

    user = redis.Redis(port=server.port)  # the library's defaults, whatever they are
    ours = derive_client(user, 0.05, 0.05)
    assert ours is not user  # derived, with short timeouts
    assert ours.connection_pool.connection_kwargs["socket_timeout"] == 0.05
    admin = server.client()
    before = _calls(admin, "hello"), _calls(admin, "client")
    conn = ours.connection_pool.get_connection()
    conn.send_command("PING")
    assert conn.read_response() in (b"PONG", "PONG")
    assert (_calls(admin, "hello"), _calls(admin, "client")) == before
    ours.close()
    user.close()


_WORKER = """
import sys, time, redis
from distbreaker import CircuitBreaker, CircuitBreakerConfig
port, n = int(sys.argv[1]), int(sys.argv[2])
cfg = CircuitBreakerConfig(max_staleness={ms}, recovery_timeout=60.0)
r = redis.Redis(port=port)
fleet = [CircuitBreaker(f"fleet-{{i}}", cfg, redis=r) for i in range(n)]
for b in fleet:
    b.call(lambda: 1)
target = fleet[0]
print("ready", flush=True)
last, end = None, time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    a = target.is_available()
    if a != last:
        print(f"avail {{a}} {{time.monotonic():.4f}}", flush=True)
        last = a
    time.sleep(0.005)
print("done", flush=True)
"""


def test_idle_worker_processes_cost_one_read_and_still_see_everything(
        server: RedisServer) -> None:
    """Three worker processes with 50 idle breakers each: no snapshot is re-read while
    nothing changes; a force-open reaches them by push; a FLUSHALL (which publishes
    nothing) reaches them within two beats. CLOCK_MONOTONIC is shared by the processes."""
    import subprocess
    import sys

    admin = server.client()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER.format(ms=MS), str(server.port),
                               "50", "8"], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(3 * MS)  # subscribed, re-read once, beating
        f0 = _calls(admin, "fcall")
        time.sleep(5 * MS)
        assert _calls(admin, "fcall") == f0  # 150 idle breakers: not one re-read
        op = CircuitBreaker("fleet-0", CFG, redis=redis.Redis(port=server.port))
        op.force_open()
        t_force = time.monotonic()
        time.sleep(1.0)
        admin.flushall()
        t_flush = time.monotonic()
        out = [p.communicate(timeout=30)[0] for p in procs]
        op.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for text in out:
        seen = [(ln.split()[1] == "True", float(ln.split()[2]))
                for ln in text.splitlines() if ln.startswith("avail")]
        off = [t for a, t in seen if not a and t > t_force - 0.01]
        back = [t for a, t in seen if a and t > t_flush - 0.01]
        assert off and off[0] - t_force < 0.5, (seen, t_force)
        assert back and back[0] - t_flush < 2 * MS + 0.5, (seen, t_flush)
