"""Loading the Lua scripts from package data.

Each operation's file is prefixed with ``_lib.lua`` (shared helpers) and registered with
the client's own ``register_script``, so redis-py runs EVALSHA and reloads on NOSCRIPT.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["OPS", "ScriptSet", "script_source"]

OPS = ("acquire", "record", "snapshot", "force", "reset")


def _lua_dir() -> Any:
    packaged = resources.files("distbreaker").joinpath("lua")
    if packaged.is_dir():
        return packaged
    # Source checkout / editable install: the top-level lua/ folder.
    return Path(__file__).resolve().parent.parent / "lua"


@cache
def script_source(op: str) -> str:
    """The full Lua source run for `op`: the shared library, then the operation's file."""
    if op not in OPS:
        raise ValueError(f"unknown script {op!r}; expected one of {', '.join(OPS)}")
    d = _lua_dir()
    lib: str = d.joinpath("_lib.lua").read_text("utf-8")
    body: str = d.joinpath(f"{op}.lua").read_text("utf-8")
    return lib + "\n" + body


class ScriptSet:
    """One registered Script object per operation for one client (sync or asyncio)."""

    __slots__ = ("_scripts",)

    def __init__(self, client: Any) -> None:
        self._scripts = {op: client.register_script(script_source(op)) for op in OPS}

    def __getitem__(self, op: str) -> Any:
        return self._scripts[op]
