"""`jwt`: exchange the app's identity-provider token for a session (`POST /auth/exchange`).

The browser sends `Authorization: Bearer <JWT>` once; from then on it holds only our session cookie.
Verification is PyJWT's, held to a short list of algorithms: HS256 with `BFF_JWT_SECRET`, RS256 and
ES256 with keys from `BFF_JWKS_URL`. The algorithm named in the token only chooses among those, and each
choice has exactly one kind of key, so `alg=none`, an HS256 token "signed" with a public key, or a JWKS
entry of the wrong type never verify (algorithm confusion). `exp` and `sub` are required; `nbf`, and
`iss` / `aud` when configured, are checked. The user id is `sub`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable

import anyio
import httpx
import jwt
from starlette.requests import Request

from proxy.errors import AUTH_UNAVAILABLE, UNAUTHENTICATED, ApiError
from proxy.sessions import User

logger = logging.getLogger("proxy.auth.jwt")

ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "ES256"})
LEEWAY_SECONDS = 30  # clock skew between the identity provider and us
MAX_TOKEN_CHARS = 8192
MAX_SUB_CHARS = 255
JWKS_MAX_AGE_SECONDS = 900.0
# An unknown `kid` refetches the JWKS (the provider rotated its keys), but at most this often, so
# tokens with made-up kids cannot turn us into a load generator against the provider.
JWKS_REFRESH_COOLDOWN_SECONDS = 30.0
JWKS_TIMEOUT = httpx.Timeout(5.0)
# The whole fetch, however slowly the provider trickles its answer, and the longest wait between fetches
# after failures.
JWKS_TIMEOUT_SECONDS = 5.0
JWKS_MAX_BACKOFF_SECONDS = 60.0
JWKS_MAX_BYTES = 512 * 1024


def jwks_client() -> httpx.AsyncClient:
    # Identity encoding: the size cap counts what arrives, and a small compressed answer must not
    # unpack into a large one.
    return httpx.AsyncClient(
        timeout=JWKS_TIMEOUT,
        headers={"Accept": "application/json", "Accept-Encoding": "identity", "User-Agent": "workflow-bff"},
        follow_redirects=False,
        trust_env=False,
    )


class JwksCache:
    """The provider's signing keys by `kid`.

    One fetch at a time, shared by every sign-in that needs it, and never one per sign-in: a stale
    set keeps serving while a refresh runs in the background, a fetch that fails or hangs (it is cut
    after `JWKS_TIMEOUT_SECONDS`) backs off before the next (1 s, doubling to a minute), and an
    unknown `kid` refetches at most once per cooldown. Only the very first load is waited for.

    Each fetch opens a client of its own (`open_client`) and closes it. Fetches are at least a
    cooldown apart, and usually `max_age`: longer than any keep-alive, so a client kept open would
    save no connection, and would need the app's lifespan to close it.
    """

    def __init__(
        self,
        url: str,
        *,
        max_age: float = JWKS_MAX_AGE_SECONDS,
        open_client: Callable[[], httpx.AsyncClient] = jwks_client,
    ) -> None:
        self.url = url
        self.max_age = max_age
        self._open_client = open_client
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -math.inf
        self._refreshed_at = -math.inf
        self._fetch_task: asyncio.Task[None] | None = None
        self._retry_at = -math.inf
        self._backoff = 0.0

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        if not self._keys:
            await self._fetched()
            if not self._keys:
                raise AUTH_UNAVAILABLE.error(retry_after=max(1, math.ceil(self._retry_at - time.monotonic())))
        elif time.monotonic() - self._fetched_at >= self.max_age:
            self._fetch()  # in the background: the stale keys serve meanwhile
        found = self._find(kid)
        if found is None and time.monotonic() - self._refreshed_at >= JWKS_REFRESH_COOLDOWN_SECONDS:
            self._refreshed_at = time.monotonic()
            await self._fetched()
            found = self._find(kid)
        return found

    def _fetch(self) -> asyncio.Task[None] | None:
        """The fetch under way, or a new one unless the last failure's backoff still runs."""
        if self._fetch_task is None and time.monotonic() >= self._retry_at:
            self._fetch_task = asyncio.get_running_loop().create_task(self._load())
        return self._fetch_task

    async def _fetched(self) -> None:
        task = self._fetch()
        if task is not None:
            await asyncio.shield(task)

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            # Without a kid the choice is unambiguous only when the provider publishes one key.
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _load(self) -> None:
        """Replace the keys with the provider's current set. A failure keeps the keys we have (with
        none at all, sign-in answers 503) and backs off."""
        try:
            with anyio.fail_after(JWKS_TIMEOUT_SECONDS):
                keys = await self._download()
        except (httpx.HTTPError, ValueError, TimeoutError) as exc:
            self._backoff = min(max(1.0, 2 * self._backoff), JWKS_MAX_BACKOFF_SECONDS)
            self._retry_at = time.monotonic() + self._backoff
            logger.warning(
                "jwks fetch failed",
                extra={"reason": type(exc).__name__, "jwks_url": self.url, "retry_in_s": self._backoff},
            )
        else:
            self._keys, self._fetched_at, self._backoff = keys, time.monotonic(), 0.0
            logger.info("jwks loaded", extra={"keys": len(keys), "jwks_url": self.url})
        finally:
            self._fetch_task = None

    async def _download(self) -> dict[str, jwt.PyJWK]:
        body = bytearray()
        async with self._open_client() as http, http.stream("GET", self.url) as reply:
            if reply.status_code != 200:
                raise ValueError(f"status {reply.status_code}")
            async for chunk in reply.aiter_bytes():
                body += chunk
                if len(body) > JWKS_MAX_BYTES:
                    raise ValueError("JWKS too large")
        document = json.loads(body)
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError("no keys array")
        keys: dict[str, jwt.PyJWK] = {}
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue  # a key type we do not use; the others still count
            # Only public keys of the accepted algorithms: an `oct` (symmetric) entry would make HS256
            # tokens verifiable with a published key.
            if key.algorithm_name in ASYMMETRIC_ALGORITHMS:
                keys[str(entry.get("kid", ""))] = key
        if not keys:
            raise ValueError("no usable RS256/ES256 keys")
        return keys


class JwtAuthenticator:
    method = "jwt"
    path = "/auth/exchange"

    def __init__(
        self,
        *,
        secret: str | None,
        jwks_url: str | None,
        issuer: str | None,
        audience: str | None,
        jwks_max_age: float = JWKS_MAX_AGE_SECONDS,
    ) -> None:
        self._secret = secret
        self._jwks = JwksCache(jwks_url, max_age=jwks_max_age) if jwks_url else None
        self._issuer = issuer
        self._audience = audience
        self._required = ["exp", "sub"] + (["iss"] if issuer else []) + (["aud"] if audience else [])

    async def authenticate(self, request: Request) -> User:
        token = _bearer_token(request)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _refused("malformed") from None
        algorithm = header.get("alg")
        kid = header.get("kid")
        if kid is not None and not (isinstance(kid, str) and len(kid) <= 256):
            raise _refused("bad_kid")
        # The token's `alg` only picks which configured key to try; the algorithms PyJWT accepts come
        # from that key (RFC 8725 §2.1), never from the token.
        key: str | jwt.PyJWK
        if algorithm == "HS256" and self._secret is not None:
            key, accepted = self._secret, "HS256"
        elif isinstance(algorithm, str) and algorithm in ASYMMETRIC_ALGORITHMS and self._jwks is not None:
            found = await self._jwks.key(kid)
            if found is None:
                raise _refused("unknown_key")
            key, accepted = found, found.algorithm_name
        else:
            raise _refused("algorithm_not_accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[accepted],
                issuer=self._issuer,
                audience=self._audience,
                leeway=LEEWAY_SECONDS,
                options={"require": self._required},
            )
        except jwt.PyJWTError as exc:
            raise _refused(type(exc).__name__) from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUB_CHARS or not subject.isprintable():
            raise _refused("bad_sub")
        # Namespaced, because limits, budgets and logout-all are keyed by user id: an identity-provider
        # user whose `sub` is "alice" must not share them with password user "alice" (usernames cannot
        # contain ":", guest ids start "guest_").
        return User(id=f"jwt:{subject}", kind="jwt")


def _bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise UNAUTHENTICATED.error("Send the identity provider's token as Authorization: Bearer.")
    if len(token) > MAX_TOKEN_CHARS:
        raise _refused("too_long")
    return token


def _refused(reason: str) -> ApiError:
    # The reason goes to our log only: telling a caller which check failed helps an attacker more
    # than a developer, who can read the log line.
    logger.info("jwt refused", extra={"reason": reason})
    return UNAUTHENTICATED.error()
