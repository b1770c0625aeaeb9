"""What a rate limit is: slowapi's limit syntax ("30/minute", "30/minute,500/day"), as `BFF_RATE_LIMITS`
(CONTRACT B8) and a workflow's own `rate_limit` write it, parsed into `limits` items.

A leaf: settings validates with it and the rate limiter (proxy/rate_limiter.py) counts with what it
parses, so it imports nothing of the proxy.
"""

from __future__ import annotations

from limits import RateLimitItem, parse_many

LIMIT_NAMES = frozenset({"mint", "relay", "login"})
DEFAULT_RATE_LIMITS = "mint=30/minute;relay=20/minute;login=10/minute"


class RateLimitConfigError(ValueError):
    pass


def parse_rate_limits(value: str) -> dict[str, list[RateLimitItem]]:
    """`"mint=30/minute;relay=20/minute,500/day;login=10/minute"` → limits by name. A name left out
    keeps its default: setting only `relay` must not switch the sign-in limit off."""
    return {**_parse_rate_limits(DEFAULT_RATE_LIMITS), **_parse_rate_limits(value)}


def _parse_rate_limits(value: str) -> dict[str, list[RateLimitItem]]:
    parsed: dict[str, list[RateLimitItem]] = {}
    for entry in (part.strip() for part in value.split(";")):
        if not entry:
            continue
        name, sep, spec = entry.partition("=")
        name = name.strip()
        example = "as in mint=30/minute;relay=20/minute,500/day"
        if not sep:
            raise RateLimitConfigError(f"{entry!r} names no limit: write name=limits, {example}")
        if name not in LIMIT_NAMES:
            names = ", ".join(sorted(LIMIT_NAMES))
            raise RateLimitConfigError(f"{name!r} is not a limit name (use {names}), {example}")
        if "=" in spec:  # "mint=30/minute,relay=20/minute"
            raise RateLimitConfigError(f"{entry!r}: separate the limits of different names with ';', {example}")
        parsed[name] = parse_limit(spec)
    return parsed


def parse_limit(spec: str) -> list[RateLimitItem]:
    try:
        items = parse_many(spec)
    except ValueError:
        raise RateLimitConfigError(f"{spec!r} is not a limit like 30/minute or 30/minute,500/day") from None
    if not items:
        raise RateLimitConfigError(f"{spec!r} names no limit")
    return items
