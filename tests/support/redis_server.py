"""Start and stop private redis-server processes on free ports, for the tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import redis

REDIS_SERVER = os.environ.get("DISTBREAKER_REDIS_SERVER") or shutil.which("redis-server") or (
    "/usr/bin/redis-server"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """One redis-server we started; `stop()` kills exactly that process."""

    port: int = field(default_factory=free_port)
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="distbreaker-redis-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (or restart, on the same port) the server. A first start whose free port
        was taken in the meantime by another redis-server (another test run on this
        machine) moves to a new port: answering PING is not enough, the server must be
        the process we started."""
        if not os.path.exists(REDIS_SERVER):
            raise RuntimeError(f"redis-server not found at {REDIS_SERVER}: install it")
        first = self.proc is None
        for _attempt in range(5):
            if self._spawn(timeout):
                return self
            if not first:
                raise RuntimeError(f"port {self.port} is taken by another process")
            self.port = free_port()
        raise RuntimeError("could not start redis-server on a free port")

    def _spawn(self, timeout: float) -> bool:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                return False  # exited: most likely the port was taken
            try:
                with redis.Redis(port=self.port, socket_timeout=0.5) as c:
                    pid = int(c.info("server")["process_id"])
                if pid == self.proc.pid:
                    return True
                self.stop()  # someone else's server answers on this port
                return False
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)

    def client(self, **kw: object) -> redis.Redis:
        return redis.Redis(port=self.port, **kw)  # type: ignore[arg-type]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
