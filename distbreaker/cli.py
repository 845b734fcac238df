"""The `distbreaker` command line (also `python -m distbreaker`)."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="distbreaker",
        description="Circuit breakers shared by a whole fleet through Redis.",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
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


def main(argv: list[str] | None = None) -> int:
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
            print(f"distbreaker demo: {e}", file=sys.stderr)
            return 2
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
