"""`password`: `POST /auth/login` with `{"username", "password"}` against `BFF_USERS_FILE`.

The users file is JSON, `{"users": {"alice": {"hash": "$argon2id$..."}}}`, written by
`python -m proxy users add NAME`; it is re-read when it changes on disk, so adding a user needs no
restart. Hashes are argon2id (argon2-cffi's RFC 9106 defaults). An unknown username costs one
verification against a dummy hash, the same work as a wrong password, so response times do not tell
which usernames exist; both answer the same 401. Failures are throttled per client IP and per
username (proxy/throttle.py). Verification runs in worker threads, at most two at a time, so a burst
of sign-ins can neither stall the event loop nor take all the memory argon2 uses.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import tempfile
from pathlib import Path

import anyio
import anyio.to_thread
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import ConfigDict, Field
from starlette.requests import Request

from proxy.auth.base import AuthConfigError
from proxy.body import read_json
from proxy.errors import UNAUTHENTICATED
from proxy.models import BodyModel, Refusals, name_pattern
from proxy.sessions import User
from proxy.throttle import LoginThrottle, client_ip

logger = logging.getLogger("proxy.auth.password")

USAGE = 'Send {"username": "...", "password": "..."}.'
USERNAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
MAX_PASSWORD_CHARS = 1024
MIN_PASSWORD_CHARS = 8  # enforced when a password is set (`users add`), not at sign-in
CONCURRENT_VERIFICATIONS = 2
HASHER = PasswordHasher()


def hash_password(password: str) -> str:
    return HASHER.hash(password)


def load_users(path: Path) -> dict[str, str]:
    """Username → argon2 hash. Raises `AuthConfigError` naming BFF_USERS_FILE when unusable."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AuthConfigError(f"BFF_USERS_FILE: cannot read {path}: {type(exc).__name__}") from None
    table = document.get("users") if isinstance(document, dict) else None
    if not isinstance(table, dict):
        raise AuthConfigError(f'BFF_USERS_FILE: {path} must hold {{"users": {{NAME: {{"hash": ...}}}}}}')
    users: dict[str, str] = {}
    for name, entry in table.items():
        stored = entry.get("hash") if isinstance(entry, dict) else None
        if not USERNAME_PATTERN.fullmatch(name) or not isinstance(stored, str) or not stored.startswith("$argon2"):
            raise AuthConfigError(f"BFF_USERS_FILE: the entry for {name[:64]!r} is not a username with an argon2 hash")
        users[name] = stored
    return users


def save_users(path: Path, users: dict[str, str]) -> None:
    """Write atomically (a reader never sees half a file), readable by the owner only."""
    document = {"users": {name: {"hash": users[name]} for name in sorted(users)}}
    directory = path.parent if str(path.parent) else Path(".")
    descriptor, temporary = tempfile.mkstemp(prefix=".users-", dir=directory)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class UsersFile:
    """The users file, re-read when its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._users = load_users(path)
        self._stamp = self._current_stamp()

    def hash_for(self, username: str) -> str | None:
        self.reload()
        return self._users.get(username)

    def reload(self) -> list[str]:
        """Re-read the file if it changed; returns the users whose password changed or who were
        removed, whose sessions must end (a reset after a stolen password is worth nothing otherwise)."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return []
        self._stamp = stamp
        try:
            users = load_users(self.path)
        except AuthConfigError as exc:
            logger.error("users file not reloaded; keeping the previous users", extra={"reason": str(exc)})
            return []
        changed = sorted(name for name, stored in self._users.items() if users.get(name) != stored)
        self._users = users
        return changed

    def _current_stamp(self) -> tuple[int, int]:
        try:
            status = self.path.stat()
        except OSError:
            return (0, 0)
        return (status.st_mtime_ns, status.st_size)


class PasswordAuthenticator:
    method = "password"
    path = "/auth/login"

    def __init__(self, users_file: Path, throttle: LoginThrottle) -> None:
        self._users = UsersFile(users_file)
        self._throttle = throttle
        # What an unknown username is checked against: the same work as a real hash.
        self._dummy_hash = HASHER.hash(secrets.token_urlsafe(16))
        self._limiter = anyio.CapacityLimiter(CONCURRENT_VERIFICATIONS)

    def changed_users(self) -> list[str]:
        """The user ids whose password changed or who were removed since the last look."""
        return self._users.reload()

    async def authenticate(self, request: Request) -> User:
        credentials = LoginRequest.parse(await read_json(request))
        username, password = credentials.username, credentials.password
        ip = client_ip(request)
        async with self._throttle.attempt(ip, username):
            if not await anyio.to_thread.run_sync(self._verify, username, password, limiter=self._limiter):
                await self._throttle.failed(ip, username)
                logger.info("password sign-in refused", extra={"client_ip": ip})
                raise UNAUTHENTICATED.error("Wrong username or password.")
        await self._throttle.succeeded(ip, username)
        return User(id=username, kind="password")

    def _verify(self, username: str, password: str) -> bool:
        stored = self._users.hash_for(username)
        try:
            HASHER.verify(stored or self._dummy_hash, password)
        except (VerificationError, InvalidHashError):
            return False
        return stored is not None


class LoginRequest(BodyModel):
    """`POST /auth/login`: a username and its password."""

    model_config = ConfigDict(extra="forbid")
    username: str = Field(pattern=name_pattern(USERNAME_PATTERN))
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_CHARS)

    refusals = Refusals(
        USAGE,
        {
            ":shape": USAGE,
            "username": "That is not a valid username.",
            "password": f"The password must be 1 to {MAX_PASSWORD_CHARS} characters.",
        },
    )
