"""Redis stores: one registered Script per operation, run with EVALSHA."""

from __future__ import annotations

from typing import Any

from .._ops import ScriptCall
from .._scripts import ScriptSet

__all__ = ["AsyncRedisStore", "RedisStore"]


class RedisStore:
    """Runs script calls on a sync redis-py client (redis-py reloads on NOSCRIPT)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._scripts = ScriptSet(client)

    def run(self, call: ScriptCall) -> Any:
        return self._scripts[call.op](keys=call.keys, args=call.args)


class AsyncRedisStore:
    """The same for a `redis.asyncio` client."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._scripts = ScriptSet(client)

    async def run(self, call: ScriptCall) -> Any:
        return await self._scripts[call.op](keys=call.keys, args=call.args)
