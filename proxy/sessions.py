"""Browser sessions: a signed cookie holding an opaque session id, and a server-side record.

The cookie proves nothing by itself: it is only a pointer, signed so that ids cannot be guessed or
forged. The record (user, created, last seen, absolute expiry) decides, so logout, idle and absolute
timeouts are enforced here on the server and a copied cookie stops working the moment it is revoked.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import HTTPConnection
from starlette.responses import Response

from proxy.errors import unauthenticated
from proxy.storage import SessionRecord, Storage

# A separate salt per purpose: a value signed for one use can never be replayed as another.
COOKIE_SALT = "workflow-bff.session-cookie"
# Writing last_seen on every request would cost a storage write per request; a coarse grain is enough
# for an idle timeout measured in minutes.
TOUCH_GRAIN_SECONDS = 15.0


@dataclass(frozen=True)
class User:
    id: str
    kind: str


@dataclass(frozen=True)
class Session:
    record: SessionRecord
    idle_seconds: int

    @property
    def user(self) -> User:
        return User(self.record.user_id, self.record.kind)

    @property
    def key(self) -> str:
        return self.record.key

    @property
    def expires_at(self) -> float:
        """When the session ends if it is not used again."""
        return min(self.record.expires_at, self.record.last_seen + self.idle_seconds)


def session_key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class SessionManager:
    def __init__(
        self,
        storage: Storage,
        secrets_newest_first: list[str],
        *,
        idle_seconds: int,
        max_seconds: int,
        cookie_secure: bool,
        samesite: str = "strict",
    ) -> None:
        self._storage = storage
        # itsdangerous signs with the last key and verifies with all of them.
        self._serializer = URLSafeTimedSerializer(list(reversed(secrets_newest_first)), salt=COOKIE_SALT)
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self.cookie_secure = cookie_secure
        self.samesite = samesite
        # The __Host- prefix makes browsers refuse the cookie unless it is Secure, Path=/ and has no
        # Domain; plain-http development cannot meet that, so it gets the plain name.
        self.cookie_name = "__Host-bff_session" if cookie_secure else "bff_session"

    async def start(self, user: User) -> tuple[Session, str]:
        """A new session with a new id, every time: a cookie planted before sign-in never survives it.

        Returns the session and the signed cookie value to hand to `set_cookie`.
        """
        now = time.time()
        session_id = secrets.token_urlsafe(32)
        record = SessionRecord(
            key=session_key(session_id),
            user_id=user.id,
            kind=user.kind,
            created_at=now,
            last_seen=now,
            expires_at=now + self.max_seconds,
        )
        await self._storage.save_session(record)
        return Session(record, self.idle_seconds), self._serializer.dumps(session_id)

    def set_cookie(self, response: Response, value: str) -> None:
        response.set_cookie(
            self.cookie_name,
            value,
            max_age=self.max_seconds,
            path="/",
            secure=self.cookie_secure,
            httponly=True,
            samesite=self.samesite,  # type: ignore[arg-type]
        )

    async def current(self, connection: HTTPConnection, *, touch: bool = True) -> Session | None:
        """The valid session this request carries, or None. `touch=False` leaves the idle timer alone."""
        session_id = self._session_id(connection)
        if session_id is None:
            return None
        record = await self._storage.get_session(session_key(session_id))
        if record is None:
            return None
        now = time.time()
        if now >= record.expires_at or now >= record.last_seen + self.idle_seconds:
            await self._storage.delete_session(record.key)
            return None
        if touch and now - record.last_seen >= min(TOUCH_GRAIN_SECONDS, self.idle_seconds / 4):
            record = SessionRecord(**{**record.__dict__, "last_seen": now})
            await self._storage.save_session(record)
        return Session(record, self.idle_seconds)

    async def require(self, connection: HTTPConnection) -> Session:
        session = await self.current(connection)
        if session is None:
            raise unauthenticated()
        return session

    async def end(self, connection: HTTPConnection) -> Session | None:
        session = await self.current(connection, touch=False)
        if session is not None:
            await self._storage.delete_session(session.key)
        return session

    async def end_all(self, user: User) -> list[str]:
        return await self._storage.delete_user_sessions(user.id)

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(
            self.cookie_name,
            path="/",
            secure=self.cookie_secure,
            httponly=True,
            samesite=self.samesite,  # type: ignore[arg-type]
        )

    def _session_id(self, connection: HTTPConnection) -> str | None:
        value = connection.cookies.get(self.cookie_name)
        if not value or len(value) > 1024:
            return None
        try:
            session_id = self._serializer.loads(value, max_age=self.max_seconds)
        except BadSignature:  # includes SignatureExpired
            return None
        return session_id if isinstance(session_id, str) else None
