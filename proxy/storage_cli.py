"""What the operator commands that read the shared storage have in common (`sessions`, `usage`): they
need Redis, because with `memory://` the state lives inside the running server, out of their reach;
and a problem is one line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from proxy.settings import Settings
from proxy.storage import REDIS_SCHEMES, Storage, StorageUnavailable, open_storage, storage_scheme


class CommandError(Exception):
    pass


def run_command(command: Coroutine[Any, Any, str]) -> None:
    """Print what the command answers, or its error (exit status 2)."""
    try:
        print(asyncio.run(command))
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@asynccontextmanager
async def shared_storage(settings: Settings, *, out_of_reach: str) -> AsyncIterator[Storage]:
    """The Redis storage the replicas share; with `memory://`, a CommandError that says what lives
    inside the running server (`out_of_reach`) and what to do instead."""
    if storage_scheme(settings.storage_url) not in REDIS_SCHEMES:
        raise CommandError(f"BFF_STORAGE_URL is memory://: {out_of_reach}")
    storage = open_storage(settings.storage_url)
    try:
        yield storage
    except StorageUnavailable as exc:
        raise CommandError(f"BFF_STORAGE_URL: {exc.message}") from None
    finally:
        await storage.close()
