"""The `distbreaker` command line (also `python -m distbreaker`).

Exit status: 0 on success, 1 when a named breaker does not exist, 2 for usage or
connection errors; errors are one line on stderr that says what to fix.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

from ._keys import DEFAULT_PREFIX, channel_for, validate_name, validate_prefix

__all__ = ["main"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"


class _Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Exit(2, f"{self.prog}: {message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--redis-url", default=None,
                        help=f"Redis URL (default: $DISTBREAKER_REDIS_URL, else {DEFAULT_URL})")
    common.add_argument("--sentinel", default=os.environ.get("DISTBREAKER_SENTINEL"),
                        metavar="HOST:PORT[,HOST:PORT...]",
                        help="reach the primary through these Redis Sentinels "
                        "(with --service; --redis-url then gives only credentials and db)")
    common.add_argument("--service", default=os.environ.get("DISTBREAKER_SENTINEL_SERVICE",
                                                            "mymaster"),
                        help="the Sentinel service name (default mymaster)")
    common.add_argument("--prefix", default=DEFAULT_PREFIX,
                        help=f"key prefix of the breakers (default {DEFAULT_PREFIX})")
    ap = _Parser(prog="distbreaker",
                 description="Circuit breakers shared by a whole fleet through Redis.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND",
                            parser_class=_Parser)

    def cmd(name: str, help: str, json_flag: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON")
        return p

    cmd("list", "every breaker in Redis: state, override, failure rate, calls in window, "
        "time until a probe, last change", json_flag=True)
    p = cmd("inspect", "every field of one breaker, decoded and explained", json_flag=True)
    p.add_argument("name")
    for name, what in (("open", "hold a breaker open for the whole fleet (override)"),
                       ("close", "hold a breaker closed for the whole fleet (override)"),
                       ("release", "clear the override; the breaker resumes its own state")):
        p = cmd(name, what, json_flag=True)
        p.add_argument("name")
        p.add_argument("--create", action="store_true",
                       help="act even if Redis has no state for the breaker yet")
    p = cmd("reset", "back to CLOSED, counters and override cleared", json_flag=True)
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true", help="reset every breaker under the prefix")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = cmd("watch", "a live view that refreshes in place and streams transitions",
            json_flag=True)
    p.add_argument("--interval", type=float, default=1.0, help="refresh period (s)")
    p.add_argument("--count", type=int, default=0,
                   help="stop after this many refreshes (0: until Ctrl-C)")
    p = cmd("serve-metrics", "expose every breaker in Redis for Prometheus to scrape")
    p.add_argument("--port", type=int, default=9464)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--once", action="store_true", help="print one scrape to stdout and exit")

    demo = sub.add_parser(
        "demo",
        help="run a small voice fleet through a vendor outage (no Redis setup needed)",
        description="Spawns worker processes that serve simulated voice requests through "
        "shared breakers while one provider has a scripted outage; shows a live table and a "
        "summary. Uses --redis-url / DISTBREAKER_REDIS_URL, else a private redis-server, "
        "else an embedded Redis-protocol server.",
    )
    demo.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    demo.add_argument("--duration", type=float, default=25.0,
                      help="seconds to run (default 25)")
    demo.add_argument("--redis-url", default=os.environ.get("DISTBREAKER_REDIS_URL"),
                      help="use this Redis instead of starting one")
    demo.add_argument("--json", action="store_true", help="print only the summary, as JSON")
    demo.add_argument("--seed", type=int, default=None, help="seed for simulated latencies")
    return ap


def _client(args: argparse.Namespace) -> Any:
    import redis

    from ._admin import connect

    url = args.redis_url or os.environ.get("DISTBREAKER_REDIS_URL") or DEFAULT_URL
    try:
        validate_prefix(args.prefix)
        if args.sentinel:
            return _sentinel_client(args.sentinel, args.service, args.redis_url)
        return connect(url)
    except ValueError as e:
        raise _Exit(2, f"distbreaker: {e}") from None
    except redis.RedisError as e:
        raise _Exit(2, f"distbreaker: cannot reach Redis at {url}: {e} "
                       "(check --redis-url or DISTBREAKER_REDIS_URL)") from None


def _sentinel_client(spec: str, service: str, url: str | None) -> Any:
    from urllib.parse import urlsplit

    from redis.sentinel import Sentinel

    addrs = []
    for part in spec.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--sentinel wants HOST:PORT[,HOST:PORT...], got {spec!r}")
        addrs.append((host, int(port)))
    kw: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 3}
    if url:
        u = urlsplit(url)
        if u.password:
            kw["password"] = u.password
        if u.username:
            kw["username"] = u.username
        if u.path.strip("/").isdigit():
            kw["db"] = int(u.path.strip("/"))
    client = Sentinel(addrs, socket_timeout=3).master_for(service, **kw)  # type: ignore[no-untyped-call, unused-ignore]
    client.ping()
    return client


def _name(name: str) -> str:
    try:
        return validate_name(name)
    except ValueError as e:
        raise _Exit(2, f"distbreaker: {e}") from None


def _fmt_retry(v: Any) -> str:
    r = v.retry_after_s
    if r is None:
        return "forced"
    return "-" if v.effective_state != "open" else f"{r:.1f}s"


def _table(views: list[Any]) -> list[str]:
    rows = [f"{'NAME':28} {'STATE':10} {'OVERRIDE':9} {'FAIL%':>6} {'CALLS':>7} "
            f"{'PROBE IN':>9} {'CHANGED':>9}"]
    for v in views:
        w = v.window
        ago = (v.now_ms - int(v.fields.get("updated_at_ms", v.now_ms) or v.now_ms)) / 1000
        rows.append(f"{v.name[:28]:28} {v.effective_state:10} {v.forced or '-':9} "
                    f"{100 * v.failure_rate:6.1f} {w['calls']:>7} {_fmt_retry(v):>9} "
                    f"{ago:8.1f}s")
    return rows


def _cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    from ._admin import as_dicts, list_breakers

    views = list_breakers(_client(args), args.prefix)
    if args.json:
        out.write(json.dumps(as_dicts(views)) + "\n")
    else:
        out.write("\n".join(_table(views)) + "\n")
    return 0


def _cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    from ._admin import read_breaker

    name = _name(args.name)
    v = read_breaker(_client(args), args.prefix, name)
    if v is None:
        raise _Exit(1, f"distbreaker: no breaker {name!r} under prefix {args.prefix!r} "
                       "(see `distbreaker list`)")
    d = v.to_dict()
    if args.json:
        out.write(json.dumps(d) + "\n")
        return 0
    out.write(f"{v.key}  (ttl {v.ttl_ms / 1000:.0f}s)\n")
    for k, val, why in v.explained():
        out.write(f"  {k:26} {val!s:16} {why}\n")
    w = d["window"]
    out.write(f"window: {json.dumps(w)}\n")
    out.write(f"probe leases: {d['probes'] or 'none'}\n")
    drift = " (DRIFT: another config wrote it recently)" if d["config_drift"] else ""
    out.write(f"effective state: {d['state']}; probe in: {_fmt_retry(v)}; config "
              f"{d['config_fingerprint'] or '-'}{drift}\n")
    return 0


def _cmd_force(args: argparse.Namespace, out: TextIO) -> int:
    from ._admin import operate, read_breaker

    name = _name(args.name)
    client = _client(args)
    if not args.create and read_breaker(client, args.prefix, name) is None:
        raise _Exit(1, f"distbreaker: no breaker {name!r} under prefix {args.prefix!r} "
                       "(pass --create to set the override anyway)")
    mode = {"open": "open", "close": "closed", "release": ""}[args.command]
    r = operate(client, args.prefix, name, "force", mode)
    res = {"name": name, "override": mode or None, "state": r.effective.value,
           "changed": bool(r.decision), "generation": r.generation}
    out.write((json.dumps(res) if args.json else
               f"{name}: {'override ' + mode if mode else 'override released'}; "
               f"now {r.effective.value}" + ("" if r.decision else " (unchanged)")) + "\n")
    return 0


def _cmd_reset(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    from ._admin import breaker_names, operate, read_breaker

    if bool(args.name) == bool(args.all):
        raise _Exit(2, "distbreaker reset: give a breaker NAME or --all")
    client = _client(args)
    if args.all:
        names = sorted(breaker_names(client, args.prefix))
    else:
        names = [_name(args.name)]
        if read_breaker(client, args.prefix, names[0]) is None:
            raise _Exit(1, f"distbreaker: no breaker {names[0]!r} under prefix "
                           f"{args.prefix!r}")
    if not args.yes:
        what = f"all {len(names)} breakers" if args.all else repr(names[0])
        out.write(f"Reset {what} under {args.prefix!r} for the whole fleet? [y/N] ")
        out.flush()
        answer = stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            out.write("not reset\n")
            return 1
    for n in names:
        operate(client, args.prefix, n, "reset")
    out.write((json.dumps({"reset": names}) if args.json else
               f"reset {len(names)} breaker(s): {', '.join(names)}") + "\n")
    return 0


def _cmd_watch(args: argparse.Namespace, out: TextIO) -> int:
    from ._admin import as_dicts, list_breakers
    from ._protocol import decode_push

    client = _client(args)
    ps = client.pubsub(ignore_subscribe_messages=True)
    ps.subscribe(channel_for(args.prefix))
    events: list[str] = []
    tty = out.isatty() and not args.json
    n = 0
    try:
        while True:
            deadline = time.monotonic() + max(args.interval, 0.05)
            while time.monotonic() < deadline:
                msg = ps.get_message(timeout=max(deadline - time.monotonic(), 0.0))
                if msg is None or msg.get("type") != "message":
                    continue
                p = decode_push(msg["data"])
                if p is None:
                    continue
                if args.json:
                    out.write(json.dumps({"event": p.event, "name": p.name,
                                          "from": p.from_state.value, "to": p.to_state.value,
                                          "generation": p.generation,
                                          "override": p.forced or None,
                                          "server_time_ms": p.now_ms}) + "\n")
                    out.flush()
                else:
                    events.append(f"{time.strftime('%H:%M:%S')} {p.name}: "
                                  f"{p.from_state.value} -> {p.to_state.value} "
                                  f"(gen {p.generation}{', ' + p.forced if p.forced else ''})")
                    events[:] = events[-10:]
            views = list_breakers(client, args.prefix)
            if args.json:
                out.write(json.dumps({"breakers": as_dicts(views)}) + "\n")
            else:
                lines = [f"distbreaker watch  {time.strftime('%H:%M:%S')}  prefix "
                         f"{args.prefix}", *_table(views), "", "recent transitions:",
                         *(events or ["  (none yet)"])]
                if tty:
                    out.write("\x1b[H\x1b[2J")
                out.write("\n".join(lines) + "\n")
            out.flush()
            n += 1
            if args.count and n >= args.count:
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        ps.close()


def _cmd_serve_metrics(args: argparse.Namespace, out: TextIO) -> int:
    try:
        from .prometheus import FleetCollector, serve
    except ImportError:
        raise _Exit(2, "distbreaker serve-metrics needs prometheus-client: "
                       "pip install 'distbreaker[prometheus]'") from None
    client = _client(args)
    collector = FleetCollector(client, args.prefix)
    if args.once:
        from prometheus_client import CollectorRegistry, generate_latest

        reg = CollectorRegistry()
        reg.register(collector)
        out.write(generate_latest(reg).decode())
        return 0
    sys.stderr.write(f"serving metrics of {args.prefix!r} breakers on "
                     f"http://{args.host}:{args.port}/metrics\n")
    serve(collector, args.port, args.host)
    return 0


def _run(argv: Sequence[str] | None, out: TextIO, stdin: TextIO) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        try:
            run_demo(args.workers, args.duration, args.redis_url, args.json, args.seed)
        except KeyboardInterrupt:
            print("\ninterrupted; stopped the workers and whatever the demo started",
                  file=sys.stderr)
            return 130
        except (ValueError, RuntimeError) as e:
            raise _Exit(2, f"distbreaker demo: {e}") from None
        return 0
    if args.command == "list":
        return _cmd_list(args, out)
    if args.command == "inspect":
        return _cmd_inspect(args, out)
    if args.command in ("open", "close", "release"):
        return _cmd_force(args, out)
    if args.command == "reset":
        return _cmd_reset(args, out, stdin)
    if args.command == "watch":
        return _cmd_watch(args, out)
    if args.command == "serve-metrics":
        return _cmd_serve_metrics(args, out)
    raise _Exit(2, f"distbreaker: unknown command {args.command!r}")  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    import redis

    try:
        return _run(argv, sys.stdout, sys.stdin)
    except _Exit as e:
        print(str(e), file=sys.stderr)
        return e.code
    except redis.RedisError as e:
        print(f"distbreaker: Redis error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
