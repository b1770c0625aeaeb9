"""`guest`: an anonymous session with a random user id. Proves nothing, so it is limited like one."""

from __future__ import annotations

import secrets

from starlette.requests import Request

from proxy.sessions import User


class GuestAuthenticator:
    method = "guest"
    path = "/auth/guest"

    async def authenticate(self, request: Request) -> User:
        return User(id=f"guest_{secrets.token_hex(8)}", kind="guest")
