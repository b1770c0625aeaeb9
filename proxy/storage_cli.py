"""What the operator commands that read the shared storage have in common (`sessions`, `usage`): they
need Redis, because with `memory://` the state lives inside the running server, out of their reach;
and a problem is one line on stderr with exit status 2, never a traceback (nor a setting's value:
pydantic's own message would quote a secret that failed its check).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import redis.exceptions
from pydantic import ValidationError

from proxy.settings import Settings, describe_errors
from proxy.storage import REDIS_SCHEMES, Storage, StorageUnavailable, open_storage, storage_scheme


class CommandError(Exception):
    pass


def run_command(command: Callable[[Settings], Coroutine[Any, Any, str]]) -> None:
    """Run `command` with the settings; print what it answers, or what went wrong (exit status 2)."""
    try:
        try:
            settings = Settings()
        except ValidationError as exc:
            raise CommandError("; ".join(describe_errors(exc))) from None
        print(asyncio.run(command(settings)))
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@asynccontextmanager
async def shared_storage(settings: Settings, *, out_of_reach: str) -> AsyncIterator[Storage]:
    """The Redis storage the replicas share; with `memory://`, a CommandError that says what lives
    inside the running server (`out_of_reach`) and what to do instead."""
    if storage_scheme(settings.storage_url) not in REDIS_SCHEMES:
        raise CommandError(f"BFF_STORAGE_URL is memory://: {out_of_reach}")
    try:
        storage = open_storage(settings.storage_url)
    except ValueError:  # redis-py's words may quote the URL, password and all
        raise CommandError("BFF_STORAGE_URL: not a Redis URL this client can open (redis://host:port/db)") from None
    try:
        yield storage
    except StorageUnavailable as exc:
        raise CommandError(f"BFF_STORAGE_URL: {exc.message}") from None
    except redis.exceptions.RedisError as exc:  # an option of the URL it refused on first use, say
        raise CommandError(f"BFF_STORAGE_URL: Redis could not be used ({type(exc).__name__})") from None
    finally:
        await storage.close()
