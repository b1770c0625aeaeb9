"""The storage interface shared by every backend (memory now, Redis for many replicas)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SessionRecord:
    """A signed-in browser session. `key` is a hash of the session id: the raw id is only in the cookie."""

    key: str
    user_id: str
    kind: str
    created_at: float
    last_seen: float
    expires_at: float  # the absolute end, however active the session is


class Storage(Protocol):
    async def get_session(self, key: str) -> SessionRecord | None: ...

    async def save_session(self, record: SessionRecord) -> None:
        """Create or replace; a backend may forget the record after `expires_at`."""

    async def delete_session(self, key: str) -> None: ...

    async def delete_user_sessions(self, user_id: str) -> list[str]:
        """End every session of a user; returns the keys that were removed."""

    async def ping(self) -> None:
        """Raise if the backend cannot be reached."""

    async def close(self) -> None: ...
