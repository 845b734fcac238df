"""Stores run script calls: in process (the pure model) or in Redis (the Lua scripts)."""

from .memory import AsyncMemoryStore, MemoryStore
from .redis import AsyncRedisStore, RedisStore

__all__ = ["AsyncMemoryStore", "AsyncRedisStore", "MemoryStore", "RedisStore"]
