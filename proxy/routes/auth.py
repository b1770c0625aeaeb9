"""`/auth/*`: signing in, checking and ending browser sessions (CONTRACT B1).

Every sign-in route is one authenticator (proxy/auth/) plus the same session handling, so whichever
method proved who the browser is, the old session ends and a new session id is issued.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.auth import Authenticator
from proxy.auth.oidc import OidcClient
from proxy.models import SessionInfo, UserInfo
from proxy.routes.oidc import oidc_routes, signed_out
from proxy.services import Services, services
from proxy.sessions import Session
from proxy.throttle import client_ip

NO_STORE = {"Cache-Control": "no-store"}


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


async def session_body(bff: Services, session: Session) -> dict[str, object]:
    user = session.user
    budget = bff.budget
    limits: dict[str, object] = {
        **bff.limiter.describe(),
        "max_concurrent_streams": bff.settings.max_concurrent_streams,
        # Today's use as every replica charged it (null when there is no budget).
        "daily_output_chars": (
            {"limit": budget.daily_chars, "used": await budget.used(session.limit_key)} if budget.daily_chars else None
        ),
    }
    name = session.record.display_name
    answer = SessionInfo(
        user=UserInfo(id=user.id, kind=user.kind, **({"name": name} if name else {})),
        method=user.kind,
        expires_at=iso(session.expires_at),
        limits=limits,
    )
    return answer.model_dump()


def sign_in_endpoint(authenticator: Authenticator) -> Callable[[Request], Awaitable[Response]]:
    async def sign_in(request: Request) -> Response:
        bff = services(request)
        # Guest sign-ins are free for anyone, so they are limited per client IP; a password or JWT
        # sign-in proves someone, and its failures are throttled by its authenticator instead, so 30
        # classmates behind one address can all sign in at the start of a lesson.
        limit_headers: dict[str, str] = {}
        if authenticator.method == "guest":
            limit_headers = await bff.limiter.check("login", client_ip(request))
        user = await authenticator.authenticate(request)
        session, cookie = await bff.sessions.sign_in(request, user)
        response = JSONResponse(await session_body(bff, session), headers={**NO_STORE, **limit_headers})
        bff.sessions.set_cookie(response, cookie)
        return response

    return sign_in


async def current_session(request: Request) -> Response:
    # touch=False: polling the session must not keep it alive (bff-security R6, Duende's slide=false).
    bff = services(request)
    session = await bff.sessions.require(request, touch=False)
    return JSONResponse(await session_body(bff, session), headers=NO_STORE)


def logout_endpoint(oidc: OidcClient | None) -> Callable[[Request], Awaitable[Response]]:
    async def logout(request: Request) -> Response:
        """Ends this session server-side and its running relays. 204 even without a session: the browser
        wants to be signed out, and it is. With OpenID Connect, 200 and the provider's logout URL."""
        sessions = services(request).sessions
        ended = await sessions.end(request)
        if oidc is not None and ended is not None:
            response = await signed_out(oidc, sessions, [ended.record])
        else:
            response = Response(status_code=204)
        sessions.clear_cookie(response)
        return response

    return logout


def logout_all_endpoint(oidc: OidcClient | None) -> Callable[[Request], Awaitable[Response]]:
    async def logout_all(request: Request) -> Response:
        """Ends every session of this user, on every device, and all their running relays."""
        bff = services(request)
        sessions = bff.sessions
        session = await sessions.require(request, touch=False)
        # Read before they go: with OpenID Connect each holds a refresh token to revoke at the provider.
        records = await bff.storage.user_sessions(session.user.id) if oidc is not None else []
        await sessions.end_all(request, session)
        response = Response(status_code=204)
        if oidc is not None:
            response = await signed_out(oidc, sessions, [session.record, *(r for r in records if r.key != session.key)])
        sessions.clear_cookie(response)
        return response

    return logout_all


def auth_routes(authenticators: Sequence[Authenticator], oidc: OidcClient | None = None) -> list[Route]:
    routes = [
        Route("/auth/session", current_session, methods=["GET"]),
        Route("/auth/logout", logout_endpoint(oidc), methods=["POST"]),
        Route("/auth/logout-all", logout_all_endpoint(oidc), methods=["POST"]),
    ]
    for authenticator in authenticators:
        routes.append(Route(authenticator.path, sign_in_endpoint(authenticator), methods=["POST"]))
    if oidc is not None:
        routes += oidc_routes(oidc)
    return routes
