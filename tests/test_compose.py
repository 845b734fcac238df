"""docker-compose.yml, run natively: what the file runs is what these tests run.

No Docker engine is needed. The file is parsed with PyYAML and `NativeCompose.up()` plays
`docker compose up <services>`: it starts the requested services and their `depends_on`
in dependency order, waits for a dependency's own `healthcheck` command to pass (run
natively too) or runs a one-shot dependency to completion, and starts each service's
`command` with its `environment`, mapped like this:

- ``python ARGS`` -> ``sys.executable ARGS`` and ``distbreaker ARGS`` -> ``sys.executable -m
  distbreaker ARGS``, run in the project root (the image's WORKDIR, see the Dockerfile);
  ``redis-server`` / ``redis-cli`` -> the local binaries.
- ``<service>:<port>`` in any argument or environment value -> ``127.0.0.1:<the free port
  this test gave that service>``; a service run as several replicas (``worker``) expands a
  comma-separated value (``TARGETS``) to one entry per replica, as compose's DNS answers a
  scaled service's name with every replica's address.
- a listening service's port (its ``PORT`` or ``--port``; 6379 for a plain redis-server)
  -> a free port; redis-server also gets ``--dir <temp dir> --bind 127.0.0.1``.
- ``${VAR:-default}`` -> default; the environment inherited from pytest is stripped of
  every variable the programs read, so only the file's values count.

Every process started here is stopped by its own handle in a ``finally``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from redis_server import REDIS_SERVER, free_port
from redis_topology import REDIS_CLI, free_ports

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
HOST = "127.0.0.1"
EXECUTABLES: dict[str, list[str]] = {
    "python": [sys.executable],
    "distbreaker": [sys.executable, "-m", "distbreaker"],
    "redis-server": [REDIS_SERVER],
    "redis-cli": [REDIS_CLI],
}
# Read by the programs the file runs: never inherited from the test's environment.
PROGRAM_VARS = ("PORT", "HOST", "PROVIDER_URL", "FAIL_PROVIDERS", "TARGETS", "RATE",
                "DURATION", "CONCURRENCY", "TIMEOUT")
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _load_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


WORKER_CONFIG = _load_module("voice_worker").CONFIG


# -- reading the file ------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


def interpolate(value: str) -> str:
    return INTERPOLATION.sub(lambda m: m.group(2) or "", value).replace("$$", "$")


def command_of(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command")
    if isinstance(cmd, str):
        return shlex.split(interpolate(cmd))
    assert isinstance(cmd, list) and cmd, f"no command: {svc}"
    assert all(isinstance(a, str) for a in cmd), cmd
    return [interpolate(a) for a in cmd]


def environment_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {str(k): interpolate("" if v is None else str(v)) for k, v in env.items()}


def container_port(svc: dict[str, Any]) -> int | None:
    """The port the service listens on inside its container, if it listens."""
    argv, env = command_of(svc), environment_of(svc)
    if "--port" in argv:
        return int(argv[argv.index("--port") + 1])
    if "PORT" in env:
        return int(env["PORT"])
    if argv[0] == "redis-server":
        return 6379
    return None


def in_profile(svc: dict[str, Any], profile: str | None) -> bool:
    profiles = svc.get("profiles") or []
    return not profiles if profile is None else profile in profiles


def depends_on(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {k: (v or {}).get("condition", "service_started") for k, v in deps.items()}


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def fleet_state(text: str, breaker: str) -> str | None:
    """The state `distbreaker_state` reports as 1 for `breaker` in a scrape."""
    for (name, labels), v in metric_samples(text).items():
        d = dict(labels)
        if name == "distbreaker_state" and d.get("breaker") == breaker and v == 1.0:
            return d["state"]
    return None


def http(method: str, url: str, data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_json(method: str, url: str) -> Any:
    status, body = http(method, url)
    assert status == 200, (url, status, body)
    return json.loads(body)


# -- running it natively ---------------------------------------------------------------------


class NativeCompose:
    """Starts services of the compose file as local processes; `stop()` ends them all."""

    def __init__(self, doc: dict[str, Any], tmp: Path) -> None:
        self.services: dict[str, dict[str, Any]] = doc["services"]
        self.tmp = tmp
        self.ports: dict[str, list[int]] = {}
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.may_exit: set[str] = set()  # services that end by themselves (DURATION > 0)
        self._used: set[int] = set()
        names = sorted(self.services, key=len, reverse=True)
        self._ref = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, names)) +
                               r"):(\d+)(?!\d)")

    # ports and rewriting

    def _free_port(self, cluster_bus: bool) -> int:
        while True:
            p = free_ports(1, bus=True)[0] if cluster_bus else free_port()
            if p not in self._used and p + 10000 not in self._used:
                self._used.update({p, p + 10000})
                return p

    def assign_ports(self, name: str, replicas: int = 1) -> list[int]:
        svc = self.services[name]
        if container_port(svc) is None:
            return []
        bus = "--cluster-enabled" in command_of(svc)
        self.ports[name] = [self._free_port(bus) for _ in range(replicas)]
        return self.ports[name]

    def port(self, name: str, replica: int = 0) -> int:
        return self.ports[name][replica]

    def _sub(self, m: re.Match[str], i: int) -> str:
        name, port = m.group(1), int(m.group(2))
        want = container_port(self.services[name])
        assert port == want, f"{m.group(0)}: {name} listens on {want} in the file"
        assert name in self.ports, f"{m.group(0)} is used before {name} was started"
        ports = self.ports[name]
        return f"{HOST}:{ports[i % len(ports)]}"

    def rewrite(self, value: str) -> str:
        out = []
        for item in value.split(","):
            n = max((len(self.ports.get(m.group(1), [0])) for m in self._ref.finditer(item)),
                    default=1)
            out += [self._ref.sub(lambda m, i=i: self._sub(m, i), item) for i in range(n)]
        return ",".join(out)

    def native(self, name: str, replica: int = 0,
               overrides: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
        """argv and environment of one replica of `name`, as this machine runs it."""
        svc = self.services[name]
        argv = command_of(svc)
        assert argv[0] in EXECUTABLES, f"{name}: no native equivalent of {argv[0]!r}"
        args = [self.rewrite(a) for a in argv[1:]]
        env = {k: self.rewrite(v) for k, v in environment_of(svc).items()}
        env.update(overrides or {})
        if name in self.ports:
            port = str(self.port(name, replica))
            if "--port" in args:
                args[args.index("--port") + 1] = port
            elif "PORT" in env:
                env["PORT"] = port
            else:
                assert argv[0] == "redis-server", name
                args += ["--port", port]
        if argv[0] == "redis-server":
            d = self.tmp / f"{name}-{replica}"
            d.mkdir()
            args += ["--dir", str(d), "--bind", HOST]
        return [*EXECUTABLES[argv[0]], *args], env

    def _env(self, env: dict[str, str]) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items()
                if k not in PROGRAM_VARS and not k.startswith("DISTBREAKER_")}
        return {**base, "PYTHONUNBUFFERED": "1", **env}  # PYTHONUNBUFFERED: the Dockerfile's

    def log(self, name: str, replica: int = 0, stream: str = "err") -> str:
        try:
            return (self.tmp / f"{name}-{replica}.{stream}").read_text(errors="replace")
        except OSError:
            return ""

    def logs(self) -> str:
        return "\n".join(f"--- {n}[{i}] stderr:\n{self.log(n, i)[-1500:]}"
                         for n, ps in self.procs.items() for i in range(len(ps)))

    # lifecycle

    def start(self, name: str, replicas: int = 1,
              overrides: dict[str, str] | None = None) -> list[subprocess.Popen[bytes]]:
        self.assign_ports(name, replicas)
        procs = self.procs.setdefault(name, [])
        for i in range(replicas):
            argv, env = self.native(name, i, overrides)
            with open(self.tmp / f"{name}-{i}.out", "wb") as out, \
                    open(self.tmp / f"{name}-{i}.err", "wb") as err:
                procs.append(subprocess.Popen(argv, cwd=ROOT, env=self._env(env), stdout=out,
                                              stderr=err, stdin=subprocess.DEVNULL))
        return procs

    def run_once(self, name: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        argv, env = self.native(name)
        return subprocess.run(argv, cwd=ROOT, env=self._env(env), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def healthcheck(self, name: str, replica: int = 0) -> bool:
        """The service's own healthcheck command, natively, against this replica's port."""
        test = self.services[name]["healthcheck"]["test"]
        assert isinstance(test, list) and test[0] == "CMD", f"{name}: use the CMD form"
        want = container_port(self.services[name])
        got = str(self.port(name, replica))
        args = [re.sub(rf"(?<!\d){want}(?!\d)", got, a) for a in test[2:]]
        if test[1] == "redis-cli" and "-p" not in args:
            args = ["-p", got, *args]
        argv = [*EXECUTABLES[test[1]], *args]
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=10,
                           stdin=subprocess.DEVNULL)
        return p.returncode == 0 and b"Error" not in p.stdout

    def wait_healthy(self, name: str, timeout: float = 20) -> None:
        for i, proc in enumerate(self.procs[name]):
            wait_until(f"{name}[{i}] healthy", lambda i=i: self.healthcheck(name, i), timeout,
                       self, [proc], interval=0.1)

    def up(self, targets: list[str], replicas: dict[str, int] | None = None,
           overrides: dict[str, dict[str, str]] | None = None) -> list[str]:
        """`docker compose up targets`: dependencies first, as their conditions say."""
        order: list[str] = []

        def visit(n: str, path: tuple[str, ...]) -> None:
            assert n not in path, f"dependency cycle {(*path, n)}"
            if n not in order:
                for d in depends_on(self.services[n]):
                    visit(d, (*path, n))
                order.append(n)

        for t in targets:
            visit(t, ())
        conditions: dict[str, set[str]] = {}
        for n in order:
            for d, cond in depends_on(self.services[n]).items():
                conditions.setdefault(d, set()).add(cond)
        for n in order:
            wanted = conditions.get(n, set())
            if "service_completed_successfully" in wanted:
                p = self.run_once(n)
                assert p.returncode == 0, f"{n} failed:\n{p.stdout}\n{p.stderr}"
                continue
            self.start(n, (replicas or {}).get(n, 1), (overrides or {}).get(n))
            if "service_healthy" in wanted:
                self.wait_healthy(n)
        return order

    def stop(self) -> None:
        for procs in reversed(list(self.procs.values())):
            for p in procs:
                if p.poll() is None:
                    p.terminate()
        for procs in self.procs.values():
            for p in procs:
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def wait_until(what: str, cond: Callable[[], Any], timeout: float, stack: NativeCompose,
               procs: list[subprocess.Popen[bytes]] | None = None,
               interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    if procs is None:
        procs = [p for n, ps in stack.procs.items() if n not in stack.may_exit for p in ps]
    while True:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: {p.args!r} exited ({p.returncode})\n"
                                     f"{stack.logs()}")
        with contextlib.suppress(OSError, ValueError, KeyError, redis.RedisError):
            v = cond()
            if v:
                return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{stack.logs()}")
        time.sleep(interval)


@contextlib.contextmanager
def native_compose(tmp: Path) -> Iterator[NativeCompose]:
    stack = NativeCompose(load_compose(), tmp)
    try:
        yield stack
    finally:
        stack.stop()


def scrape(stack: NativeCompose, service: str) -> str:
    status, body = http("GET", f"http://{HOST}:{stack.port(service)}/metrics")
    assert status == 200
    return body.decode()


def loadgen_output(stack: NativeCompose, name: str) -> tuple[list[dict[str, Any]],
                                                             dict[str, Any]]:
    lines = [json.loads(ln) for ln in stack.log(name, 0, "out").splitlines() if ln.strip()]
    assert lines and lines[-1].get("summary") is True, stack.log(name, 0, "out")
    return lines[:-1], lines[-1]


# -- the file itself -------------------------------------------------------------------------


def test_every_service_runs_natively_and_the_file_is_consistent(tmp_path: Path) -> None:
    doc = load_compose()
    services = doc["services"]
    assert "version" not in doc
    default = [n for n, s in services.items() if in_profile(s, None)]
    cluster = [n for n, s in services.items() if in_profile(s, "cluster")]
    assert set(default) == {"redis", "provider", "worker", "metrics", "loadgen"}
    assert {"redis-node-1", "redis-node-2", "redis-node-3", "cluster-init", "worker-cluster",
            "metrics-cluster"} <= set(cluster)
    stack = NativeCompose(doc, tmp_path)
    for name in services:
        stack.assign_ports(name)
    for name, svc in services.items():
        argv = command_of(svc)
        assert argv[0] in EXECUTABLES, f"{name}: the tests cannot run {argv[0]!r}"
        assert ("build" in svc) != ("image" in svc), f"{name}: build or image, not both"
        if "build" in svc:
            assert argv[0] in ("python", "distbreaker"), name
            for a in argv[1:]:
                if a.endswith(".py"):
                    assert (ROOT / a).is_file(), f"{name}: {a} is not in the project"
        else:
            assert svc["image"] == "redis:7" and argv[0].startswith("redis-"), name
        assert "container_name" not in svc, f"{name}: a fixed name prevents --scale"
        native_argv, env = stack.native(name)  # every service address resolves
        assert not any(re.search(r"\b(redis|provider|worker)[\w-]*:\d", x)
                       for x in [*native_argv, *env.values()]), (name, native_argv, env)
        for dep, cond in depends_on(svc).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if in_profile(svc, None):
                assert in_profile(services[dep], None), f"{name} needs profiled {dep}"
            if cond == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
        if "healthcheck" in svc:
            test = svc["healthcheck"]["test"]
            assert test[0] == "CMD" and test[1] in EXECUTABLES, (name, test)
            port = container_port(svc)
            if port != 6379:
                assert str(port) in " ".join(test), f"{name}: healthcheck not on port {port}"
    # the fleet can scale and the operator endpoints are on the host
    for name in ("worker", "worker-cluster"):
        assert all(":" not in str(p) for p in services[name].get("ports", [])), name
    assert "9464:9464" in services["metrics"]["ports"]
    assert "8090:8090" in services["provider"]["ports"]
    assert environment_of(services["loadgen"])["TARGETS"] == "http://worker:8080"
    assert environment_of(services["loadgen"])["DURATION"] == "0"
    assert environment_of(services["worker-cluster"])["DISTBREAKER_REDIS_CLUSTER"] == "1"
    init = command_of(services["cluster-init"])
    assert init[:3] == ["redis-cli", "--cluster", "create"] and "--cluster-yes" in init
    assert sum(a.startswith("redis-node-") for a in init) == 3
    for n in ("redis-node-1", "redis-node-2", "redis-node-3"):
        assert "--cluster-enabled" in command_of(services[n])
    assert len({container_port(services[n]) for n in
                ("redis-node-1", "redis-node-2", "redis-node-3")}) == 3


def test_dockerfile_builds_what_the_compose_file_runs() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert 'RUN pip install ".[prometheus]"' in lines
    assert lines[-1] == 'CMD ["distbreaker", "--help"]'
    assert "WORKDIR /app" in lines
    copied = {p.rstrip("/") for ln in lines if ln.startswith("COPY ")
              for p in ln.split()[1:-1]}
    for need in ("pyproject.toml", "README.md", "distbreaker", "lua", "examples"):
        assert need in copied or "." in copied, f"the image lacks {need}"
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    for pattern in (".git", ".venv", "**/__pycache__", ".pytest_cache", ".mypy_cache"):
        assert pattern in ignored, pattern
    assert not ignored & {"examples", "distbreaker", "lua", "README.md", "pyproject.toml"}


async def test_loadgen_expands_a_scaled_service_to_every_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    lg = _load_module("loadgen")
    [t] = lg.parse_targets("http://worker:8080")
    answers = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("172.18.0.5", 8080)),
               (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("172.18.0.7", 8080)),
               (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::5", 8080, 0, 0)),
               (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("172.18.0.5", 8080))]
    loop = asyncio.get_running_loop()

    async def fake_getaddrinfo(host: str, port: int, **kw: Any) -> list[Any]:
        assert (host, port) == ("worker", 8080)
        return answers

    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
    t.addresses = await lg.resolve(t)
    assert [(a.ip, a.port, a.host) for a in t.addresses] == [
        ("172.18.0.5", 8080, "worker"), ("172.18.0.7", 8080, "worker")]

    async def dns_down(host: str, port: int, **kw: Any) -> list[Any]:
        raise socket.gaierror("temporary failure")

    monkeypatch.setattr(loop, "getaddrinfo", dns_down)
    assert await lg.resolve(t) == t.addresses  # a failed lookup keeps what it knew
    ips = lg.parse_targets("http://127.0.0.1:1, 10.0.0.2:2")
    assert [(x.host, x.port) for x in ips] == [("127.0.0.1", 1), ("10.0.0.2", 2)]
    assert [a.ip for a in await lg.resolve(ips[1])] == ["10.0.0.2"]
    with pytest.raises(ValueError):
        lg.parse_targets(" , ")


# -- the default profile, natively ------------------------------------------------------------


@pytest.mark.multiprocess
def test_compose_fleet_trips_and_recovers_natively(tmp_path: Path) -> None:
    cfg = WORKER_CONFIG
    with native_compose(tmp_path) as stack:
        order = stack.up(["metrics", "loadgen"], replicas={"worker": 2},
                         overrides={"loadgen": {"RATE": "40", "DURATION": "45"}})
        assert order.index("loadgen") > order.index("worker") > order.index("redis")
        redis_url = f"redis://{HOST}:{stack.port('redis')}/0"
        prov = f"http://{HOST}:{stack.port('provider')}"
        workers = [f"http://{HOST}:{p}" for p in stack.ports["worker"]]

        def counts(provider: str) -> dict[str, int]:
            got = http_json("GET", f"{prov}/admin/status")["requests"].get(provider, {})
            return {k: int(got.get(k, 0)) for k in ("requests", "ok", "failed")}

        def worker_state(url: str) -> str:
            return str(json.loads(http("GET", f"{url}/health")[1])
                       ["providers"]["openai"]["state"])

        # traffic flows through openai, the first STT choice, from both workers
        wait_until("openai serving", lambda: counts("openai")["ok"] >= 20, 15, stack)
        wait_until("a scrape with the breaker",
                   lambda: fleet_state(scrape(stack, "metrics"), "provider_openai"), 10, stack)
        assert fleet_state(scrape(stack, "metrics"), "provider_openai") == "closed"

        # the vendor goes down: the whole fleet opens its breaker
        on = http_json("POST", f"{prov}/admin/outage/openai?mode=503")
        assert on["outage"]["mode"] == "503"
        wait_until("provider_openai open in the metrics",
                   lambda: fleet_state(scrape(stack, "metrics"), "provider_openai") == "open",
                   10, stack, interval=0.02)
        t_open = time.monotonic()
        time.sleep(0.3)  # calls admitted just before the trip have reached the vendor
        before, dg_before = counts("openai"), counts("deepgram")
        text = scrape(stack, "metrics")
        assert 'distbreaker_state{breaker="provider_openai",state="open"} 1.0' in text
        for url in workers:
            wait_until(f"{url} sees openai open", lambda u=url: worker_state(u) == "open",
                       3, stack)
        cli = subprocess.run([sys.executable, "-m", "distbreaker", "list", "--json",
                              "--redis-url", redis_url], capture_output=True, text=True,
                             timeout=30, env=stack._env({}))
        assert cli.returncode == 0, cli.stderr
        listed = {b["name"]: b for b in json.loads(cli.stdout)}
        assert listed["provider_openai"]["state"] == "open"
        assert listed["provider_deepgram"]["state"] == "closed"

        # while it is open the vendor gets no calls but probes; deepgram serves instead
        quiet_until = t_open + cfg.recovery_timeout - 1.5
        assert time.monotonic() < quiet_until - 0.5, "too slow to observe the open period"
        time.sleep(quiet_until - time.monotonic())
        after, dg_after = counts("openai"), counts("deepgram")
        assert after["requests"] - before["requests"] <= cfg.half_open_max_calls, (
            before, after)
        assert dg_after["ok"] - dg_before["ok"] >= 10, (dg_before, dg_after)

        # the vendor is back: the next probes succeed and the fleet closes together
        assert http_json("DELETE", f"{prov}/admin/outage/openai")["cleared"] == ["openai"]
        wait_until("provider_openai closed again",
                   lambda: fleet_state(scrape(stack, "metrics"), "provider_openai")
                   == "closed", 3 * cfg.recovery_timeout, stack)
        for url in workers:
            wait_until(f"{url} sees openai closed", lambda u=url: worker_state(u) == "closed",
                       3, stack)
        served = counts("openai")["ok"]
        wait_until("openai serving again", lambda: counts("openai")["ok"] >= served + 10, 10,
                   stack)

        # the load balancer's view: nothing failed, fallbacks served the outage
        lg = stack.procs["loadgen"][0]
        lg.send_signal(signal.SIGTERM)
        assert lg.wait(15) == 0, stack.log("loadgen")
        per_second, summary = loadgen_output(stack, "loadgen")
        assert summary["failed"] == 0 and summary["ok"] == summary["requests"] > 100, summary
        assert summary["stt"].get("openai", 0) > 0 and summary["stt"].get("deepgram", 0) > 0
        assert set(summary["per_target"]) == {f"{HOST}:{p}" for p in stack.ports["worker"]}
        assert len(per_second) >= 5
        assert all(s["failed"] == 0 and {"requests", "ok", "p50_ms", "p99_ms"} <= set(s)
                   for s in per_second)
        assert "closed -> open" in stack.log("worker", 0) + stack.log("worker", 1)


# -- the cluster profile, natively ------------------------------------------------------------


@pytest.mark.multiprocess
def test_compose_cluster_profile_natively(tmp_path: Path) -> None:
    with native_compose(tmp_path) as stack:
        stack.may_exit.add("loadgen-cluster")
        order = stack.up(["metrics-cluster", "loadgen-cluster"],
                         overrides={"loadgen-cluster": {"RATE": "30", "DURATION": "6"}})
        assert order.index("cluster-init") > max(
            order.index(f"redis-node-{i}") for i in (1, 2, 3))
        assert "redis" not in order and "worker" not in order

        def cluster_ok() -> bool:
            for i in (1, 2, 3):
                with redis.Redis(host=HOST, port=stack.port(f"redis-node-{i}"),
                                 decode_responses=True) as node:
                    info = node.execute_command("CLUSTER", "INFO")
                    if "cluster_state:ok" not in info or "cluster_known_nodes:3" not in info:
                        return False
            return True

        wait_until("cluster_state:ok on the three nodes", cluster_ok, 10, stack)
        prov = f"http://{HOST}:{stack.port('provider')}"

        def openai_ok() -> int:
            st = http_json("GET", f"{prov}/admin/status")["requests"]
            return int(st.get("openai", {}).get("ok", 0))

        wait_until("openai serving the cluster worker", lambda: openai_ok() >= 10, 15, stack)
        wait_until("metrics-cluster answering with the breaker",
                   lambda: fleet_state(scrape(stack, "metrics-cluster"), "provider_openai"),
                   10, stack)
        samples = metric_samples(scrape(stack, "metrics-cluster"))
        assert samples[("distbreaker_fleet_up", ())] == 1.0
        assert fleet_state(scrape(stack, "metrics-cluster"), "provider_openai") == "closed"

        http_json("POST", f"{prov}/admin/outage/openai?mode=429&retry_after=30")
        wait_until("provider_openai open on the cluster",
                   lambda: fleet_state(scrape(stack, "metrics-cluster"), "provider_openai")
                   == "open", 10, stack)
        ra = metric_samples(scrape(stack, "metrics-cluster"))[
            ("distbreaker_retry_after_seconds", (("breaker", "provider_openai"),))]
        assert 20 < ra <= 30  # the open period follows the vendor's Retry-After

        lg = stack.procs["loadgen-cluster"][0]
        assert lg.wait(20) == 0, stack.log("loadgen-cluster")
        per_second, summary = loadgen_output(stack, "loadgen-cluster")
        assert summary["failed"] == 0 and summary["ok"] > 50, summary
        assert per_second and all(s["failed"] == 0 for s in per_second)
        assert summary["stt"].get("deepgram", 0) > 0
