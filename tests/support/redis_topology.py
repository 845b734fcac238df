"""Start and stop a 3-primary Redis Cluster and a Sentinel setup on free ports, for tests.

Every process is started here with `subprocess.Popen` and stopped here by its own handle
(SIGTERM, then SIGKILL), never by name. Config, data and log files live in one temporary
directory per topology, removed by `stop()`. If anything fails to come up, `start()` stops
what it already started and raises: callers fail, they never skip.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from redis_server import REDIS_SERVER

REDIS_CLI = os.environ.get("DISTBREAKER_REDIS_CLI") or shutil.which("redis-cli") or (
    "/usr/bin/redis-cli"
)
HOST = "127.0.0.1"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def free_ports(n: int, *, bus: bool = False) -> list[int]:
    """`n` distinct free ports; with `bus`, port + 10000 (the cluster bus) is free too.

    Ports are drawn below the usual ephemeral range so that a bus port stays valid.
    """
    out: list[int] = []
    rng = random.Random()
    for _ in range(10000):
        p = rng.randrange(20000, 30000)
        if p in out or (bus and (p + 10000) in out):
            continue
        if _port_free(p) and (not bus or _port_free(p + 10000)):
            out.append(p)
            if len(out) == n:
                return out
    raise RuntimeError(f"could not find {n} free ports")


@dataclass
class Proc:
    """One process we started, with its log file; `stop()` ends exactly that process."""

    argv: list[str]
    log: Path
    port: int
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        if not os.path.exists(self.argv[0]):
            raise RuntimeError(f"{self.argv[0]} not found: install redis-server")
        with open(self.log, "ab") as f:
            self.popen = subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive():
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait(5)

    def stop(self) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def client(self, **kw: Any) -> redis.Redis:
        kw.setdefault("socket_timeout", 2.0)
        return redis.Redis(host=HOST, port=self.port, **kw)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _server_argv(port: int, d: Path, *extra: str) -> list[str]:
    return [REDIS_SERVER, "--port", str(port), "--bind", HOST, "--save", "",
            "--appendonly", "no", "--dir", str(d), "--protected-mode", "no",
            "--daemonize", "no", "--repl-diskless-sync-delay", "0", *extra]


def _wait(what: str, cond: Any, timeout: float, procs: list[Proc]) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        dead = [p for p in procs if not p.alive()]
        if dead:
            raise RuntimeError(f"{what}: process on port {dead[0].port} exited:\n"
                               f"{dead[0].log_tail()}")
        try:
            if cond():
                return
        except (redis.RedisError, OSError) as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what} (last error: {last!r})")


def _ping(p: Proc) -> bool:
    c = p.client(socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(c.ping())
    finally:
        c.close()


# -- Cluster ---------------------------------------------------------------------------------


@dataclass
class ClusterTopology:
    """Three primaries, no replicas, all 16384 slots assigned by ``redis-cli --cluster create``."""

    size: int = 3
    node_timeout_ms: int = 2000
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="distbreaker-cl-")))
    nodes: list[Proc] = field(default_factory=list)

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def start(self, timeout: float = 30.0) -> ClusterTopology:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        for port in free_ports(self.size, bus=True):
            d = self.dir / str(port)
            d.mkdir()
            argv = _server_argv(port, d, "--cluster-enabled", "yes",
                                "--cluster-config-file", str(d / "nodes.conf"),
                                "--cluster-node-timeout", str(self.node_timeout_ms))
            self.nodes.append(Proc(argv, self.dir / f"node-{port}.log", port).start())
        _wait("cluster nodes to answer PING", lambda: all(_ping(n) for n in self.nodes),
              timeout, self.nodes)
        out = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *[f"{HOST}:{p}" for p in self.ports],
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        if out.returncode != 0 or "[OK] All 16384 slots covered" not in out.stdout:
            raise RuntimeError(f"redis-cli --cluster create failed ({out.returncode}):\n"
                               f"{out.stdout}\n{out.stderr}")
        _wait("cluster_state:ok on every node with a full, agreed slot map",
              self._converged, timeout, self.nodes)

    def _converged(self) -> bool:
        maps = []
        for n in self.nodes:
            c = n.client(socket_timeout=0.5, decode_responses=True)
            try:
                info = c.execute_command("CLUSTER", "INFO")
                if "cluster_state:ok" not in info or "cluster_known_nodes:3" not in info:
                    return False
                maps.append(sorted(self._slot_ranges(c)))
            finally:
                c.close()
        return all(m == maps[0] for m in maps) and sum(b - a + 1 for a, b, _ in maps[0]) == 16384

    @staticmethod
    def _slot_ranges(c: redis.Redis) -> list[tuple[int, int, int]]:
        raw = c.execute_command("CLUSTER", "SLOTS")
        # redis-py parses CLUSTER SLOTS into {(start, end): {"primary": (host, port), ...}}
        if isinstance(raw, dict):
            return [(a, b, int(v["primary"][1])) for (a, b), v in raw.items()]
        return [(int(r[0]), int(r[1]), int(r[2][1])) for r in raw]

    def slot_owner(self, slot: int) -> int:
        """The port of the primary that serves `slot`, as the first node sees it."""
        c = self.nodes[0].client(decode_responses=True)
        try:
            for a, b, port in self._slot_ranges(c):
                if a <= slot <= b:
                    return port
        finally:
            c.close()
        raise LookupError(slot)

    def node(self, port: int) -> Proc:
        return next(n for n in self.nodes if n.port == port)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes if n.pid is not None]


# -- Sentinel --------------------------------------------------------------------------------


@dataclass
class SentinelTopology:
    """A primary, one replica of it, and `n_sentinels` sentinels monitoring `service`."""

    n_sentinels: int = 3
    quorum: int = 2
    service: str = "mymaster"
    down_after_ms: int = 1000
    failover_timeout_ms: int = 3000
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="distbreaker-sn-")))
    servers: list[Proc] = field(default_factory=list)  # [initial primary, initial replica]
    sentinels: list[Proc] = field(default_factory=list)

    @property
    def sentinel_addrs(self) -> list[tuple[str, int]]:
        return [(HOST, s.port) for s in self.sentinels]

    @property
    def primary(self) -> Proc:
        return self.servers[0]

    @property
    def replica(self) -> Proc:
        return self.servers[1]

    def start(self, timeout: float = 30.0) -> SentinelTopology:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        pm, pr, *sps = free_ports(2 + self.n_sentinels)
        for port, extra in ((pm, ()), (pr, ("--replicaof", HOST, str(pm)))):
            d = self.dir / str(port)
            d.mkdir()
            self.servers.append(Proc(_server_argv(port, d, *extra),
                                     self.dir / f"redis-{port}.log", port).start())
        _wait("primary and replica to answer PING", lambda: all(_ping(s) for s in self.servers),
              timeout, self.servers)
        _wait("the replica to sync", lambda: self._link_up(self.replica), timeout, self.servers)
        for port in sps:
            d = self.dir / f"sentinel-{port}"
            d.mkdir()
            conf = d / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind {HOST}\nprotected-mode no\ndaemonize no\ndir {d}\n"
                f"sentinel monitor {self.service} {HOST} {pm} {self.quorum}\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
            self.sentinels.append(Proc([REDIS_SERVER, str(conf), "--sentinel"],
                                       self.dir / f"sentinel-{port}.log", port).start())
        _wait("sentinels to know the primary, the replica and each other",
              self._sentinels_ready, timeout, self.servers + self.sentinels)

    @staticmethod
    def _link_up(p: Proc) -> bool:
        c = p.client(socket_timeout=0.5, decode_responses=True)
        try:
            info = c.info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"
        finally:
            c.close()

    def _sentinels_ready(self) -> bool:
        for s in self.sentinels:
            c = s.client(socket_timeout=0.5, decode_responses=True)
            try:
                m = c.execute_command("SENTINEL", "MASTER", self.service)
                if isinstance(m, list):
                    m = dict(zip(m[::2], m[1::2], strict=False))
                flags = str(m.get("flags", ""))
                if (
                    flags != "master"
                    or int(m.get("num-slaves", 0)) < 1
                    or int(m.get("num-other-sentinels", 0)) < self.n_sentinels - 1
                ):
                    return False
                reps = c.execute_command("SENTINEL", "REPLICAS", self.service)
                ok = False
                for r in reps:
                    if isinstance(r, list):
                        r = dict(zip(r[::2], r[1::2], strict=False))
                    if int(r.get("port", 0)) == self.replica.port and r.get("flags") == "slave" \
                            and r.get("master-link-status") == "ok":
                        ok = True
                if not ok:
                    return False
            finally:
                c.close()
        return True

    def master_addr(self, sentinel: int = 0) -> tuple[str, int]:
        c = self.sentinels[sentinel].client(socket_timeout=1.0, decode_responses=True)
        try:
            host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            return str(host), int(port)
        finally:
            c.close()

    def server(self, port: int) -> Proc:
        return next(s for s in self.servers if s.port == port)

    def role(self, port: int) -> str:
        c = self.server(port).client(socket_timeout=0.5, decode_responses=True)
        try:
            return str(c.info("replication").get("role"))
        finally:
            c.close()

    def stop(self) -> None:
        for p in (*self.sentinels, *self.servers):
            p.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in (*self.servers, *self.sentinels) if p.pid is not None]


def pids_alive(pids: list[int]) -> list[int]:
    """Those of `pids` that still exist (and are not zombies)."""
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] != "Z":
                out.append(pid)
    return out


# -- worker processes ------------------------------------------------------------------------


class Worker:
    """A fresh Python subprocess that prints one JSON object per line on stdout.

    A reader thread queues every line as it arrives; `send()` writes a line to its stdin,
    `finish()` closes stdin (the worker's signal to stop) and waits. `kill()` ends exactly
    this process.
    """

    def __init__(self, argv: list[str]) -> None:
        import queue
        import threading

        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, bufsize=1)
        self.stderr = ""
        self._out = threading.Thread(target=self._read, daemon=True)
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._out.start()
        self._err.start()

    def _read(self) -> None:
        import json

        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            line = line.strip()
            if line:
                try:
                    self.lines.put(json.loads(line))
                except ValueError:
                    self.lines.put({"kind": "garbage", "line": line})

    def _read_err(self) -> None:
        assert self.popen.stderr is not None
        self.stderr = self.popen.stderr.read()

    def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        """The next line of `kind` (earlier lines of other kinds are kept in `seen`)."""
        import queue

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"worker sent no {kind!r} line in {timeout}s; "
                                     f"seen {self.seen[-5:]}; stderr:\n{self.stderr[-3000:]}")
            try:
                msg = self.lines.get(timeout=min(left, 0.1))
            except queue.Empty:
                if self.popen.poll() is not None and self.lines.empty():
                    self._err.join(1)
                    raise AssertionError(f"worker exited ({self.popen.returncode}) before "
                                         f"{kind!r}; stderr:\n{self.stderr[-3000:]}") from None
                continue
            self.seen.append(msg)
            if msg.get("kind") == kind:
                return msg

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        """Close stdin and return the final ``result`` line."""
        assert self.popen.stdin is not None
        with contextlib.suppress(OSError):
            self.popen.stdin.close()
        result = self.expect("result", timeout)
        self.popen.wait(timeout)
        self._err.join(5)
        return result

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)
        with contextlib.suppress(Exception):
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        self._out.join(5)  # the readers end at EOF and close nothing themselves
        self._err.join(5)
        for f in (self.popen.stdout, self.popen.stderr):
            with contextlib.suppress(Exception):
                if f is not None:
                    f.close()


def stdin_closed_event() -> Any:
    """In a worker: an Event set when the parent closes our stdin (or sends ``stop``);
    other lines go to the returned event's ``lines`` queue."""
    import queue
    import sys
    import threading

    ev = threading.Event()
    ev.lines = queue.Queue()  # type: ignore[attr-defined]

    def run() -> None:
        for line in sys.stdin:
            line = line.strip()
            if line == "stop":
                break
            ev.lines.put(line)  # type: ignore[attr-defined]
        ev.set()

    threading.Thread(target=run, daemon=True).start()
    return ev
