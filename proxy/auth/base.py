"""The one interface every sign-in method implements (CONTRACT B1).

An authenticator turns one sign-in request into a `User`, or refuses it with an `ApiError`. It never
touches sessions or cookies: the route does that the same way for every method, so a new session id
is issued at every sign-in whichever method proved who the browser is.
"""

from __future__ import annotations

from typing import Protocol

from starlette.requests import Request

from proxy.sessions import User


class AuthConfigError(ValueError):
    """A sign-in method cannot start with this configuration; the message names the variable."""


class Authenticator(Protocol):
    method: str  # as named in BFF_AUTH
    path: str  # the sign-in route, e.g. /auth/login

    async def authenticate(self, request: Request) -> User:
        """The user this request proves to be; raises `ApiError` (401, 422, 429, 503) otherwise."""
        ...
