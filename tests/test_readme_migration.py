"""The README's migration section runs as written (against a private redis-server in a
fresh process, the URL being the only thing replaced)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent


def migration_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Migrating from the in-process breaker", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m is not None, "no code block in the README's migration section"
    return m.group(1)


def test_the_migration_section_runs_as_written(redis_server: RedisServer) -> None:
    code = migration_block()
    assert "redis://localhost:6379/0" in code
    code = code.replace("redis://localhost:6379/0", redis_server.url)
    redis_server.client().flushall()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n")
    assert lines[0] == "1 1 0 0.0", p.stdout  # total, successful, failed, failure rate
    assert lines[1].startswith("healthy "), p.stdout
    assert lines[2] == "text", p.stdout
