"""`/auth/*`: signing in, checking and ending browser sessions (CONTRACT B1)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.errors import unauthenticated
from proxy.services import services
from proxy.sessions import Session, User

NO_STORE = {"Cache-Control": "no-store"}


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def session_body(session: Session) -> dict[str, object]:
    user = session.user
    return {"user": {"id": user.id, "kind": user.kind}, "expires_at": iso(session.expires_at), "limits": {}}


async def start_session(request: Request, user: User) -> Response:
    """Sign `user` in: end whatever session the browser had, then issue a new id."""
    sessions = services(request).sessions
    await sessions.end(request)
    session, cookie = await sessions.start(user)
    response = JSONResponse(session_body(session), headers=NO_STORE)
    sessions.set_cookie(response, cookie)
    return response


async def guest(request: Request) -> Response:
    return await start_session(request, User(id=f"guest_{secrets.token_hex(8)}", kind="guest"))


async def current_session(request: Request) -> Response:
    session = await services(request).sessions.current(request, touch=False)
    if session is None:
        raise unauthenticated()
    return JSONResponse(session_body(session), headers=NO_STORE)


async def logout(request: Request) -> Response:
    sessions = services(request).sessions
    await sessions.end(request)
    response = Response(status_code=204, headers={**NO_STORE, "Clear-Site-Data": '"cookies"'})
    sessions.clear_cookie(response)
    return response


def auth_routes(methods: Sequence[str]) -> list[Route]:
    routes = [
        Route("/auth/session", current_session, methods=["GET"]),
        Route("/auth/logout", logout, methods=["POST"]),
    ]
    if "guest" in methods:
        routes.append(Route("/auth/guest", guest, methods=["POST"]))
    return routes
