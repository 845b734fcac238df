"""`distbreaker demo` end to end, as a user runs it: with a private redis-server, and with
no redis-server on PATH (the embedded server)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distbreaker._demo import CONFIG


def run_demo(tmp_path: Path, *, path: str | None = None, extra: tuple[str, ...] = ()) -> dict:
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = path
    env.pop("DISTBREAKER_REDIS_URL", None)
    p = subprocess.run(
        [sys.executable, "-m", "distbreaker", "demo", "--duration", "8", "--json",
         "--seed", "7", *extra],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stdout  # --json prints the summary only
    return json.loads(lines[0])


def check(s: dict, kind: str) -> None:
    assert s["redis"] == kind
    assert s["worker_exit_codes"] == [0, 0, 0, 0]
    failing = s["providers"][s["failing_provider"]]
    assert failing["trips"] == 1, failing
    assert failing["recovered"] is True, failing
    assert failing["time_to_trip_s"] is not None and failing["time_to_trip_s"] < 1.0
    assert 1 <= failing["max_probes_per_half_open"] <= CONFIG.half_open_max_calls
    assert failing["half_open_periods"] >= 1
    assert failing["rejected"] > 0
    assert failing["failures"] >= CONFIG.failure_threshold
    f = s["fleet"]
    assert f["requests"] > 100 and f["requests_served"] == f["requests"]
    assert f["requests_during_outage"] > 0 and f["failed_during_outage"] == 0
    assert f["requests_failed_for_user"] == 0
    assert f["fallbacks_used"] > 0
    for name, p in s["providers"].items():
        if name != s["failing_provider"]:
            assert p["trips"] == 0 and p["failures"] == 0


@pytest.mark.multiprocess
def test_demo_with_private_redis_server(tmp_path: Path) -> None:
    assert shutil.which("redis-server"), "the test machine must have redis-server"
    check(run_demo(tmp_path), "redis-server")


@pytest.mark.multiprocess
def test_demo_without_redis_server_on_path(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    check(run_demo(tmp_path, path=str(empty)), "embedded")


@pytest.mark.multiprocess
def test_demo_with_given_url(tmp_path: Path, redis_server: object) -> None:
    url = redis_server.url  # type: ignore[attr-defined]
    check(run_demo(tmp_path, extra=("--redis-url", url)), "given")


def test_demo_rejects_bad_flags() -> None:
    p = subprocess.run([sys.executable, "-m", "distbreaker", "demo", "--workers", "0"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "--workers" in p.stderr


@pytest.mark.multiprocess
def test_ctrl_c_stops_everything_the_demo_started(tmp_path: Path) -> None:
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "distbreaker", "demo", "--duration", "30"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        kids: list[str] = []
        while len(kids) < 5:  # 4 workers and the private redis-server
            assert time.monotonic() < deadline, "the demo did not start its processes"
            time.sleep(0.2)
            kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                                  text=True).stdout.split()
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130
    assert "Traceback" not in (p.stderr.read() if p.stderr else "")
    time.sleep(0.5)
    assert [k for k in kids if os.path.exists(f"/proc/{k}")] == []
