"""`oidc`: sign-in with an OpenID Connect provider, the BFF as a confidential client (CONTRACT C2).

The protocol is Authlib's transport-free helpers (PKCE, the authorization URL, token requests and
client authentication: client_secret_basic / _post or private_key_jwt) and PyJWT (ID and logout
tokens, with the keys of `JwksCache`, which the `jwt` sign-in uses too). Written here is only the glue:
discovery, the HTTP calls (each with a timeout and a size cap), and the checks the specifications ask
of a relying party. Authlib's Starlette client does not fit: it keeps login state in Starlette's
single-key session cookie, opens a connection pool per call and refetches keys on every unknown kid.

Nothing the provider sends is ever shown to the browser: failures carry a short reason for our log
(`OidcError.reason`), and whether to try again (`unavailable`: the provider is down or slow).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import anyio
import httpx
import jwt
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7009 import prepare_revoke_token_request
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from joserfc.jwk import ECKey

from proxy.auth.base import AuthConfigError
from proxy.auth.jwt import ASYMMETRIC_ALGORITHMS, LEEWAY_SECONDS, MAX_SUB_CHARS, MAX_TOKEN_CHARS, JwksCache, jwks_client
from proxy.errors import ApiError
from proxy.settings import LOOPBACK_HOSTS, Settings

logger = logging.getLogger("proxy.auth.oidc")

DISCOVERY_MAX_AGE_SECONDS = 3600.0
CALL_TIMEOUT_SECONDS = 10.0  # the whole call, however slowly the provider answers
MAX_ANSWER_BYTES = 64 * 1024
MAX_NAME_CHARS = 200
BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
# A logout token older than this is refused even without `exp` (the final specification has none):
# together with the jti memory of the same length, a token can be used once.
LOGOUT_TOKEN_MAX_AGE_SECONDS = 300


class OidcError(Exception):
    """A step of the protocol failed. `reason` is for our log only; `unavailable` means the provider
    could not be reached or answered with a server error, so trying again later may work."""

    def __init__(self, reason: str, *, unavailable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unavailable = unavailable


@dataclass(frozen=True)
class Provider:
    """What discovery (`/.well-known/openid-configuration`) told us, checked."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    end_session_endpoint: str | None
    revocation_endpoint: str | None
    algorithms: frozenset[str]  # the ID token algorithms it offers that we accept
    iss_parameter: bool  # RFC 9207: the callback names the issuer (a mix-up defence)


@dataclass(frozen=True)
class IdpTokens:
    """The provider's tokens, as a session record keeps them (sealed: proxy/sealing.py)."""

    access_token: str
    refresh_token: str | None
    id_token: str
    expires_at: float  # of the access token

    def dumps(self) -> bytes:
        return json.dumps(
            {"at": self.access_token, "rt": self.refresh_token, "it": self.id_token, "exp": self.expires_at}
        ).encode()

    @classmethod
    def loads(cls, data: bytes) -> IdpTokens:
        fields = json.loads(data)
        return cls(fields["at"], fields["rt"], fields["it"], float(fields["exp"]))


# Google's ID tokens name their issuer with or without the scheme (its OpenID Connect guide says to
# accept both); every other provider's must match BFF_OIDC_ISSUER exactly.
ISSUER_SPELLINGS = {"https://accounts.google.com": ("https://accounts.google.com", "accounts.google.com")}


def accepted_issuers(issuer: str) -> str | tuple[str, ...]:
    return ISSUER_SPELLINGS.get(issuer, issuer)


def index_hash(issuer: str, value: str) -> str:
    """The storage index of an IdP session id or subject: hashed with the issuer, so two providers'
    values never collide, and a storage dump does not list who is signed in."""
    return hashlib.sha256(f"{issuer}\0{value}".encode()).hexdigest()


def _allowed_url(value: object) -> str | None:
    """An endpoint from discovery, if it is https (or http on loopback, for development)."""
    if not isinstance(value, str):
        return None
    parts = urlsplit(value)
    if parts.scheme == "https" and parts.hostname:
        return value
    if parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS:
        return value
    return None


def _printable(value: object, limit: int) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= limit and value.isprintable() else None


class OidcClient:
    def __init__(
        self,
        *,
        issuer: str,
        client_id: str,
        client_auth: ClientAuth,
        scopes: str,
        auth_params: dict[str, str],
        public_url: str,
        user_claim: str = "sub",
        name_claim: str = "name",
        refresh_margin: float = 60.0,
        logout_hint: str = "id_token",
        jwks_max_age: float = 900.0,
        open_client: Callable[[], httpx.AsyncClient] = jwks_client,
    ) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self._auth = client_auth
        self.scopes = scopes
        self.auth_params = auth_params
        self.redirect_uri = f"{public_url}/auth/callback"
        self.post_logout_redirect_uri = f"{public_url}/"
        self.user_claim = user_claim
        self.name_claim = name_claim
        self.refresh_margin = refresh_margin
        self.logout_hint = logout_hint
        self._jwks_max_age = jwks_max_age
        self._open_client = open_client
        self._provider: Provider | None = None
        self._fetched_at = -math.inf
        self._lock = asyncio.Lock()
        self._jwks: JwksCache | None = None

    # Discovery

    async def provider(self) -> Provider:
        """The provider's metadata, fetched once an hour (one fetch at a time); the last good copy
        serves while a refetch fails."""
        if self._provider is not None and time.monotonic() - self._fetched_at < DISCOVERY_MAX_AGE_SECONDS:
            return self._provider
        async with self._lock:
            if self._provider is None or time.monotonic() - self._fetched_at >= DISCOVERY_MAX_AGE_SECONDS:
                try:
                    self._provider = self._checked(
                        await self._get(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
                    )
                except OidcError as exc:
                    logger.warning("oidc discovery failed", extra={"reason": exc.reason, "issuer": self.issuer})
                    if self._provider is None:
                        raise OidcError(exc.reason, unavailable=True) from None
                self._fetched_at = time.monotonic()
                if self._jwks is None or self._jwks.url != self._provider.jwks_uri:
                    self._jwks = JwksCache(
                        self._provider.jwks_uri, max_age=self._jwks_max_age, open_client=self._open_client
                    )
        return self._provider

    def _checked(self, document: dict[str, Any]) -> Provider:
        # Byte for byte (OpenID Connect Discovery §4.3): a provider answering for another issuer is
        # either misconfigured or an impostor.
        if document.get("issuer") != self.issuer:
            raise OidcError("discovery issuer differs from BFF_OIDC_ISSUER")
        endpoints = {
            name: _allowed_url(document.get(name))
            for name in (
                "authorization_endpoint",
                "token_endpoint",
                "jwks_uri",
                "end_session_endpoint",
                "revocation_endpoint",
            )
        }
        required = ("authorization_endpoint", "token_endpoint", "jwks_uri")
        if any(endpoints[name] is None for name in required):
            raise OidcError("discovery lacks an https authorization, token or jwks endpoint")
        offered = document.get("id_token_signing_alg_values_supported", ["RS256"])
        algorithms = (
            frozenset(a for a in offered if a in ASYMMETRIC_ALGORITHMS) if isinstance(offered, list) else frozenset()
        )
        if not algorithms:
            raise OidcError("the provider signs ID tokens with no algorithm we accept (RS256, ES256)")
        methods = document.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise OidcError("the provider does not support PKCE S256")
        return Provider(
            issuer=self.issuer,
            authorization_endpoint=str(endpoints["authorization_endpoint"]),
            token_endpoint=str(endpoints["token_endpoint"]),
            jwks_uri=str(endpoints["jwks_uri"]),
            end_session_endpoint=endpoints["end_session_endpoint"],
            revocation_endpoint=endpoints["revocation_endpoint"],
            algorithms=algorithms,
            iss_parameter=document.get("authorization_response_iss_parameter_supported") is True,
        )

    # The authorization code flow

    async def authorization_url(self, *, state: str, nonce: str, verifier: str) -> str:
        provider = await self.provider()
        return str(
            prepare_grant_uri(
                provider.authorization_endpoint,
                client_id=self.client_id,
                response_type="code",
                redirect_uri=self.redirect_uri,
                scope=self.scopes,
                state=state,
                nonce=nonce,
                code_challenge=create_s256_code_challenge(verifier),
                code_challenge_method="S256",
                **self.auth_params,
            )
        )

    async def exchange(self, code: str, verifier: str) -> dict[str, Any]:
        provider = await self.provider()
        body = prepare_token_request(
            "authorization_code", code=code, redirect_uri=self.redirect_uri, code_verifier=verifier
        )
        return await self._token_call(provider.token_endpoint, body)

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        provider = await self.provider()
        return await self._token_call(
            provider.token_endpoint, prepare_token_request("refresh_token", refresh_token=refresh_token)
        )

    async def revoke(self, refresh_token: str) -> bool:
        """Revoke at the provider, if it offers revocation (RFC 7009); whether it said yes."""
        provider = await self.provider()
        if provider.revocation_endpoint is None:
            return False
        body, _ = prepare_revoke_token_request(refresh_token, "refresh_token")
        await self._token_call(provider.revocation_endpoint, body, json_answer=False)
        return True

    def tokens_from(self, answer: dict[str, Any], *, previous: IdpTokens | None = None) -> IdpTokens:
        """The tokens of a token endpoint answer; a refresh may leave out the refresh and ID tokens,
        which then stay those we had."""
        access_token = _printable(answer.get("access_token"), MAX_TOKEN_CHARS)
        id_token = answer.get("id_token") or (previous.id_token if previous else None)
        if access_token is None or not isinstance(id_token, str):
            raise OidcError("token answer without an access token or an ID token")
        expires_in = answer.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else 300.0
        refresh_token = answer.get("refresh_token") or (previous.refresh_token if previous else None)
        return IdpTokens(
            access_token, refresh_token if isinstance(refresh_token, str) else None, id_token, time.time() + lifetime
        )

    # Tokens the provider signs

    async def verify_id_token(self, token: str, *, nonce: str | None) -> dict[str, Any]:
        """The claims of a valid ID token for us (OpenID Connect Core §3.1.3.7). `nonce`: the one this
        login sent; None after a refresh, whose ID token carries none to compare."""
        claims = await self._decode(token, require=["iss", "sub", "aud", "exp", "iat"])
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if len(audiences) > 1 and claims.get("azp") != self.client_id:
            raise OidcError("ID token for several audiences without azp = our client id")
        if nonce is not None and not (isinstance(claims.get("nonce"), str) and _same(claims["nonce"], nonce)):
            raise OidcError("nonce mismatch")
        if _printable(claims.get("sub"), MAX_SUB_CHARS) is None:
            raise OidcError("bad sub")
        return claims

    async def verify_logout_token(self, token: str) -> dict[str, Any]:
        """The claims of a valid logout token (OpenID Connect Back-Channel Logout 1.0 §2.6), except the
        one-time use of its `jti`, which the route checks in the storage."""
        try:
            typ = jwt.get_unverified_header(token).get("typ")
        except jwt.PyJWTError:
            raise OidcError("malformed") from None
        if typ not in (None, "JWT", "logout+jwt"):
            raise OidcError("wrong typ")
        claims = await self._decode(token, require=["iss", "aud", "iat", "jti"])
        events = claims.get("events")
        if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_EVENT), dict):
            raise OidcError("no back-channel logout event")
        if "nonce" in claims:  # an ID token must never pass as a logout token
            raise OidcError("nonce in a logout token")
        if _printable(claims.get("sid"), 255) is None and _printable(claims.get("sub"), MAX_SUB_CHARS) is None:
            raise OidcError("neither sid nor sub")
        iat = claims["iat"]
        if not isinstance(iat, int | float) or iat < time.time() - LOGOUT_TOKEN_MAX_AGE_SECONDS - LEEWAY_SECONDS:
            raise OidcError("logout token too old")
        if _printable(claims.get("jti"), 255) is None:
            raise OidcError("bad jti")
        return claims

    async def _decode(self, token: str, *, require: list[str]) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_CHARS:
            raise OidcError("token too long")
        provider = await self.provider()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise OidcError("malformed") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        # As for the jwt sign-in: the token's `alg` only picks among what the provider offers and we
        # accept, and the key must be of that algorithm (no algorithm confusion).
        if not isinstance(algorithm, str) or algorithm not in provider.algorithms:  # a list is unhashable
            raise OidcError("algorithm not accepted")
        if kid is not None and not (isinstance(kid, str) and len(kid) <= 256):
            raise OidcError("bad kid")
        assert self._jwks is not None
        try:
            key = await self._jwks.key(kid)
        except ApiError:
            raise OidcError("no keys from the provider", unavailable=True) from None
        if key is None or key.algorithm_name != algorithm:
            raise OidcError("unknown key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.client_id,
                issuer=accepted_issuers(self.issuer),
                leeway=LEEWAY_SECONDS,
                options={"require": require},
            )
        except jwt.PyJWTError as exc:
            raise OidcError(type(exc).__name__) from None
        return claims

    # What the session keeps

    def user_id(self, claims: dict[str, Any]) -> str:
        value = _printable(claims.get(self.user_claim), MAX_SUB_CHARS)
        if value is None:
            raise OidcError(f"no usable {self.user_claim} claim")
        # Namespaced like jwt users: limits, budgets and logout-all are keyed by user id.
        return f"oidc:{value}"

    def display_name(self, claims: dict[str, Any]) -> str:
        for claim in (self.name_claim, "preferred_username", "email"):
            if (value := _printable(claims.get(claim), MAX_NAME_CHARS)) is not None:
                return value
        return ""

    def logout_url(self, provider: Provider, id_token: str | None) -> str | None:
        """Where the browser ends its session at the provider (RP-Initiated Logout 1.0), if it can."""
        if provider.end_session_endpoint is None:
            return None
        params = {"post_logout_redirect_uri": self.post_logout_redirect_uri, "client_id": self.client_id}
        if id_token and self.logout_hint == "id_token":
            params["id_token_hint"] = id_token
        separator = "&" if urlsplit(provider.end_session_endpoint).query else "?"
        return f"{provider.end_session_endpoint}{separator}{urlencode(params)}"

    # HTTP

    async def _get(self, url: str) -> dict[str, Any]:
        status, document = await self._request("GET", url, {}, None)
        if status != 200 or not isinstance(document, dict):
            raise OidcError(f"status {status}", unavailable=True)
        return document

    async def _token_call(self, url: str, body: str, *, json_answer: bool = True) -> dict[str, Any]:
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        url, headers, body = self._auth.prepare("POST", url, headers, body)
        status, document = await self._request("POST", url, headers, body)
        if status >= 500:
            raise OidcError(f"status {status}", unavailable=True)
        if status != 200:
            error = document.get("error") if isinstance(document, dict) else None
            code = error if isinstance(error, str) and error.replace("_", "").isalnum() and len(error) < 64 else "?"
            raise OidcError(f"refused: {code} (status {status})")
        if not json_answer:
            return {}
        if not isinstance(document, dict):
            raise OidcError("token answer is not a JSON object")
        return document

    async def _request(self, method: str, url: str, headers: dict[str, str], body: str | None) -> tuple[int, object]:
        data = bytearray()
        try:
            with anyio.fail_after(CALL_TIMEOUT_SECONDS):
                async with (
                    self._open_client() as http,
                    http.stream(method, url, headers=headers, content=body) as reply,
                ):
                    async for chunk in reply.aiter_bytes():
                        data += chunk
                        if len(data) > MAX_ANSWER_BYTES:
                            raise OidcError("answer too large", unavailable=True)
                    status = reply.status_code
        except (httpx.HTTPError, TimeoutError) as exc:
            raise OidcError(type(exc).__name__, unavailable=True) from None
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def build_oidc_client(settings: Settings) -> OidcClient:
    """The client `BFF_AUTH=oidc` runs with; `AuthConfigError` naming what is missing or wrong."""
    missing = settings.missing_for_oidc()
    if missing:
        raise AuthConfigError(f"{', '.join(missing)}: required when BFF_AUTH includes oidc")
    assert settings.oidc_issuer and settings.oidc_client_id and settings.public_url
    if settings.cookie_secure and not settings.public_url.startswith("https://"):
        raise AuthConfigError("BFF_PUBLIC_URL: must be https:// (http:// only with BFF_COOKIE_SECURE=false)")
    method = settings.oidc_client_auth or (
        "private_key_jwt" if settings.oidc_private_key_file else "client_secret_basic"
    )
    if method == "private_key_jwt":
        if settings.oidc_private_key_file is None:
            raise AuthConfigError("BFF_OIDC_PRIVATE_KEY_FILE: required for private_key_jwt")
        try:
            pem = settings.oidc_private_key_file.read_text()
        except OSError as exc:
            raise AuthConfigError(f"BFF_OIDC_PRIVATE_KEY_FILE: cannot be read ({exc.strerror})") from None
        headers = {"kid": settings.oidc_private_key_id} if settings.oidc_private_key_id else None
        # Never `claims=`: Authlib keeps and reuses that dict, so every assertion would carry the first
        # jti, and providers refuse an assertion used twice. The audience is the issuer, which every
        # provider accepts (RFC 7523 §3; some refuse the token endpoint's URL).
        key, alg = _signing_key(pem)
        auth = ClientAuth(settings.oidc_client_id, key, PrivateKeyJWT(settings.oidc_issuer, headers=headers, alg=alg))
    else:
        if settings.oidc_client_secret is None:
            raise AuthConfigError(f"BFF_OIDC_CLIENT_SECRET: required for {method}")
        auth = ClientAuth(settings.oidc_client_id, settings.oidc_client_secret.get_secret_value(), method)
    try:
        auth_params = (
            dict(parse_qsl(settings.oidc_auth_params, strict_parsing=True)) if settings.oidc_auth_params else {}
        )
    except ValueError:
        raise AuthConfigError("BFF_OIDC_AUTH_PARAMS: must be a query string like prompt=consent") from None
    return OidcClient(
        issuer=settings.oidc_issuer,
        client_id=settings.oidc_client_id,
        client_auth=auth,
        scopes=settings.oidc_scopes,
        auth_params=auth_params,
        public_url=settings.public_url,
        user_claim=settings.oidc_user_claim,
        name_claim=settings.oidc_name_claim,
        refresh_margin=settings.oidc_refresh_margin_seconds,
        logout_hint=settings.oidc_logout_hint,
        jwks_max_age=settings.jwks_max_age_seconds,
    )


def _signing_key(pem: str) -> tuple[str | ECKey, str]:
    """The client assertion's key, as Authlib takes it, and its algorithm. Authlib imports a PEM text
    as an RSA key whatever it holds (rfc7523 `PrivateKeyJWT.sign`), so an EC key given as text failed
    every token call (each sign-in answered 500): it goes as a joserfc key instead. Keys that could
    sign neither RS256 nor ES256 are refused at startup rather than at every sign-in."""
    try:
        private = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise AuthConfigError("BFF_OIDC_PRIVATE_KEY_FILE: not an unencrypted PEM private key") from None
    if isinstance(private, RSAPrivateKey):
        return pem, "RS256"
    if isinstance(private, EllipticCurvePrivateKey) and isinstance(private.curve, SECP256R1):
        return ECKey.import_key(pem), "ES256"
    raise AuthConfigError("BFF_OIDC_PRIVATE_KEY_FILE: must be an RSA key (RS256) or an EC P-256 key (ES256)")
