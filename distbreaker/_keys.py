"""Key names and breaker-name validation.

All keys of one breaker share the hash tag ``{<name>}`` so that every script touches a
single Redis Cluster slot. Names therefore may not contain braces.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = ["DEFAULT_PREFIX", "MAX_NAME_LENGTH", "BreakerKeys", "channel_for", "seq_key_for",
           "validate_name"]

DEFAULT_PREFIX = "distbreaker"
MAX_NAME_LENGTH = 200
SCHEMA = "v1"


def validate_name(name: object) -> str:
    """Return `name` if it is a usable breaker name, else raise ValueError saying why."""
    if not isinstance(name, str):
        raise ValueError(f"breaker name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError("breaker name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(
            f"breaker name must be at most {MAX_NAME_LENGTH} characters, got {len(name)}"
        )
    if "{" in name or "}" in name:
        raise ValueError(
            f"breaker name must not contain '{{' or '}}' (hash tag), got {name!r}"
        )
    if any(ord(ch) < 32 or ord(ch) == 127 or ch.isspace() for ch in name):
        raise ValueError(
            f"breaker name must not contain whitespace or control characters, got {name!r}"
        )
    return name


def validate_prefix(prefix: object) -> str:
    """Return `prefix` if it can start a key, else raise ValueError."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty str, got {prefix!r}")
    if any(ch in prefix for ch in "{} ") or any(ord(ch) < 32 for ch in prefix):
        raise ValueError(
            f"prefix must not contain braces, spaces or control characters, got {prefix!r}"
        )
    return prefix


def channel_for(prefix: str) -> str:
    """The one pub/sub channel on which every breaker under `prefix` announces transitions."""
    return f"{prefix}:{SCHEMA}:events"


@functools.lru_cache(maxsize=64)  # one string for every breaker of a prefix
def seq_key_for(prefix: str) -> str:
    """The hash that numbers the messages on `prefix`'s channel (field ``n``) and names the
    data it belongs to (field ``e``, an epoch a listener writes): with it a listener knows
    that it has heard everything, or what it missed, with one read (see _listener.py)."""
    return f"{prefix}:{SCHEMA}:seq"


@dataclass(frozen=True)
class BreakerKeys:
    """The keys of one breaker, in the order every script expects them: its three own keys
    (one hash tag, one Cluster slot) and its prefix's sequence hash, which a Cluster store
    leaves out (`ScriptSet.nkeys`)."""

    name: str
    state: str
    window: str
    probes: str
    seq: str

    @classmethod
    def for_name(cls, name: str, prefix: str = DEFAULT_PREFIX) -> BreakerKeys:
        validate_name(name)
        base = f"{prefix}:{SCHEMA}:{{{name}}}"
        return cls(name, base, f"{base}:window", f"{base}:probes", seq_key_for(prefix))

    @property
    def all(self) -> list[str]:
        return [self.state, self.window, self.probes, self.seq]
