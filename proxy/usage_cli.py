"""`python -m proxy usage [--json] [--day YYYY-MM-DD] [--top N]`: the operator's view of who used the
most output on a UTC day, as every replica charged it (CONTRACT C3).

The figures are the output budget's own count (proxy/budget.py), kept for every user, with a budget or
without, in a ranking per day in the shared storage for two days. Users are named as the budget counts
them: the user id, or `ip:<address>` for guests who share their address's limits (BFF_GUEST_LIMITS=ip).
With `memory://` storage the figures live inside the running server, out of this command's reach.
Per-user figures are never Prometheus labels (one series per user would swamp it).
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from typing import Any

from proxy.budget import ranking_name, today
from proxy.settings import Settings
from proxy.storage_cli import run_command, shared_storage

DEFAULT_TOP = 10
MAX_TOP = 10_000


def add_usage_command(commands: Any) -> None:
    help_text = "the users with the most output on a UTC day, across replicas (needs Redis storage)"
    usage = commands.add_parser("usage", help=help_text, description=help_text)
    usage.add_argument("--json", action="store_true", help="print JSON, for scripts")
    usage.add_argument("--day", type=_day, default=None, help="the UTC day, YYYY-MM-DD (default: today)")
    usage.add_argument("--top", type=_top, default=DEFAULT_TOP, help=f"how many users (default: {DEFAULT_TOP})")
    usage.set_defaults(handler=run_usage_command)


def _day(value: str) -> str:
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a day: write YYYY-MM-DD") from None


def _top(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_TOP:
        raise argparse.ArgumentTypeError(f"{value!r}: give a whole number from 1 to {MAX_TOP}")
    return int(value)


def run_usage_command(args: argparse.Namespace) -> None:
    run_command(lambda settings: usage_command(args.day or today(), args.top, settings, as_json=args.json))


async def usage_command(day: str, top: int, settings: Settings, *, as_json: bool) -> str:
    out_of_reach = (
        "the usage figures live inside the running server, out of reach here. "
        "Use Redis storage; each user can still see their own at GET /api/usage."
    )
    async with shared_storage(settings, out_of_reach=out_of_reach) as storage:
        ranked = await storage.top_ranked(ranking_name(day), top)
    if as_json:
        users = [{"user": user, "output_chars": chars} for user, chars in ranked]
        return json.dumps({"day": day, "users": users})
    if not ranked:
        return f"no output counted on {day} (UTC)"
    lines = [f"top {len(ranked)} by output on {day} (UTC)", f"{'rank':>4}  {'characters':>12}  user"]
    lines += [f"{rank:>4}  {chars:>12,}  {user}" for rank, (user, chars) in enumerate(ranked, 1)]
    return "\n".join(lines)
