"""Sans-I/O script calls: argument building and reply decoding, shared by every shell.

Nothing here touches the network. A store runs ``(op, keys, args)`` and hands the raw
reply back to `decode_reply`; the memory store runs the same arguments through the pure
model, so all stores speak exactly the script protocol described in ``lua/_lib.lua``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._config import CircuitBreakerConfig, CircuitState
from ._keys import BreakerKeys

__all__ = [
    "Code",
    "Push",
    "Reply",
    "ScriptCall",
    "decode_push",
    "decode_reply",
    "effective_state",
    "record_outcomes",
]


class Code(enum.IntEnum):
    """Outcome codes understood by record.lua."""

    OK = 0
    FAILED = 1
    SLOW_OK = 2
    SLOW_FAILED = 3
    NONE = 4  # no outcome (ignored exception, cancellation): only return the lease

    @staticmethod
    def of(failed: bool, slow: bool) -> int:
        """The code's value as a plain int: it runs once per outcome, and building an
        enum member costs more than the rest of recording one."""
        return (2 if slow else 0) + (1 if failed else 0)


@dataclass(frozen=True)
class ScriptCall:
    """Everything a store needs to run one script: operation, KEYS and ARGV."""

    op: str
    keys: list[str]
    args: list[str | int | float]


def argv_prefix(script_arg: str, fingerprint: str, channel: str,
                sender: str) -> list[str | int | float]:
    """ARGV[1..4] of every script (see lua/_lib.lua); ARGV[5] (random) and ARGV[6] (test
    clock) follow per call. `sender` is '<origin> <name>', or just the name."""
    return [script_arg, fingerprint, channel, sender]


def build_call(
    op: str,
    keys: BreakerKeys,
    cfg: CircuitBreakerConfig,
    channel: str,
    *,
    rnd: float = 0.5,
    now_ms: int | None = None,
    extra: Sequence[str | int | float] = (),
    fingerprint: str | None = None,
) -> ScriptCall:
    """A script call made without a breaker object (tests, the CLI). An empty
    `fingerprint` keeps the one stored in Redis."""
    fp = cfg.fingerprint if fingerprint is None else fingerprint
    args = argv_prefix(cfg.script_arg, fp, channel, keys.name)
    args += [rnd, "" if now_ms is None else now_ms, *extra]
    return ScriptCall(op, keys.all, args)


def record_outcomes(args: Sequence[Any]) -> list[tuple[int, int, str, int]]:
    """The outcomes a record call carries, in order: (generation, code, lease,
    retry_after_ms), from groups of four or from a compact batch."""
    if len(args) > 7 and args[6] == "r":
        out: list[tuple[int, int, str, int]] = []
        for run in str(args[7]).split(";") if args[7] else ():
            g, c, r, n = (int(x) for x in run.split(","))
            out += [(g, c, "", r)] * n
        return out
    return [(int(args[i]), int(args[i + 1]), str(args[i + 2]), int(args[i + 3]))
            for i in range(7, len(args), 4)]


def _s(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if v is None:
        return ""
    return str(v)


def _i(v: Any) -> int:
    if isinstance(v, int):
        return v
    return int(_s(v) or 0)


def effective_state(state: str, forced: str) -> CircuitState:
    return CircuitState(forced or state)


@dataclass(frozen=True)
class Reply:
    """A decoded script reply (field order: see the end of ``lua/_lib.lua``)."""

    decision: int
    state: str
    forced: str
    generation: int
    open_until_ms: int
    now_ms: int
    transition_from: str
    retry_after_ms: int
    probes_free: int
    calls: int
    failures: int
    slow: int
    consecutive_failures: int
    note: str
    extra: tuple[Any, ...] = ()

    @property
    def effective(self) -> CircuitState:
        return effective_state(self.state, self.forced)


def decode_reply(raw: Sequence[Any]) -> Reply:
    """Decode a script reply; raises ValueError if it is not one of ours."""
    if not isinstance(raw, (list, tuple)) or len(raw) < 14:
        raise ValueError(f"unexpected script reply: {raw!r}")
    state = _s(raw[1])
    forced = _s(raw[2])
    if state not in ("closed", "open", "half_open") or forced not in ("", "open", "closed"):
        raise ValueError(f"unexpected state in script reply: {raw!r}")
    return Reply(
        decision=_i(raw[0]),
        state=state,
        forced=forced,
        generation=_i(raw[3]),
        open_until_ms=_i(raw[4]),
        now_ms=_i(raw[5]),
        transition_from=_s(raw[6]),
        retry_after_ms=_i(raw[7]),
        probes_free=_i(raw[8]),
        calls=_i(raw[9]),
        failures=_i(raw[10]),
        slow=_i(raw[11]),
        consecutive_failures=_i(raw[12]),
        note=_s(raw[13]),
        extra=tuple(_s(x) if isinstance(x, bytes) else x for x in raw[14:]),
    )


@dataclass(frozen=True)
class Push:
    """A transition message from the pub/sub channel."""

    event: str  # t transition, p probe freed, f override changed, r reset
    from_state: CircuitState
    to_state: CircuitState
    generation: int
    open_until_ms: int
    now_ms: int
    forced: str
    name: str
    origin: str = ""


def decode_push(data: Any) -> Push | None:
    """Parse a channel message; None for anything that is not a v1 message. The origin (the
    breaker object whose script published it) is absent in messages of operator tools."""
    try:
        parts = _s(data).split(" ")
        if len(parts) == 9:
            parts.insert(8, "")
        if len(parts) != 10 or parts[0] != "v1":
            return None
        _, event, frm, to, gen, until, now, forced, origin, name = parts
        return Push(
            event,
            CircuitState(frm),
            CircuitState(to),
            int(gen),
            int(until),
            int(now),
            "" if forced == "-" else forced,
            name,
            origin,
        )
    except ValueError:
        return None
