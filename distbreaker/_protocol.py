"""Sans-I/O script calls: argument building and reply decoding, shared by every shell.

Nothing here touches the network. A store runs ``(op, keys, args)`` and hands the raw
reply back to `decode_reply`; the memory store runs the same arguments through the pure
model, so all stores speak exactly the script protocol described in ``lua/_lib.lua``.
"""

from __future__ import annotations

import enum
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._config import CircuitBreakerConfig, CircuitState
from ._keys import BreakerKeys

__all__ = [
    "FAILED",
    "NONE",
    "OK",
    "SLOW_FAILED",
    "SLOW_OK",
    "Calls",
    "Code",
    "Push",
    "Reply",
    "ScriptCall",
    "ShortReply",
    "SnapshotExtras",
    "decode_push",
    "decode_reply",
    "decode_short",
    "effective_state",
    "is_failure",
    "is_slow",
    "outcomes_sent",
    "record_outcomes",
    "truncate",
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
        return (SLOW_OK if slow else OK) + (FAILED if failed else OK)


#: The codes as plain ints, for the paths that run once per outcome.
OK, FAILED, SLOW_OK, SLOW_FAILED, NONE = 0, 1, 2, 3, 4


def is_failure(code: int) -> bool:
    """FAILED or SLOW_FAILED (bit 0; NONE has neither bit)."""
    return bool(code & FAILED)


def is_slow(code: int) -> bool:
    """SLOW_OK or SLOW_FAILED (bit 1)."""
    return bool(code & SLOW_OK)


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


class Calls:
    """Builds one breaker's script calls: ARGV[1..4] once (config, fingerprint, channel,
    '<origin> <name>'), then the random and the clock per call.

    `origin` tells this object's own pushes from every other process's; a forked child
    takes a new one (`renew`). `clock_ms`, when set, replaces Redis TIME in the scripts
    (see `CircuitBreaker.set_test_clock`)."""

    __slots__ = ("_base", "_config", "channel", "clock_ms", "keys", "origin")

    def __init__(self, keys: BreakerKeys, config: CircuitBreakerConfig, channel: str) -> None:
        self.keys = keys
        self._config = config
        self.channel = channel
        self.clock_ms: int | None = None
        self.origin = ""
        self._base: list[str | int | float] = []
        self.renew()

    def renew(self) -> None:
        self.origin = secrets.token_hex(4)
        self._base = argv_prefix(self._config.script_arg, self._config.fingerprint,
                                 self.channel, f"{self.origin} {self.keys.name}")

    def build(self, op: str, *extra: str | int | float) -> ScriptCall:
        args = self._base.copy()
        args.append(random.random())
        args.append("" if self.clock_ms is None else self.clock_ms)
        args.extend(extra)
        return ScriptCall(op, self.keys.all, args)

    def acquire(self) -> ScriptCall:
        return self.build("acquire", secrets.token_hex(8))

    def record(self, generation: int, code: int, lease: str, retry_after_ms: int
               ) -> ScriptCall:
        """One outcome (or a bare lease return); built inline: it runs once per call."""
        args = self._base.copy()
        args += (random.random(), "" if self.clock_ms is None else self.clock_ms, "",
                 generation, code, lease, retry_after_ms)
        return ScriptCall("record", self.keys.all, args)

    def give_back(self, generation: int, lease: str) -> ScriptCall:
        """Return an unused probe lease; records nothing."""
        return self.record(generation, NONE, lease, 0)


def outcomes_sent(args: Sequence[Any]) -> int:
    """How many outcomes (not bare lease returns) a record call of single outcomes
    carries: its groups of four start at ARGV[8], the code second in each."""
    return sum(1 for i in range(8, len(args), 4) if args[i] != NONE)


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

    @property
    def counts(self) -> tuple[int, int, int, int]:
        """(calls, failures, slow, consecutive failures) of the window."""
        return (self.calls, self.failures, self.slow, self.consecutive_failures)

    @property
    def snapshot(self) -> SnapshotExtras | None:
        """The extra fields of a snapshot.lua reply (None for any other reply)."""
        x = self.extra
        if len(x) < 6:
            return None
        return SnapshotExtras(half_open_successes=_i(x[0]), reopen_count=_i(x[1]),
                              opened_at_ms=_i(x[2]), updated_at_ms=_i(x[3]),
                              config_fingerprint=_s(x[4]), active_probes=_i(x[5]))


@dataclass(frozen=True)
class SnapshotExtras:
    """Fields 15-20 of a snapshot.lua reply."""

    half_open_successes: int
    reopen_count: int
    opened_at_ms: int
    updated_at_ms: int
    config_fingerprint: str
    active_probes: int


class ShortReply(NamedTuple):
    """record.lua's reply while the breaker stays plainly CLOSED: how many of the call's
    outcomes were counted, the generation and Redis time, and (when the call carried a
    batch) the window's counts."""

    counted: int
    generation: int
    now_ms: int
    counts: tuple[int, int, int, int] | None


def decode_short(raw: Sequence[Any]) -> ShortReply | None:
    """A short record reply (3 or 7 fields), or None when `raw` is a full reply."""
    # tuple.__new__: a NamedTuple's own constructor costs 0.2 us more, on every strict
    # outcome's reply
    n = len(raw)
    if n == 3:
        return _new(ShortReply, (int(raw[0]), int(raw[1]), int(raw[2]), None))
    if n == 7:
        return _new(ShortReply, (int(raw[0]), int(raw[1]), int(raw[2]),
                                 (int(raw[3]), int(raw[4]), int(raw[5]), int(raw[6]))))
    return None


_new = tuple.__new__


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


class Push(NamedTuple):
    """A transition message from the pub/sub channel (a tuple: built for every message of a
    storm, where a frozen dataclass's constructor costs 2 us more)."""

    event: str  # t transition, p probe freed, f override changed, r reset
    from_state: CircuitState
    to_state: CircuitState
    generation: int
    open_until_ms: int
    now_ms: int
    forced: str
    name: str
    origin: str = ""
    seq: int | None = None  # its number in the prefix's sequence, if it has one


def decode_push(data: Any) -> Push | None:
    """Parse a channel message; None for anything that is not a v1 message. The origin (the
    breaker object whose script published it) is '-' in messages of operator tools; the
    sequence number is '-' when the script had no sequence key (a Cluster client). The
    shorter forms of earlier releases (no sequence, origin left out) are read too. On the
    listener's path for every message of a storm: states by dict, not by enum call."""
    try:
        parts = _s(data).split(" ")
        if len(parts) != 11:
            if len(parts) == 9:
                parts.insert(8, "")
            if len(parts) == 10:
                parts.insert(8, "-")
            if len(parts) != 11:
                return None
        version, event, frm, to, gen, until, now, forced, seq, origin, name = parts
        if version != "v1":
            return None
        return Push(
            event,
            _STATES[frm],
            _STATES[to],
            int(gen),
            int(until),
            int(now),
            "" if forced == "-" else forced,
            name,
            "" if origin == "-" else origin,
            None if seq == "-" else int(seq),
        )
    except (ValueError, KeyError):
        return None


_STATES = {s.value: s for s in CircuitState}


def truncate(v: object, limit: int = 200) -> str:
    """`v` as text for a log line: garbage found in Redis can be megabytes."""
    t = str(v)
    return t if len(t) <= limit else f"{t[:limit]}... ({len(t)} chars)"
