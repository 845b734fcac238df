"""Reading and steering breakers from outside a worker: the CLI, metrics, health.

An operator has no breaker config at hand, so reads decode the keys directly (the window
carries a tag with its shape, so its totals can be computed as the scripts would) and
writes go through the same `force.lua` / `reset.lua` the library uses, with an empty
fingerprint so the stored config fingerprint is kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ._config import CircuitBreakerConfig
from ._keys import SCHEMA, BreakerKeys, channel_for
from ._model import roll_window
from ._protocol import build_call, decode_reply
from .stores.redis import RedisStore

__all__ = ["BreakerView", "as_dicts", "breaker_names", "connect", "list_breakers", "operate",
           "read_breaker"]

_CLI_CONFIG = CircuitBreakerConfig()

_EXPLAIN = {
    "state": "computed state: closed, open or half_open",
    "forced": "operator override (open / closed), empty if none; wins over state",
    "generation": "bumped on every transition; outcomes of older generations are ignored",
    "open_until_ms": "Redis time (ms) when an OPEN breaker admits its first probe",
    "opened_at_ms": "Redis time (ms) of the last trip",
    "consecutive_failures": "failures in a row, fleet-wide (CLOSED)",
    "half_open_successes": "probe successes in this half-open period",
    "reopen_count": "reopens from HALF_OPEN since the last close (drives backoff)",
    "config_fingerprint": "hash of the config of the last process that wrote the state",
    "config_fingerprint_other": "another config seen writing this breaker (drift)",
    "config_drift_at_ms": "Redis time (ms) when two configs last wrote this breaker",
    "updated_at_ms": "Redis time (ms) of the last write",
}


def connect(url: str) -> Any:
    """A client for `url`; a Cluster client when the server runs in cluster mode."""
    import redis

    if not isinstance(url, str) or not re.match(r"^(rediss?|unix)://", url):
        raise ValueError(f"Redis URL must start with redis://, rediss:// or unix://, got {url!r}")
    try:
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
        info = client.info("cluster")
    except ValueError as e:
        raise ValueError(f"bad Redis URL {url!r}: {e}") from None
    if info.get("cluster_enabled"):
        from redis.cluster import RedisCluster

        client.close()
        return RedisCluster.from_url(url, socket_timeout=5, socket_connect_timeout=3)
    return client


def _s(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _int(d: dict[str, str], k: str) -> int:
    try:
        return int(float(d.get(k, "0") or 0))
    except ValueError:
        return 0


@dataclass
class BreakerView:
    """One breaker as Redis holds it, decoded."""

    name: str
    key: str
    fields: dict[str, str]
    now_ms: int
    ttl_ms: int
    window_fields: dict[str, str] = field(default_factory=dict)
    probes: list[tuple[str, int]] = field(default_factory=list)

    @property
    def state(self) -> str:
        return self.fields.get("state", "closed")

    @property
    def forced(self) -> str:
        return self.fields.get("forced", "")

    @property
    def effective_state(self) -> str:
        return self.forced or self.state

    @property
    def generation(self) -> int:
        return _int(self.fields, "generation")

    @property
    def retry_after_s(self) -> float | None:
        """Seconds until a probe may go out (0 if due now); None while forced open."""
        if self.forced == "open":
            return None
        if self.forced or self.state != "open":
            return 0.0
        return max(_int(self.fields, "open_until_ms") - self.now_ms, 0) / 1000.0

    @property
    def window(self) -> dict[str, Any]:
        """The window's shape and its totals as of `now_ms`, computed as the scripts do."""
        w = self.window_fields
        tag = w.get("k", "")
        m = re.match(r"^([tc])(\d+):(\d+)$", tag)
        if not m:
            return {"type": None, "calls": 0, "failures": 0, "slow": 0}
        kind, wn, bw = m.group(1), int(m.group(2)), int(m.group(3))
        if kind == "c":
            return {"type": "count", "size": wn, "calls": _int(w, "n"),
                    "failures": _int(w, "f"), "slow": _int(w, "s")}
        def expired(epoch: int) -> tuple[int, int, int]:  # the ring slot it used
            j = epoch % wn
            return _int(w, f"c{j}"), _int(w, f"f{j}"), _int(w, f"s{j}")

        last = _int(w, "e") if "e" in w else None
        c, f, s = roll_window((_int(w, "c"), _int(w, "f"), _int(w, "s")), last,
                              self.now_ms // bw if bw else 0, wn, expired)
        return {"type": "time", "buckets": wn, "bucket_ms": bw, "size_s": wn * bw / 1000,
                "calls": max(c, 0), "failures": max(f, 0), "slow": max(s, 0)}

    @property
    def failure_rate(self) -> float:
        w = self.window
        return w["failures"] / w["calls"] if w["calls"] else 0.0

    @property
    def config_drift(self) -> bool:
        other = self.fields.get("config_fingerprint_other")
        at = _int(self.fields, "config_drift_at_ms")
        # drift seen within the last 10 minutes
        return bool(other) and self.now_ms - at < 600_000

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "state": self.effective_state,
            "computed_state": self.state,
            "override": self.forced or None,
            "generation": self.generation,
            "retry_after_s": self.retry_after_s,
            "failure_rate": round(self.failure_rate, 4),
            "window": self.window,
            "consecutive_failures": _int(self.fields, "consecutive_failures"),
            "probes": [{"lease": lease, "expires_in_ms": ms} for lease, ms in self.probes],
            "config_fingerprint": self.fields.get("config_fingerprint", ""),
            "config_drift": self.config_drift,
            "updated_at_ms": _int(self.fields, "updated_at_ms"),
            "last_change_s_ago": round(
                (self.now_ms - _int(self.fields, "updated_at_ms")) / 1000, 3),
            "ttl_ms": self.ttl_ms,
            "server_time_ms": self.now_ms,
            "fields": dict(self.fields),
        }

    def explained(self) -> list[tuple[str, str, str]]:
        return [(k, v, _EXPLAIN.get(k, "")) for k, v in sorted(self.fields.items())]


def _server_ms(client: Any) -> int:
    t = client.time()
    if isinstance(t, dict):  # a Cluster client answers per node
        t = next(iter(t.values()))
    return int(t[0]) * 1000 + int(t[1]) // 1000


def read_breaker(client: Any, prefix: str, name: str) -> BreakerView | None:
    """The breaker `name`, or None if Redis has no state for it."""
    keys = BreakerKeys.for_name(name, prefix)
    pipe = client.pipeline(transaction=False)
    pipe.type(keys.state)
    pipe.hgetall(keys.state)
    pipe.pttl(keys.state)
    pipe.type(keys.window)
    pipe.hgetall(keys.window)
    pipe.type(keys.probes)
    pipe.zrange(keys.probes, 0, -1, withscores=True)
    res = pipe.execute(raise_on_error=False)
    now = _server_ms(client)
    if _s(res[0]) != "hash":
        return None
    fields = {_s(k): _s(v) for k, v in res[1].items()}
    window = ({_s(k): _s(v) for k, v in res[4].items()}
              if _s(res[3]) == "hash" and isinstance(res[4], dict) else {})
    probes = ([(_s(m), int(sc) - now) for m, sc in res[6] if int(sc) > now]
              if _s(res[5]) == "zset" and isinstance(res[6], list) else [])
    ttl = res[2] if isinstance(res[2], int) else -1
    return BreakerView(name, keys.state, fields, now, ttl, window, probes)


def breaker_names(client: Any, prefix: str) -> Iterator[str]:
    """Names of every breaker under `prefix` (SCAN; every primary of a Cluster)."""
    pattern = f"{prefix}:{SCHEMA}:{{*}}"
    start = len(prefix) + len(SCHEMA) + 3
    seen: set[str] = set()
    for k in client.scan_iter(match=pattern, count=500):
        key = _s(k)
        name = key[start:-1]
        if key.endswith("}") and name not in seen:
            seen.add(name)
            yield name


def list_breakers(client: Any, prefix: str) -> list[BreakerView]:
    out = []
    for name in sorted(breaker_names(client, prefix)):
        try:
            v = read_breaker(client, prefix, name)
        except ValueError:
            continue  # a key whose name is not a valid breaker name: not ours
        if v is not None:
            out.append(v)
    return out


def operate(client: Any, prefix: str, name: str, op: str, mode: str = "") -> Any:
    """Run force.lua (op "force", mode open/closed/'') or reset.lua as an operator."""
    if op not in ("force", "reset"):
        raise ValueError(f"unknown operation {op!r}")
    call = build_call(op, BreakerKeys.for_name(name, prefix), _CLI_CONFIG, channel_for(prefix),
                      extra=[mode] if op == "force" else [], fingerprint="")
    return decode_reply(RedisStore(client).run(call))


def as_dicts(views: list[BreakerView]) -> list[dict[str, Any]]:
    return [v.to_dict() for v in views]

