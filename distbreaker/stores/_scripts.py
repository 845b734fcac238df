"""Loading the Lua scripts from package data, in their two forms.

* A script per operation (EVAL / EVALSHA): ``_lib.lua`` (shared helpers), then the
  operation's file. Works on every Redis and on fakeredis.
* One Redis Function library (Redis 7+) with one function per operation: the same files,
  loaded once per server. The helpers and parsed configs then live between calls instead
  of being rebuilt on every call, which is most of a script's cost on the hot path.

The library and function names carry a hash of the code, so processes running different
distbreaker versions against one Redis each find their own.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .._clients import is_cluster

__all__ = ["OPS", "ScriptSet", "function_library", "function_name", "script_source"]

OPS = ("acquire", "record", "snapshot", "force", "reset")


def _lua_dir() -> Any:
    packaged = resources.files("distbreaker").joinpath("lua")
    if packaged.is_dir():
        return packaged
    # Source checkout / editable install: the top-level lua/ folder.
    return Path(__file__).resolve().parents[2] / "lua"


_EVAL_TAIL = "return run(main, KEYS_IN, ARGV_IN)"


@cache
def _read(name: str) -> str:
    text: str = _lua_dir().joinpath(name).read_text("utf-8")
    return text


@cache
def script_source(op: str) -> str:
    """The full Lua source run for `op` as a script: the shared library, then the
    operation's file (which hands the KEYS and ARGV globals, captured first, to run)."""
    if op not in OPS:
        raise ValueError(f"unknown script {op!r}; expected one of {', '.join(OPS)}")
    return "local KEYS_IN, ARGV_IN = KEYS, ARGV\n" + _read("_lib.lua") + "\n" + _read(f"{op}.lua")


@cache
def _library_id() -> str:
    code = _read("_lib.lua") + "".join(_read(f"{op}.lua") for op in OPS)
    return hashlib.sha1(code.encode()).hexdigest()[:12]


def function_name(op: str) -> str:
    """The Redis Function that runs `op`."""
    return f"distbreaker_{_library_id()}_{op}"


@cache
def function_library() -> str:
    """The Redis Function library (FUNCTION LOAD) with every operation."""
    parts = [f"#!lua name=distbreaker_{_library_id()}\n", _read("_lib.lua")]
    for op in OPS:
        body = _read(f"{op}.lua").rstrip()
        if not body.endswith(_EVAL_TAIL):
            raise RuntimeError(f"lua/{op}.lua must end with {_EVAL_TAIL!r}")
        parts.append(f"\ndo\n{body[: -len(_EVAL_TAIL)]}\n"
                     f"redis.register_function('{function_name(op)}', "
                     f"function(keys, args) return run(main, keys, args) end)\nend\n")
    return "".join(parts)


class ScriptSet:
    """A registered Script object per operation for one client (sync or asyncio), made on
    first use: most stores send pre-encoded commands and never need one."""

    __slots__ = ("_client", "_scripts", "nkeys")

    def __init__(self, client: Any) -> None:
        self._client = client
        self._scripts: dict[str, Any] = {}
        # a Cluster client sends a breaker's own keys only: the sequence hash is elsewhere
        self.nkeys = 3 if is_cluster(client) else 4

    def __getitem__(self, op: str) -> Any:
        s = self._scripts.get(op)
        if s is None:
            if op not in OPS:
                raise KeyError(op)
            s = self._scripts[op] = self._client.register_script(script_source(op))
        return s
