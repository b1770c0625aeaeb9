"""`GET /auth/login` and `GET /auth/callback`: sign-in with the identity provider (CONTRACT C2).

The login attempt (state, nonce, PKCE verifier, where to return, the session the browser had) lives
in a cookie of its own per attempt, so sign-ins started in parallel tabs do not undo each other
(bff-security R14). It is sealed (AES-GCM, proxy/sealing.py), not only signed: the verifier must not be
readable by anyone who sees the browser's cookies. `SameSite=Lax`, because the callback is a
top-level navigation from the provider's site, which a Strict cookie would not come back with.

For the same reason the callback answers with a small page that moves on to `returnTo` itself,
instead of a redirect: after a cross-site redirect chain the browser would load `returnTo` without
the new (Strict) session cookie, and the app would show the user as signed out.

A failed sign-in goes back to `/?auth_error=<code>` with a stable code; the reason is logged, and
nothing the provider said is shown.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
import secrets
import time
from urllib.parse import parse_qs, urlsplit

from authlib.common.security import generate_token
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from proxy.auth.jwt import LEEWAY_SECONDS
from proxy.auth.oidc import LOGOUT_TOKEN_MAX_AGE_SECONDS, IdpTokens, OidcClient, OidcError, index_hash
from proxy.errors import AUTH_UNAVAILABLE, INVALID_INPUT, INVALID_LOGOUT_TOKEN
from proxy.sealing import SealError
from proxy.services import services
from proxy.sessions import IdpSession, SessionManager, User
from proxy.storage import SessionRecord
from proxy.throttle import client_ip

logger = logging.getLogger("proxy.auth.oidc")

LOGIN_SECONDS = 600  # from leaving for the provider to coming back
LOGIN_BINDING = "workflow-bff.oidc-login"
MAX_RETURN_TO_CHARS = 2048
MAX_CODE_CHARS = 4096
MAX_LOGOUT_TOKEN_CHARS = 8192
# Error codes the provider may send back that the page can explain; any other is `login_failed`.
PROVIDER_ERRORS = frozenset(
    {"access_denied", "login_required", "consent_required", "interaction_required", "temporarily_unavailable"}
)
NO_STORE = {"Cache-Control": "no-store"}


class LoginFailed(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def safe_return_to(value: str) -> str:
    """`returnTo`, if it is a path on this origin; 400 otherwise (no open redirect: `//host`, `/\\host`
    and `https:` all leave the origin in some browser)."""
    parts = urlsplit(value)
    if (
        not value.startswith("/")
        or value.startswith("//")
        or len(value) > MAX_RETURN_TO_CHARS
        or "\\" in value
        or not value.isprintable()
        or parts.scheme
        or parts.netloc
    ):
        raise INVALID_INPUT.error("returnTo must be a path on this site, like /chat.")
    return value


def login_cookie_name(sessions: SessionManager, state: str) -> str:
    digest = hashlib.sha256(state.encode()).hexdigest()[:16]
    return f"__Host-bff_oidc_{digest}" if sessions.cookie_secure else f"bff_oidc_{digest}"


def oidc_routes(client: OidcClient) -> list[Route]:
    async def login(request: Request) -> Response:
        bff = services(request)
        return_to = safe_return_to(request.query_params.get("returnTo", "/"))
        # Each attempt costs a provider round trip and a cookie: limited per client IP like guests.
        limit_headers = await bff.limiter.check("login", client_ip(request))
        state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), generate_token(64)
        try:
            url = await client.authorization_url(state=state, nonce=nonce, verifier=verifier)
        except OidcError as exc:
            logger.warning("oidc login unavailable", extra={"reason": exc.reason})
            raise AUTH_UNAVAILABLE.error(
                "Sign-in is unavailable right now. Try again shortly.", retry_after=5
            ) from None
        previous = await bff.sessions.current(request, touch=False)
        attempt = {
            "s": state,
            "n": nonce,
            "v": verifier,
            "r": return_to,
            "p": previous.key if previous else None,
            "t": time.time(),
        }
        response = RedirectResponse(url, 302, headers={**NO_STORE, **limit_headers})
        response.set_cookie(
            login_cookie_name(bff.sessions, state),
            bff.sessions.sealer.seal(json.dumps(attempt).encode(), bound_to=LOGIN_BINDING),
            max_age=LOGIN_SECONDS,
            path="/",
            secure=bff.sessions.cookie_secure,
            httponly=True,
            samesite="lax",
        )
        return response

    async def callback(request: Request) -> Response:
        bff = services(request)
        sessions = bff.sessions
        params = request.query_params
        state = params.get("state", "")
        cookie_name = login_cookie_name(sessions, state)
        try:
            attempt = _read_attempt(sessions, request.cookies.get(cookie_name), state)
            user, idp = await _complete(client, request, attempt)
        except (LoginFailed, OidcError) as failure:
            if isinstance(failure, OidcError):
                failure = LoginFailed("idp_unavailable" if failure.unavailable else "login_failed", failure.reason)
            logger.info("oidc sign-in failed", extra={"code": failure.code, "reason": failure.reason})
            response: Response = RedirectResponse(f"/?auth_error={failure.code}", 303, headers=NO_STORE)
        else:
            previous = attempt.get("p")
            if isinstance(previous, str):
                await sessions.end_key(previous, reason="replaced", connection=request)
            _, cookie = await sessions.sign_in(request, user, idp)
            response = _continue_to(str(attempt["r"]))
            sessions.set_cookie(response, cookie)
        # The attempt is used up whatever happened: a replayed callback finds no cookie.
        response.delete_cookie(cookie_name, path="/", secure=sessions.cookie_secure, httponly=True, samesite="lax")
        return response

    async def backchannel_logout(request: Request) -> Response:
        """OpenID Connect Back-Channel Logout 1.0: the provider's server says a session there ended
        (the user signed out elsewhere, or was removed), and every session here that it opened ends,
        on every replica. Exempt from the browser CSRF rules (proxy/middleware/csrf.py): the signed
        logout token is the proof, and a token is accepted once."""
        bff = services(request)
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        tokens = form.get("logout_token", [])
        try:
            if len(tokens) != 1 or len(tokens[0]) > MAX_LOGOUT_TOKEN_CHARS:
                raise OidcError("no single logout_token")
            claims = await client.verify_logout_token(tokens[0])
        except OidcError as exc:
            logger.info("oidc logout token refused", extra={"reason": exc.reason})
            if exc.unavailable:  # the provider's keys could not be fetched: it may try again
                raise AUTH_UNAVAILABLE.error("Logout tokens cannot be verified right now.", retry_after=5) from None
            raise INVALID_LOGOUT_TOKEN.error() from None
        # Last, once the signature is known good: a forged token must not use up a real one's jti.
        seen = hashlib.sha256(f"{client.issuer}\0{claims['jti']}".encode()).hexdigest()
        ttl = LOGOUT_TOKEN_MAX_AGE_SECONDS + 2 * LEEWAY_SECONDS  # as long as the token is accepted at all
        if await bff.storage.incr_up_to(f"oidc-jti:{seen}", 1, 1, ttl) is None:
            logger.info("oidc logout token refused", extra={"reason": "replayed jti"})
            raise INVALID_LOGOUT_TOKEN.error()
        sid = claims.get("sid")
        index = (
            f"oidc-sid:{index_hash(client.issuer, sid)}"
            if isinstance(sid, str) and sid
            else f"oidc-sub:{index_hash(client.issuer, str(claims['sub']))}"
        )
        ended = await bff.sessions.revoke_indexed(index, reason="idp_backchannel", connection=request)
        logger.info("oidc back-channel logout", extra={"sessions": ended, "by": index.split(":")[0]})
        return Response(status_code=200, headers=NO_STORE)

    return [
        Route("/auth/login", login, methods=["GET"]),
        Route("/auth/callback", callback, methods=["GET"]),
        Route("/auth/backchannel-logout", backchannel_logout, methods=["POST"]),
    ]


def _read_attempt(sessions: SessionManager, sealed: str | None, state: str) -> dict[str, object]:
    if not sealed or not state or len(sealed) > 4096:
        raise LoginFailed("login_expired", "no login cookie for this state")
    try:
        attempt = json.loads(sessions.sealer.open(sealed, bound_to=LOGIN_BINDING))
    except (SealError, ValueError):
        raise LoginFailed("login_expired", "login cookie does not open") from None
    if (
        not isinstance(attempt, dict)
        or not isinstance(attempt.get("t"), float)
        or not isinstance(attempt.get("s"), str)
    ):
        raise LoginFailed("login_expired", "login cookie malformed")
    if time.time() - attempt["t"] > LOGIN_SECONDS:
        raise LoginFailed("login_expired", "login attempt too old")
    # The cookie is found by a hash of the state; the state itself is compared in full.
    if not hmac.compare_digest(attempt["s"].encode(), state.encode()):
        raise LoginFailed("login_expired", "state mismatch")
    return attempt


async def _complete(client: OidcClient, request: Request, attempt: dict[str, object]) -> tuple[User, IdpSession]:
    params = request.query_params
    provider = await client.provider()
    # RFC 9207: an answer naming another issuer came from another provider (a mix-up attack).
    if ("iss" in params or provider.iss_parameter) and params.get("iss") != client.issuer:
        raise LoginFailed("login_failed", "iss parameter differs from the issuer")
    if "error" in params:
        error = params["error"]
        raise LoginFailed(error if error in PROVIDER_ERRORS else "login_failed", f"provider error {error[:64]!r}")
    code = params.get("code", "")
    if not code or len(code) > MAX_CODE_CHARS:
        raise LoginFailed("login_failed", "no code")
    answer = await client.exchange(code, str(attempt["v"]))
    tokens = client.tokens_from(answer)
    claims = await client.verify_id_token(tokens.id_token, nonce=str(attempt["n"]))
    user = User(client.user_id(claims), "oidc")
    sid = claims.get("sid")
    idp = IdpSession(
        display_name=client.display_name(claims),
        sid_hash=index_hash(client.issuer, sid) if isinstance(sid, str) and sid else "",
        sub_hash=index_hash(client.issuer, claims["sub"]),
        tokens=tokens.dumps(),
        expires_at=tokens.expires_at if tokens.refresh_token else 0.0,
    )
    return user, idp


async def signed_out(client: OidcClient, sessions: SessionManager, ended: list[SessionRecord]) -> Response:
    """The answer to a logout that ended `ended` (already revoked here): 200 with the provider's logout
    URL for the browser to visit when the browser's own session was an OpenID Connect one and the
    provider offers RP-initiated logout, else 204. Refresh tokens are revoked at the provider after
    the answer is sent, so a slow provider never holds up a logout.

    The ID token in the URL (`id_token_hint`) is the one token the browser is ever given, on purpose:
    providers use it to end the right session without asking. Its session here is over by then, and
    it opens nothing at the BFF; BFF_OIDC_LOGOUT_HINT=client_id leaves it out."""
    tokens = [found for record in ended if (found := _tokens_of(sessions, record)) is not None]
    refresh_tokens = [t.refresh_token for t in tokens if t.refresh_token]
    background = BackgroundTask(_revoke_all, client, refresh_tokens) if refresh_tokens else None
    logout_url = None
    if ended and ended[0].kind == "oidc":
        try:
            provider = await client.provider()
        except OidcError:
            provider = None  # signed out here; the provider's session cannot be ended from here now
        own = _tokens_of(sessions, ended[0])
        if provider is not None:
            logout_url = client.logout_url(provider, own.id_token if own else None)
    if logout_url is None:
        return Response(status_code=204, background=background)
    return JSONResponse({"logout_url": logout_url}, headers=NO_STORE, background=background)


def _tokens_of(sessions: SessionManager, record: SessionRecord) -> IdpTokens | None:
    data = sessions.idp_tokens(record)
    try:
        return IdpTokens.loads(data) if data is not None else None
    except (ValueError, KeyError, TypeError):
        return None


async def _revoke_all(client: OidcClient, refresh_tokens: list[str]) -> None:
    for refresh_token in refresh_tokens:
        try:
            await client.revoke(refresh_token)
        except OidcError as exc:  # the session here is over either way; the token expires at the provider
            logger.warning("oidc revocation failed", extra={"reason": exc.reason})


def _continue_to(return_to: str) -> Response:
    """A page that moves on to `return_to` at once (see the module's docstring for why not a 302)."""
    target = html.escape(return_to, quote=True)
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="0;url={target}"><title>Signed in</title></head>'
        f'<body><p>Signed in. <a href="{target}">Continue</a></p></body></html>'
    )
    return HTMLResponse(body, headers=NO_STORE)


__all__ = ["oidc_routes", "safe_return_to", "signed_out"]
