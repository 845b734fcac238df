"""A small TCP proxy for fault tests: added latency, a blackhole, dropped and refused
connections, between Redis clients and a redis-server.

One I/O thread multiplexes every proxied connection (non-blocking sockets, a selector), so
a slow or stopped peer never holds up the others, and the control methods, called from any
thread, are applied by that thread in order: when `drop_all()` or `refuse(True)` returns,
every connection it concerns has been reset.

Run as a script it serves one proxy in its own process (so the proxy's timing does not
depend on the GIL of the test process) and takes commands on stdin, one per line, each
answered with a line "ok" once applied:

    python tests/support/tcp_proxy.py TARGET_PORT [TARGET_HOST]
    -> "port <n>", then: latency <seconds> | blackhole 0|1 | drop | refuse 0|1 | stop
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["TcpProxy"]

_CHUNK = 65536
_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


def _reset(sock: socket.socket) -> None:
    """Close `sock` with a RST (SO_LINGER 0) instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    with contextlib.suppress(OSError):
        sock.close()


def _nodelay(sock: socket.socket) -> None:
    # Nagle plus delayed ACKs would add up to 40 ms to small writes: latency is ours to add
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Side:
    """One socket of a proxied connection and what waits to be written to it."""

    __slots__ = ("conn", "eof", "mask", "out", "queue", "sock")

    def __init__(self, conn: _Conn, sock: socket.socket) -> None:
        self.conn = conn
        self.sock = sock
        self.queue: deque[tuple[float, bytes]] = deque()  # (due, data), FIFO
        self.out = bytearray()  # due, not yet accepted by the kernel
        self.eof = False  # the peer behind this socket has stopped sending
        self.mask = 0  # the selector events it is registered for


class _Conn:
    """A client connection and its upstream connection."""

    __slots__ = ("client", "closed", "connecting", "upstream")

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = _Side(self, client)
        self.upstream = _Side(self, upstream)
        self.connecting = True  # the upstream connect has not completed
        self.closed = False

    def other(self, side: _Side) -> _Side:
        return self.upstream if side is self.client else self.client


class TcpProxy:
    """Forwards every connection to 127.0.0.1:<port> to (target_host, target_port).

    `set_latency(s)` delays every forwarded chunk by `s`, in both directions, order kept;
    `blackhole(True)` accepts and reads but forwards nothing (data dropped, nothing closed);
    `drop_all()` resets every current connection on both sides; `refuse(True)` resets new
    connections at once, and the current ones.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._latency = 0.0
        self._blackhole = False
        self._refuse = False
        self._stopping = False
        self._conns: set[_Conn] = set()
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._cmds: deque[tuple[Callable[[], None], threading.Event]] = deque()
        self._thread: threading.Thread | None = None
        #: counters, for tests: connections accepted, reset by refuse(), reset by a fault
        self.accepted = 0
        self.refused = 0
        self.dropped = 0

    # -- control (any thread) ------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def connections(self) -> int:
        """Proxied connections open now."""
        return len(self._conns)

    def start(self) -> TcpProxy:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", 0))
        ls.listen(512)
        ls.setblocking(False)
        self._listener = ls
        self.port = int(ls.getsockname()[1])
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(ls, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name=f"tcp-proxy:{self.port}",
                                        daemon=True)
        self._thread.start()
        return self

    def set_latency(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._apply(lambda: setattr(self, "_latency", float(seconds)))

    def blackhole(self, on: bool) -> None:
        self._apply(lambda: setattr(self, "_blackhole", bool(on)))

    def drop_all(self) -> None:
        self._apply(self._drop_all)

    def refuse(self, on: bool) -> None:
        def do() -> None:
            self._refuse = bool(on)
            if on:
                self._drop_all()

        self._apply(do)

    def stop(self) -> None:
        t = self._thread
        if t is None:
            return

        def do() -> None:
            self._drop_all()
            self._stopping = True

        if t.is_alive():
            self._apply(do)
            t.join(5)
        self._thread = None
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        with contextlib.suppress(Exception):
            self._sel.close()

    def _apply(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the I/O thread and wait until it has run."""
        t = self._thread
        if t is None or not t.is_alive():
            fn()
            return
        done = threading.Event()
        self._cmds.append((fn, done))
        self._wake()
        if not done.wait(5):
            raise RuntimeError("tcp proxy: the I/O thread did not apply a command in 5 s")

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"x")

    # -- the I/O thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping:
            for key, mask in self._sel.select(self._timeout()):
                tag = key.data
                if tag == "listen":
                    self._accept()
                elif tag == "wake":
                    with contextlib.suppress(BlockingIOError, OSError):
                        while self._wake_r.recv(4096):
                            pass
                else:
                    assert isinstance(tag, _Side)
                    if tag.conn.closed:
                        continue
                    if mask & selectors.EVENT_WRITE:
                        self._writable(tag)
                    if mask & selectors.EVENT_READ and not tag.conn.closed:
                        self._readable(tag)
            while self._cmds:
                fn, done = self._cmds.popleft()
                try:
                    fn()
                finally:
                    done.set()
            now = time.monotonic()
            for conn in list(self._conns):
                if not conn.closed:
                    self._deliver(conn, now)

    def _timeout(self) -> float | None:
        if self._cmds:
            return 0.0
        due = [s.queue[0][0] for c in self._conns for s in (c.client, c.upstream) if s.queue]
        if not due:
            return None
        return max(0.0, min(due) - time.monotonic())

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if self._refuse:
                self.refused += 1
                _reset(client)
                continue
            self.accepted += 1
            client.setblocking(False)
            _nodelay(client)
            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            up.setblocking(False)
            _nodelay(up)
            conn = _Conn(client, up)
            self._conns.add(conn)
            err = up.connect_ex(self.target)
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                self._abort(conn)
                continue
            self._update(conn.client)
            self._update(conn.upstream)

    def _update(self, side: _Side) -> None:
        """Register `side` for what it is waiting for now."""
        conn = side.conn
        if conn.closed:
            return
        if side is conn.upstream and conn.connecting:
            want = selectors.EVENT_WRITE
        else:
            want = (0 if side.eof else selectors.EVENT_READ) | (
                selectors.EVENT_WRITE if side.out else 0)
        if want == side.mask:
            return
        if side.mask == 0:
            self._sel.register(side.sock, want, side)
        elif want == 0:
            self._sel.unregister(side.sock)
        else:
            self._sel.modify(side.sock, want, side)
        side.mask = want

    def _readable(self, side: _Side) -> None:
        conn = side.conn
        try:
            data = side.sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._abort(conn)
            return
        if not data:
            side.eof = True
            self._update(side)
            self._maybe_close(conn)
            return
        if self._blackhole:
            return  # read and dropped
        conn.other(side).queue.append((time.monotonic() + self._latency, data))

    def _writable(self, side: _Side) -> None:
        conn = side.conn
        if side is conn.upstream and conn.connecting:
            err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._abort(conn)  # upstream refused: the client gets a RST
                return
            conn.connecting = False
            self._update(side)
        self._flush(side)

    def _deliver(self, conn: _Conn, now: float) -> None:
        for side in (conn.client, conn.upstream):
            q = side.queue
            while q and q[0][0] <= now:
                data = q.popleft()[1]
                if not self._blackhole:
                    side.out += data
            if side.out and not (side is conn.upstream and conn.connecting):
                self._flush(side)
                if conn.closed:
                    return
        self._maybe_close(conn)

    def _flush(self, side: _Side) -> None:
        if side.out:
            try:
                n = side.sock.send(side.out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                self._abort(side.conn)
                return
            del side.out[:n]
        self._update(side)

    def _maybe_close(self, conn: _Conn) -> None:
        """A side that stopped sending closes the connection once what it sent has been
        delivered (a FIN, as a real middlebox would pass it on); not during a blackhole,
        which passes nothing on, closes included."""
        if conn.closed or self._blackhole:
            return
        for side in (conn.client, conn.upstream):
            other = conn.other(side)
            if side.eof and not other.queue and not other.out:
                self._close(conn, reset=False)
                return

    def _close(self, conn: _Conn, reset: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        for side in (conn.client, conn.upstream):
            if side.mask:
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._sel.unregister(side.sock)
                side.mask = 0
            if reset:
                _reset(side.sock)
            else:
                with contextlib.suppress(OSError):
                    side.sock.close()

    def _abort(self, conn: _Conn) -> None:
        self._close(conn, reset=True)

    def _drop_all(self) -> None:
        for conn in list(self._conns):
            self.dropped += 1
            self._abort(conn)


def main(argv: list[str]) -> int:
    if not 2 <= len(argv) <= 3:
        print("usage: tcp_proxy.py TARGET_PORT [TARGET_HOST]", file=sys.stderr)
        return 2
    proxy = TcpProxy(int(argv[1]), argv[2] if len(argv) > 2 else "127.0.0.1").start()
    print(f"port {proxy.port}", flush=True)
    try:
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "latency":
                proxy.set_latency(float(arg))
            elif cmd == "blackhole":
                proxy.blackhole(arg == "1")
            elif cmd == "drop":
                proxy.drop_all()
            elif cmd == "refuse":
                proxy.refuse(arg == "1")
            elif cmd == "stop":
                break
            elif cmd:
                print(f"error unknown command {cmd!r}", flush=True)
                continue
            else:
                continue
            print("ok", flush=True)
    finally:
        proxy.stop()
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
