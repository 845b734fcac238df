"""The fault-test TCP proxy (tests/support/tcp_proxy.py), against a real private redis-server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from tcp_proxy import TcpProxy

from redis_server import RedisServer


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    s = RedisServer().start()
    yield s
    s.stop()


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[TcpProxy]:
    server.client().flushall()
    p = TcpProxy(server.port).start()
    yield p
    p.stop()


def _client(p: TcpProxy, timeout: float = 2.0) -> redis.Redis:
    """A client through the proxy that never retries: each fault shows on the first try."""
    return redis.Redis.from_url(p.url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                retry=Retry(NoBackoff(), 0))


def _raw(p: TcpProxy) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", p.port), timeout=2.0)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _cmd(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for x in parts:
        out.append(f"${len(x.encode())}\r\n{x}\r\n".encode())
    return b"".join(out)


def _read_exactly(s: socket.socket, want: bytes) -> bytes:
    got = b""
    while len(got) < len(want):
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def _server_clients(server: RedisServer) -> int:
    """Connections the server has, not counting the one asking."""
    with server.client() as c:
        return len(c.client_list()) - 1


def _wait_for(cond: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_ping_and_data_pass_through(proxy: TcpProxy) -> None:
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"
    c = _client(proxy)
    assert c.ping() is True
    big = b"x" * (3 << 20)  # several chunks each way, and partial writes
    c.set("big", big)
    assert c.get("big") == big
    assert proxy.accepted == 1 and proxy.connections == 1
    c.close()
    assert _wait_for(lambda: proxy.connections == 0)  # a FIN is passed on and closes it


def test_latency_is_added_both_ways_and_keeps_order(proxy: TcpProxy) -> None:
    c = _client(proxy)
    c.ping()
    proxy.set_latency(0.1)
    t0 = time.perf_counter()
    assert c.ping() is True
    assert time.perf_counter() - t0 >= 0.2  # 0.1 s to the server, 0.1 s back
    pipe = c.pipeline(transaction=False)
    for _ in range(100):
        pipe.incr("n")
    assert pipe.execute() == list(range(1, 101))

    # a chunk sent after the latency drops still waits behind the ones before it
    s = _raw(proxy)
    proxy.set_latency(0.15)
    t0 = time.perf_counter()
    s.sendall(_cmd("SET", "k", "a"))
    time.sleep(0.02)
    proxy.set_latency(0.0)
    s.sendall(_cmd("APPEND", "k", "b"))
    assert _read_exactly(s, b"+OK\r\n:2\r\n") == b"+OK\r\n:2\r\n"
    assert time.perf_counter() - t0 >= 0.15
    assert c.get("k") == b"ab"
    s.close()
    t0 = time.perf_counter()
    assert c.ping() is True
    assert time.perf_counter() - t0 < 0.1  # back to no added latency
    c.close()


def test_blackhole_times_out_then_recovers(proxy: TcpProxy, server: RedisServer) -> None:
    c = _client(proxy, timeout=0.2)
    assert c.ping() is True
    s = _raw(proxy)
    s.sendall(_cmd("PING"))
    assert _read_exactly(s, b"+PONG\r\n") == b"+PONG\r\n"
    proxy.blackhole(True)
    t0 = time.perf_counter()
    with pytest.raises(redis.TimeoutError):
        c.ping()
    assert time.perf_counter() - t0 >= 0.2
    # a new connection is accepted too, and hears nothing
    with pytest.raises(redis.TimeoutError):
        _client(proxy, timeout=0.2).ping()
    s.sendall(_cmd("SET", "dropped", "1"))  # dropped, not delayed
    s.settimeout(0.2)
    with pytest.raises(socket.timeout):
        s.recv(100)
    assert proxy.connections >= 2  # nothing was closed
    proxy.blackhole(False)
    assert c.ping() is True  # redis-py dropped the timed-out connection: a new one works
    s.settimeout(2.0)
    s.sendall(_cmd("PING"))  # the old connection carries traffic again
    assert _read_exactly(s, b"+PONG\r\n") == b"+PONG\r\n"
    assert server.client().get("dropped") is None
    s.close()
    c.close()


def test_drop_all_resets_both_sides(proxy: TcpProxy, server: RedisServer) -> None:
    before = _server_clients(server)
    c = _client(proxy)
    assert c.ping() is True
    s = _raw(proxy)
    s.sendall(_cmd("PING"))
    assert _read_exactly(s, b"+PONG\r\n") == b"+PONG\r\n"
    conn = redis.Connection(port=proxy.port, socket_timeout=2.0, retry=Retry(NoBackoff(), 0))
    conn.connect()
    assert _wait_for(lambda: _server_clients(server) == before + 3)
    proxy.set_latency(0.3)
    conn.send_command("PING")  # its reply is still on the way when the connection drops
    s.sendall(_cmd("PING"))
    proxy.drop_all()
    assert proxy.connections == 0 and proxy.dropped == 3
    with pytest.raises(ConnectionResetError):  # a RST, not a FIN (recv would return b"")
        s.recv(100)
    with pytest.raises(redis.ConnectionError):
        conn.read_response()
    # (an idle pooled connection is checked by redis-py before reuse and replaced quietly)
    assert _wait_for(lambda: _server_clients(server) == before)  # upstream side reset too
    proxy.set_latency(0.0)
    assert c.ping() is True  # new connections work
    s.close()
    c.close()


def test_refuse_resets_new_and_current_connections(proxy: TcpProxy) -> None:
    c = _client(proxy)
    assert c.ping() is True
    proxy.refuse(True)
    assert proxy.connections == 0
    with pytest.raises(redis.ConnectionError):
        c.ping()  # the current connection was dropped
    with pytest.raises(redis.ConnectionError):
        _client(proxy).ping()  # and a new one is reset on connect
    with (pytest.raises(ConnectionResetError),  # at connect or at the first read
          socket.create_connection(("127.0.0.1", proxy.port), timeout=2.0) as s):
        s.recv(100)
    assert proxy.refused >= 2
    proxy.refuse(False)
    assert c.ping() is True
    c.close()


def test_stop_closes_everything(server: RedisServer) -> None:
    p = TcpProxy(server.port).start()
    c = _client(p)
    assert c.ping() is True
    p.stop()
    with pytest.raises(redis.ConnectionError):
        c.ping()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", p.port), timeout=1.0).close()
    p.stop()  # twice is fine


def test_upstream_down_resets_the_client() -> None:
    dead = RedisServer().start()
    p = TcpProxy(dead.port).start()
    dead.stop()
    try:
        with pytest.raises(redis.ConnectionError):
            _client(p).ping()
        assert _wait_for(lambda: p.connections == 0)
    finally:
        p.stop()


def test_script_mode_takes_commands_on_stdin(server: RedisServer) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "support" / "tcp_proxy.py"), str(server.port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        head = proc.stdout.readline().split()
        assert head[0] == "port"
        c = redis.Redis(port=int(head[1]), socket_timeout=2.0, retry=Retry(NoBackoff(), 0))
        assert c.ping() is True

        def say(line: str) -> None:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "ok"

        say("latency 0.05")
        t0 = time.perf_counter()
        assert c.ping() is True
        assert time.perf_counter() - t0 >= 0.1
        say("latency 0")
        s = socket.create_connection(("127.0.0.1", int(head[1])), timeout=2.0)
        s.sendall(_cmd("PING"))
        assert _read_exactly(s, b"+PONG\r\n") == b"+PONG\r\n"
        say("drop")
        with pytest.raises(ConnectionResetError):
            s.recv(100)
        s.close()
        say("blackhole 1")
        say("blackhole 0")
        say("refuse 1")
        say("refuse 0")
        assert c.ping() is True
        say("stop")
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()
