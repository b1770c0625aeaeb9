"""Browser sessions: a signed cookie holding an opaque session id, and a server-side record.

The cookie proves nothing by itself: it is only a pointer, signed so that ids cannot be guessed or
forged. The record (user, created, last seen, absolute expiry) decides, so logout, idle and absolute
timeouts are enforced here on the server and a copied cookie stops working the moment it is revoked.

Signing keys are a list (`BFF_SESSION_SECRETS`, newest first): the newest signs, every one verifies,
so a rotation logs nobody out. Ending a session also ends the relays it is running (proxy/streams.py),
and every lifecycle event is written to the audit log (proxy/audit.py) under a hash, never the id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Protocol

import anyio
from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import HTTPConnection
from starlette.responses import Response

from proxy.audit import AuditLog
from proxy.context import request_context
from proxy.errors import UNAUTHENTICATED, ApiError
from proxy.metrics import Metrics
from proxy.sealing import SealError, TokenSealer
from proxy.storage import SessionRecord, Storage, StorageUnavailable
from proxy.streams import StreamRegistry
from proxy.throttle import client_ip

logger = logging.getLogger("proxy.sessions")

# A separate salt per purpose: a value signed for one use can never be replayed as another.
COOKIE_SALT = "workflow-bff.session-cookie"
# Writing last_seen on every request would cost a storage write per request; a coarse grain is enough
# for an idle timeout measured in minutes.
TOUCH_GRAIN_SECONDS = 15.0
# How often the users file is looked at for passwords that were reset (a stat(), and a read if changed).
USERS_FILE_CHECK_SECONDS = 2.0
MAX_COOKIE_BYTES = 1024
# Sent when a session ends, by logout or by expiry (bff-security R8). "cookies" is the one directive
# that matters to us; clearing the cache as well would slow every logout down in some browsers.
CLEAR_SITE_DATA = '"cookies"'


@dataclasses.dataclass(frozen=True)
class User:
    id: str
    kind: str


class IdpRefresh(Protocol):
    """Keeps an OpenID Connect session's provider tokens fresh (proxy/auth/refresh.py)."""

    # Due `margin` seconds before the IdP's access token expires (a relay's one-round-trip admission
    # checks the same in Redis: proxy/storage/admission_redis.py).
    margin: float

    def due(self, record: SessionRecord, now: float) -> bool: ...

    async def fresh(self, record: SessionRecord) -> SessionRecord | None:
        """The record with fresh tokens, or None when the provider refused (the session ends)."""
        ...


@dataclasses.dataclass(frozen=True)
class IdpSession:
    """What an OpenID Connect sign-in keeps besides the user (proxy/auth/oidc.py)."""

    display_name: str
    sid_hash: str
    sub_hash: str
    tokens: bytes  # the IdP's tokens as JSON; sealed before they are stored
    expires_at: float  # of the IdP's access token


@dataclasses.dataclass(frozen=True)
class Session:
    record: SessionRecord
    idle_seconds: int
    revocations_seen: int = 0  # StreamRegistry.revocations when the session was checked
    # Whom the per-user limits, stream cap and budget count against: the user, or for guests (who
    # anyone can become again with one request) their client IP, unless BFF_GUEST_LIMITS=session.
    limit_key: str = ""

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
    """The storage key: a hash, so a leaked storage dump holds no usable session id."""
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
        metrics: Metrics | None = None,
        guests_share_ip: bool = True,
        idp_refresh: IdpRefresh | None = None,
    ) -> None:
        if not secrets_newest_first:
            raise ValueError("at least one session secret is required")
        self._storage = storage
        # itsdangerous signs with the last key and verifies with all of them.
        self._serializer = URLSafeTimedSerializer(list(reversed(secrets_newest_first)), salt=COOKIE_SALT)
        self.audit = AuditLog(secrets_newest_first[0], metrics=metrics)
        self.sealer = TokenSealer(secrets_newest_first)
        self.streams = StreamRegistry()
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self.cookie_secure = cookie_secure
        self.samesite = samesite
        self.guests_share_ip = guests_share_ip
        self.idp_refresh = idp_refresh
        # The __Host- prefix makes browsers refuse the cookie unless it is Secure, Path=/ and has no
        # Domain; plain-http development cannot meet that, so it gets the plain name.
        self.cookie_name = "__Host-bff_session" if cookie_secure else "bff_session"

    async def sign_in(
        self, connection: HTTPConnection, user: User, idp: IdpSession | None = None
    ) -> tuple[Session, str]:
        """End whatever session the browser had, then start a new one with a new id, every time: a
        cookie planted before sign-in never survives it (no session fixation).

        Returns the session and the signed cookie value to hand to `set_cookie`.
        """
        previous = await self._end(connection, reason="replaced")
        session, cookie = await self.start(user, idp)
        request_context().user_hash = self.audit.user_hash(user.id)
        self.audit.record(
            "session.renewed" if previous is not None else "session.created",
            session.key,
            user_id=user.id,
            connection=connection,
            kind=user.kind,
            **({"previous_sid_hash": self.audit.sid_hash(previous.key)} if previous is not None else {}),
        )
        return session, cookie

    async def start(self, user: User, idp: IdpSession | None = None) -> tuple[Session, str]:
        now = time.time()
        session_id = secrets.token_urlsafe(32)  # 256 bits from the OS CSPRNG
        key = session_key(session_id)
        record = SessionRecord(
            key=key,
            user_id=user.id,
            kind=user.kind,
            created_at=now,
            last_seen=now,
            expires_at=now + self.max_seconds,
        )
        if idp is not None:
            record = dataclasses.replace(
                record,
                display_name=idp.display_name,
                idp_sid_hash=idp.sid_hash,
                idp_sub_hash=idp.sub_hash,
                idp_expires_at=idp.expires_at,
                idp_tokens=self.sealer.seal(idp.tokens, bound_to=key),
            )
        await self._storage.save_session(record)
        return Session(record, self.idle_seconds, self.streams.revocations), self._serializer.dumps(session_id)

    async def current(self, connection: HTTPConnection, *, touch: bool = True) -> Session | None:
        """The valid session this request carries, or None. `touch=False` leaves the idle timer alone."""
        revocations_seen = self.streams.revocations  # before the lookup: a logout during it counts
        session_id = self._session_id(connection)
        if session_id is None:
            return None
        record = await self._storage.get_session(session_key(session_id))
        if record is None:
            return None
        now = time.time()
        expired = self._expiry(record, now)
        if expired is not None:
            await self._revoke(record, reason=expired, connection=connection)
            return None
        if self.idp_refresh is not None and self.idp_refresh.due(record, now):
            refreshed = await self.idp_refresh.fresh(record)
            if refreshed is None:  # the provider no longer vouches for the user (or signed out meanwhile)
                await self._revoke(record, reason="idp_refresh_failed", connection=connection)
                return None
            record = refreshed
        if touch and now - record.last_seen >= self.touch_after:
            # A touch never recreates a session that a logout (perhaps on another replica) just ended.
            if not await self._storage.touch_session(record.key, now):
                return None
            record = dataclasses.replace(record, last_seen=now)
        return self.opened(record, revocations_seen, self._limit_key(record, connection))

    def opened(self, record: SessionRecord, revocations_seen: int, limit_key: str) -> Session:
        """The session of a record found valid (and touched when due), by `current` or by a relay's
        one-round-trip admission (proxy/runs/manager.py)."""
        request_context().user_hash = self.audit.user_hash(record.user_id)  # for the request's summary line
        return Session(record, self.idle_seconds, revocations_seen, limit_key)

    @property
    def touch_after(self) -> float:
        """How long after its last touch a session is touched again."""
        return min(TOUCH_GRAIN_SECONDS, self.idle_seconds / 4)

    def signed_key(self, connection: HTTPConnection) -> str | None:
        """The storage key of the session id the request's cookie carries, if its signature holds; no
        storage is asked, so a forged or stale cookie costs nothing."""
        session_id = self._session_id(connection)
        return None if session_id is None else session_key(session_id)

    def guest_limit_key(self, connection: HTTPConnection) -> str | None:
        """Whom a guest's limits count against when not their user: their client IP's (see Session)."""
        return f"ip:{client_ip(connection)}" if self.guests_share_ip else None

    def _limit_key(self, record: SessionRecord, connection: HTTPConnection) -> str:
        if record.kind == "guest" and self.guests_share_ip:
            return f"ip:{client_ip(connection)}"
        return record.user_id

    async def still_valid(self, session: Session) -> bool:
        """Whether `session`, checked earlier in this request, has not been revoked since. For a relay
        that has registered (from then on a logout stops it): it closes the gap between the check and
        the registration. Storage is asked only if this process handled a logout in between; a logout
        on another replica reaches a running relay at its next slot renewal instead."""
        if self.streams.revocations == session.revocations_seen:
            return True
        return await self._storage.get_session(session.key) is not None

    async def require(self, connection: HTTPConnection, *, touch: bool = True) -> Session:
        session = await self.current(connection, touch=touch)
        if session is None:
            raise self.unauthenticated(connection)
        return session

    def unauthenticated(self, connection: HTTPConnection) -> ApiError:
        """401; when the browser still holds a cookie that no longer opens a session (expired, revoked,
        signed with a retired key), the answer also expires that cookie. Only ours: Clear-Site-Data
        would wipe every cookie of the site, including a fresh session another tab just signed in to."""
        stale_cookie = self.cookie_name in connection.headers.get("cookie", "")
        return UNAUTHENTICATED.error(headers=self.clear_headers(site_data=False) if stale_cookie else None)

    def idp_tokens(self, record: SessionRecord) -> bytes | None:
        """The IdP's tokens of an OpenID Connect session, or None (none kept, or sealed with a key that
        was retired since: the session then has no IdP tokens to use)."""
        if not record.idp_tokens:
            return None
        try:
            return self.sealer.open(record.idp_tokens, bound_to=record.key)
        except SealError:
            logger.warning("idp tokens do not open", extra={"sid_hash": self.audit.sid_hash(record.key)})
            return None

    async def end_key(self, key: str, *, reason: str, connection: HTTPConnection) -> None:
        """End the session stored under `key`, if it is live (an OpenID Connect callback ends the session
        the browser had when it left for the provider: its Strict cookie does not come back with it)."""
        record = await self._storage.get_session(key)
        if record is not None:
            await self._revoke(record, reason=reason, connection=connection)

    async def end(self, connection: HTTPConnection) -> Session | None:
        """Logout: revoke this browser's session and stop its relays."""
        return await self._end(connection, reason="logout")

    async def end_all(self, connection: HTTPConnection, session: Session) -> int:
        """Logout everywhere: revoke every session of the user and stop all their relays."""
        return await self.revoke_user(session.user.id, reason="logout_all", connection=connection)

    async def revoke_user(self, user_id: str, *, reason: str, connection: HTTPConnection | None = None) -> int:
        """End every session of `user_id`, on every replica (the records go; runs elsewhere end at
        their next slot renewal), and stop the user's runs here."""
        keys = await self._storage.delete_user_sessions(user_id)
        stopped = self.streams.stop_user(user_id)
        for key in keys:
            self.audit.record("session.revoked", key, user_id=user_id, connection=connection, reason=reason)
        return stopped + len(keys)

    async def revoke_indexed(self, index: str, *, reason: str, connection: HTTPConnection | None = None) -> int:
        """End every session listed in a storage index (`SessionRecord.indexes()`: an identity provider's
        session or subject), on every replica, and stop their runs here; how many sessions ended."""
        ended = await self._storage.delete_indexed_sessions(index)
        for key, user_id in ended:
            self.streams.stop_session(key)
            self.audit.record("session.revoked", key, user_id=user_id, connection=connection, reason=reason)
        return len(ended)

    async def watch_users_forever(self, changed_users: Callable[[], list[str]]) -> None:
        """End the sessions of password users whose password was reset, or who were removed
        (`python -m proxy users add --replace` / `users remove`), within a few seconds, on every
        replica that reads the users file. Runs for the life of the process."""
        pending: set[str] = set()
        while True:
            await anyio.sleep(USERS_FILE_CHECK_SECONDS)
            pending.update(changed_users())
            for user_id in sorted(pending):
                try:
                    await self.revoke_user(user_id, reason="password_changed")
                except StorageUnavailable:
                    logger.warning("sessions of a changed user not ended yet: storage unreachable; retrying")
                else:
                    pending.discard(user_id)

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
        written = response.headers["set-cookie"]
        if len(written.encode()) > MAX_COOKIE_BYTES:  # pragma: no cover - an id and a timestamp never are
            raise RuntimeError("session cookie larger than 1 KB")

    def clear_cookie(self, response: Response) -> None:
        headers = self.clear_headers()
        response.headers.append("Set-Cookie", headers.pop("Set-Cookie"))
        response.headers.update(headers)

    def clear_headers(self, *, site_data: bool = True) -> dict[str, str]:
        """The headers that end the session in the browser: an expired cookie, and for a sign-out
        Clear-Site-Data."""
        expired = Response()
        expired.delete_cookie(
            self.cookie_name,
            path="/",
            secure=self.cookie_secure,
            httponly=True,
            samesite=self.samesite,  # type: ignore[arg-type]
        )
        headers = {"Set-Cookie": expired.headers["set-cookie"], "Cache-Control": "no-store"}
        if site_data:
            headers["Clear-Site-Data"] = CLEAR_SITE_DATA
        return headers

    def _expiry(self, record: SessionRecord, now: float) -> str | None:
        """Why the record has ended, if it has: the absolute end first, whatever the activity."""
        if now >= record.expires_at:
            return "expired_absolute"
        if now >= record.last_seen + self.idle_seconds:
            return "expired_idle"
        return None

    async def _end(self, connection: HTTPConnection, *, reason: str) -> Session | None:
        session = await self.current(connection, touch=False)
        if session is not None:
            await self._revoke(session.record, reason=reason, connection=connection)
        return session

    async def _revoke(self, record: SessionRecord, *, reason: str, connection: HTTPConnection) -> None:
        await self._storage.delete_session(record.key)
        stopped = self.streams.stop_session(record.key)
        self.audit.record(
            "session.revoked", record.key, user_id=record.user_id, connection=connection, reason=reason, relays=stopped
        )

    def _cookie(self, connection: HTTPConnection) -> str | None:
        """The session cookie's value, matched by its exact name.

        Not Starlette's `request.cookies`: its parser strips any Unicode whitespace around names, so
        a cookie named "\xa0__Host-bff_session", which a sibling subdomain may set where the real
        `__Host-` one can only be set by us, would be read as ours. Only the separators' ASCII spaces
        are trimmed here. Two cookies of our exact name mean one of them was planted: neither counts,
        and the request is unauthenticated (the answer expires ours, and the browser signs in again).
        """
        found = []
        for pair in "; ".join(connection.headers.getlist("cookie")).split(";"):
            name, sep, value = pair.partition("=")
            if sep and name.strip(" \t") == self.cookie_name:
                found.append(value.strip(" \t"))
        return found[0] if len(found) == 1 else None

    def _session_id(self, connection: HTTPConnection) -> str | None:
        value = self._cookie(connection)
        if not value or len(value) > MAX_COOKIE_BYTES:
            return None
        try:
            session_id = self._serializer.loads(value, max_age=self.max_seconds)
        except BadSignature:  # includes SignatureExpired
            return None
        return session_id if isinstance(session_id, str) else None
