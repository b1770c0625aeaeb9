"""`jwt`: exchange the app's identity-provider token for a session (`POST /auth/exchange`).

The browser sends `Authorization: Bearer <JWT>` once; from then on it holds only our session cookie.
Verification is PyJWT's, held to a short list of algorithms: HS256 with `BFF_JWT_SECRET`, RS256 and
ES256 with keys from `BFF_JWKS_URL`. The algorithm named in the token only chooses among those, and each
choice has exactly one kind of key, so `alg=none`, an HS256 token "signed" with a public key, or a JWKS
entry of the wrong type never verify (algorithm confusion). `exp` and `sub` are required; `nbf`, and
`iss` / `aud` when configured, are checked. The user id is `sub`.
"""

from __future__ import annotations

import json
import logging
import math
import time

import anyio
import httpx
import jwt
from starlette.requests import Request

from proxy.errors import ApiError, unauthenticated
from proxy.services import services
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
JWKS_MAX_BYTES = 512 * 1024


class JwksCache:
    """The provider's signing keys by `kid`, fetched with the process's httpx client."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -math.inf
        self._refreshed_at = -math.inf
        self._lock = anyio.Lock()

    async def key(self, http: httpx.AsyncClient, kid: str | None) -> jwt.PyJWK | None:
        async with self._lock:
            if time.monotonic() - self._fetched_at >= JWKS_MAX_AGE_SECONDS:
                await self._load(http, required=not self._keys)
            found = self._find(kid)
            if found is None and time.monotonic() - self._refreshed_at >= JWKS_REFRESH_COOLDOWN_SECONDS:
                self._refreshed_at = time.monotonic()
                await self._load(http, required=False)
                found = self._find(kid)
            return found

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            # Without a kid the choice is unambiguous only when the provider publishes one key.
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _load(self, http: httpx.AsyncClient, *, required: bool) -> None:
        """Replace the keys with the provider's current set. A failure keeps the keys we have; with
        none at all (`required`), sign-in cannot be verified and answers 503."""
        try:
            keys = await self._fetch(http)
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("jwks fetch failed", extra={"reason": type(exc).__name__, "jwks_url": self.url})
            if required:
                raise ApiError(
                    503,
                    "auth_unavailable",
                    "Sign-in cannot be verified right now. Try again shortly.",
                    headers={"Retry-After": "5"},
                ) from None
            return
        self._keys = keys
        self._fetched_at = time.monotonic()
        logger.info("jwks loaded", extra={"keys": len(keys), "jwks_url": self.url})

    async def _fetch(self, http: httpx.AsyncClient) -> dict[str, jwt.PyJWK]:
        body = bytearray()
        async with http.stream("GET", self.url, timeout=JWKS_TIMEOUT, headers={"Accept": "application/json"}) as reply:
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
    ) -> None:
        self._secret = secret
        self._jwks = JwksCache(jwks_url) if jwks_url else None
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
            found = await self._jwks.key(services(request).http, kid)
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
        raise ApiError(401, "unauthenticated", "Send the identity provider's token as Authorization: Bearer.")
    if len(token) > MAX_TOKEN_CHARS:
        raise _refused("too_long")
    return token


def _refused(reason: str) -> ApiError:
    # The reason goes to our log only: telling a caller which check failed helps an attacker more
    # than a developer, who can read the log line.
    logger.info("jwt refused", extra={"reason": reason})
    return unauthenticated()
