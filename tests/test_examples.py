"""The examples run as users run them: real processes on a real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent


def _get(url: str, data: bytes | None = None) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _start_worker(redis_url: str, port: int, fail: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, DISTBREAKER_REDIS_URL=redis_url, FAIL_PROVIDERS=fail)
    p = subprocess.Popen([sys.executable, str(ROOT / "examples" / "voice_worker.py"),
                          "--port", str(port)], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            _get(f"http://127.0.0.1:{port}/health")
            return p
        except (urllib.error.URLError, ConnectionError):
            if p.poll() is not None or time.monotonic() > deadline:
                p.kill()
                raise RuntimeError("voice worker did not start") from None
            time.sleep(0.05)


@pytest.mark.multiprocess
def test_voice_workers_share_a_trip(redis_server: RedisServer, redis_client: Any) -> None:
    pa, pb = free_port(), free_port()
    a = _start_worker(redis_server.url, pa, "openai")
    b = _start_worker(redis_server.url, pb, "")
    try:
        for _ in range(8):
            status, body = _get(f"http://127.0.0.1:{pa}/voice", b"hello")
            assert status == 200 and body["text"].startswith("stt:deepgram")
        # worker b never called openai, yet sees it open (pushed through Redis)
        deadline = time.monotonic() + 5
        while True:
            status, h = _get(f"http://127.0.0.1:{pb}/health")
            if h["providers"]["openai"]["state"] == "open" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert h["providers"]["openai"]["state"] == "open"
        assert h["status"] == "degraded" and h["store"] == "redis"
        status, body = _get(f"http://127.0.0.1:{pb}/voice", b"hi")
        assert status == 200 and body["text"].startswith("stt:deepgram")  # openai skipped
        assert redis_client.hget("distbreaker:v1:{provider_openai}", "state") == b"open"
    finally:
        for p in (a, b):
            p.terminate()
            p.wait(10)


@pytest.mark.multiprocess
def test_quickstart_example_runs() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "closed -> open" in p.stdout and "half_open -> closed" in p.stdout
    assert p.stdout.count("closed -> open") == 1


def test_free_port_helper() -> None:
    s = RedisServer()
    assert 0 < s.port < 65536
