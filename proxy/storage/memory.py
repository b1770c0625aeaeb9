"""Storage in this process's memory: one process only, lost on restart."""

from __future__ import annotations

import time
from collections import defaultdict

from proxy.storage.base import SessionRecord

PURGE_EVERY = 256


class MemoryStorage:
    def __init__(self) -> None:
        self._sessions: dict[str, SessionRecord] = {}
        self._by_user: defaultdict[str, set[str]] = defaultdict(set)
        self._writes = 0

    async def get_session(self, key: str) -> SessionRecord | None:
        record = self._sessions.get(key)
        if record is not None and record.expires_at <= time.time():
            self._forget(key)
            return None
        return record

    async def save_session(self, record: SessionRecord) -> None:
        self._sessions[record.key] = record
        self._by_user[record.user_id].add(record.key)
        self._writes += 1
        if self._writes % PURGE_EVERY == 0:
            self._purge_expired()

    async def delete_session(self, key: str) -> None:
        self._forget(key)

    async def delete_user_sessions(self, user_id: str) -> list[str]:
        keys = sorted(self._by_user.pop(user_id, set()))
        for key in keys:
            self._sessions.pop(key, None)
        return keys

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _forget(self, key: str) -> None:
        record = self._sessions.pop(key, None)
        if record is not None:
            keys = self._by_user.get(record.user_id)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_user[record.user_id]

    def _purge_expired(self) -> None:
        now = time.time()
        for key in [k for k, r in self._sessions.items() if r.expires_at <= now]:
            self._forget(key)
