"""Where server-side state lives. One interface (`Storage`), one implementation per backend.

`BFF_STORAGE_URL` picks the backend: `memory://` (one process) or `redis://` / `rediss://` (shared by
every replica). The rate limiter keeps its counters in the same place, through `open_limits_storage`.
"""

from __future__ import annotations

from limits.aio.storage import Storage as LimitsStorage
from limits.storage import storage_from_string

from proxy.settings import MEMORY_SCHEMES, REDIS_SCHEMES, storage_scheme
from proxy.storage.base import PendingEvent, Ranking, SessionRecord, Storage, StorageUnavailable
from proxy.storage.limits_memory import MovingWindowMemory
from proxy.storage.memory import MemoryStorage
from proxy.storage.redis import RedisStorage, connection_pool, reachable
from proxy.storage.runlog import MemoryRunLogs, RunLogs
from proxy.storage.runlog_redis import RedisRunLogs

LIMITS_KEY_PREFIX = "bff-limits"


def open_storage(url: str) -> Storage:
    if storage_scheme(url) in REDIS_SCHEMES:
        return RedisStorage(url)
    return MemoryStorage()


def open_run_logs(url: str, *, alive_seconds: float) -> RunLogs:
    """Where runs keep their chunk logs: with Redis, readable (and stoppable) from every replica; a
    replica that stops renewing its runs for `alive_seconds` is taken for dead by their followers."""
    if storage_scheme(url) in REDIS_SCHEMES:
        return RedisRunLogs(url, alive_seconds=alive_seconds)
    return MemoryRunLogs()


def open_limits_storage(url: str) -> LimitsStorage:
    """Async `limits` storage in the same place as ours, for slowapi-syntax limits that never block.

    In memory it is our own (proxy/storage/limits_memory.py: `limits`' own one hands every key to a
    thread after each hit). With Redis it is `limits`' one over redis-py's asyncio client (not
    coredis), with the same fail-fast options as `RedisStorage`; call it inside `reachable()`, which
    turns its errors (`limits.errors.StorageError`) into `StorageUnavailable`.
    """
    if storage_scheme(url) not in REDIS_SCHEMES:
        return MovingWindowMemory()
    storage = storage_from_string(
        "async+" + url,
        implementation="redispy",
        wrap_exceptions=True,
        key_prefix=LIMITS_KEY_PREFIX,
        connection_pool=connection_pool(url),  # type: ignore[arg-type]
    )
    assert isinstance(storage, LimitsStorage)
    return storage


__all__ = [
    "MEMORY_SCHEMES",
    "REDIS_SCHEMES",
    "MemoryStorage",
    "PendingEvent",
    "Ranking",
    "RedisStorage",
    "SessionRecord",
    "Storage",
    "StorageUnavailable",
    "open_limits_storage",
    "open_run_logs",
    "open_storage",
    "reachable",
    "storage_scheme",
]
