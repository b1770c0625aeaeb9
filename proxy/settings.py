"""Configuration: every `BFF_*` environment variable (CONTRACT B8), also read from `.env`.

Validation runs when the settings are built, so a bad value stops the process at start-up with the
name of the variable at fault (see `describe_errors`). Settings import no domain code: the syntaxes
they check are defined here (storage URLs, which proxy/storage opens) or in a leaf (proxy/limits.py).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from proxy.limits import DEFAULT_RATE_LIMITS, RateLimitConfigError, parse_rate_limits

AuthMethod = Literal["guest", "jwt", "password", "oidc"]
Mode = Literal["token", "relay"]

MIN_SECRET_CHARS = 32
# A key's character-by-character entropy times its length: 32 random hex characters measure ~120
# bits, 32 random URL-safe ones ~145; "a" * 32 measures 0, a word repeated ~90.
MIN_SECRET_BITS = 100
PLACEHOLDER_MARKS = ("replace_me", "replace-me", "replaceme", "changeme", "change_me", "change-me", "your-", "your_")
HOW_TO_GENERATE = (
    'generate one with `python -m proxy secret` (or: python -c "import secrets; print(secrets.token_urlsafe(48))")'
)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Standard Webhooks' secrets: the key's bytes in base64 after this prefix.
WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
MIN_WEBHOOK_KEY_BYTES = 24  # the least Standard Webhooks allows
HOST_PATTERN = re.compile(r"(\*\.)?[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
MEMORY_SCHEMES = ("memory",)
REDIS_SCHEMES = ("redis", "rediss")


def secret_problem(value: str) -> str | None:
    """Why `value` cannot be a signing key, if it cannot: a placeholder, or too little entropy to be
    anything but typed by hand."""
    if any(mark in value.lower() for mark in PLACEHOLDER_MARKS):
        return "is a placeholder"
    counts = Counter(value)
    bits = sum(n * math.log2(len(value) / n) for n in counts.values())
    if bits < MIN_SECRET_BITS:
        return f"has too little entropy (about {bits:.0f} bits; at least {MIN_SECRET_BITS} needed)"
    return None


def storage_scheme(url: str) -> str:
    """The backend a storage URL (`BFF_STORAGE_URL`) names; ValueError for one we do not support."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme not in MEMORY_SCHEMES + REDIS_SCHEMES:
        raise ValueError(f"unsupported storage URL scheme {scheme!r}: use memory://, redis:// or rediss://")
    if scheme in MEMORY_SCHEMES and rest:
        raise ValueError("memory:// takes nothing after the scheme")
    if scheme in REDIS_SCHEMES and not rest.rpartition("@")[2].split("/", 1)[0]:
        raise ValueError(f"{scheme}:// needs a host, as in {scheme}://redis:6379/0")
    return scheme


def _split_commas(value: object) -> object:
    """Comma-separated env values become lists (pydantic-settings would expect JSON)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BFF_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    upstream_url: str = "https://aitutor-api.vercel.app"
    api_key: SecretStr | None = None
    session_secrets: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    workflows: str = ""
    workflows_file: Path | None = None
    auth: Annotated[list[AuthMethod], NoDecode] = Field(default_factory=list)
    modes: Annotated[list[Mode], NoDecode] = Field(default_factory=lambda: list[Mode](["token", "relay"]))

    storage_url: str = "memory://"
    # Per-user limits in slowapi / `limits` syntax: name=limit[,limit...] joined by ";".
    rate_limits: str = DEFAULT_RATE_LIMITS
    max_concurrent_streams: int = Field(default=3, ge=1, le=10_000)
    daily_output_chars: int = Field(default=0, ge=0)
    # Guests' per-user limits, stream cap and budget: shared by every guest of one client IP ("ip"),
    # or each guest session its own ("session": anyone can then multiply them by signing in again).
    guest_limits: Literal["ip", "session"] = "ip"
    # Pre-minted stream tokens kept ready per process (proxy/token_pool.py); 0 = mint on demand.
    token_pool: int = Field(default=0, ge=0, le=100)
    # On SIGTERM, running streams get this long to finish before they are ended with an in-band error;
    # keep it below uvicorn's graceful-shutdown timeout (30 s) and the orchestrator's grace period.
    drain_seconds: float = Field(default=25.0, gt=0, le=600)
    # Stream slots are leases renewed while the stream runs: a crashed replica's slots free up within this.
    stream_lease_seconds: float = Field(default=30.0, ge=1, le=3600)
    max_body_bytes: int = Field(default=65536, ge=256, le=16 * 1024 * 1024)
    max_input_chars: int = Field(default=16000, ge=1, le=1_000_000)
    token_ttl: int = Field(default=60, ge=1, le=300)
    max_stream_seconds: float = Field(default=300.0, gt=0, le=3600)
    # Runs (CONTRACT C1, C5): a relayed answer outlives its connection, so a reload can resume it.
    # Its log is kept this long after it ended ...
    resume_seconds: float = Field(default=120.0, ge=0, le=86400)
    # ... and with nobody following it, it goes on this long waiting for one (0: it stops at once).
    resume_grace_seconds: float = Field(default=20.0, ge=0, le=3600)
    # A follower (a response) that cannot take data this long is dropped; the run goes on.
    send_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    # The most bytes of one answer: a longer stream ends with an in-band error, a longer /run answer
    # is refused (502 answer_too_large). It bounds what a run keeps in memory and in Redis.
    max_answer_bytes: int = Field(default=1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    # Circuit breaker: after this many consecutive connection failures, timeouts or 502-504 answers,
    # upstream calls fail fast with 503 upstream_unavailable for the cooldown.
    upstream_failure_threshold: int = Field(default=5, ge=1, le=1000)
    upstream_cooldown_seconds: float = Field(default=10.0, gt=0, le=600)
    # Tracing is configured by the standard OTEL_* variables (proxy/tracing/). Spans carry no user id
    # unless this is "hashed": then `enduser.pseudo.id`, a keyed hash of it (key from the newest
    # session secret), so one user's answers can be told apart without saying who they are.
    trace_user: Literal["off", "hashed"] = "off"
    # Peers (IPs/CIDRs) whose trace context (`traceparent`) is continued: an app server or a gateway
    # that sets its own. Not BFF_TRUSTED_PROXIES: a load balancer believed for the client's address
    # usually passes a browser's trace headers straight on.
    trace_trusted: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Serve /metrics on this port only (a second listener), never on the public one.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Connections from the network (proxy/server_protocol.py): a request's headers must arrive within
    # this long and be at most this large, its body within this long after them; at most this many
    # connections at once (503 beyond).
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    body_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    max_header_bytes: int = Field(default=65536, ge=1024, le=1024 * 1024)
    max_connections: int = Field(default=4096, ge=16, le=1_000_000)
    # Host names the service answers for (`*.example.com` for subdomains); empty: any, with a warning.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    cookie_secure: bool = True
    cookie_samesite: Literal["strict", "lax"] = "strict"
    session_idle_seconds: int = Field(default=1800, ge=1)
    session_max_seconds: int = Field(default=86400, ge=1)

    # Sign-in (CONTRACT B1): `jwt` needs a secret or a JWKS URL, `password` a users file.
    jwt_secret: SecretStr | None = None
    jwks_url: str | None = None
    # How long fetched JWKS keys are used before they are refreshed (in the background).
    jwks_max_age_seconds: float = Field(default=900.0, ge=1, le=86400)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    users_file: Path | None = None
    # Failed password sign-ins allowed within the window, then 429 (proxy/throttle.py): per account from
    # one address, per account from anywhere, and per address (one that is clearly attacking).
    login_failures_per_user: int = Field(default=5, ge=1, le=1000)
    login_failures_per_account: int = Field(default=20, ge=1, le=100_000)
    login_failures_per_ip: int = Field(default=100, ge=1, le=100_000)
    login_failure_window_seconds: int = Field(default=900, ge=1, le=86400)

    # OpenID Connect sign-in (CONTRACT C2, proxy/auth/oidc.py). The issuer is compared byte for byte
    # with the one discovery answers (some end in "/"), so it is kept exactly as given.
    oidc_issuer: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret: SecretStr | None = None
    # private_key_jwt instead of a secret: a PEM private key (RS256 or ES256) and the kid registered with it.
    oidc_private_key_file: Path | None = None
    oidc_private_key_id: str | None = None
    # Default: private_key_jwt with a key file, else client_secret_basic.
    oidc_client_auth: Literal["client_secret_basic", "client_secret_post", "private_key_jwt"] | None = None
    oidc_scopes: str = "openid profile email"
    # Extra authorization parameters, as a query string: "prompt=consent", "access_type=offline".
    oidc_auth_params: str = ""
    # The origin the browser sees (https://tutor.example.com): the redirect URI is <it>/auth/callback.
    public_url: str | None = None
    oidc_user_claim: str = "sub"
    oidc_name_claim: str = "name"
    # The provider's tokens are refreshed this long before its access token expires.
    oidc_refresh_margin_seconds: float = Field(default=60.0, ge=0, le=3600)
    # What the RP-initiated logout URL identifies the session by: the ID token (a hint; providers then
    # usually skip their confirmation page) or only the client id.
    oidc_logout_hint: Literal["id_token", "client_id"] = "id_token"

    # Run-end webhooks (CONTRACT C5, docs/events.md): a signed JSON event POSTed here when a run ends.
    events_url: str | None = None
    events_secret: SecretStr | None = None  # `whsec_<base64>`, or a long random string
    events_include_text: bool = False  # the answer's text in the event
    # One delivery attempt's whole time; a failed one is retried after this long, doubling each time
    # (up to an hour, with jitter), until this many attempts were made; at most this many wait.
    events_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    events_retry_seconds: float = Field(default=5.0, gt=0, le=3600)
    events_max_attempts: int = Field(default=12, ge=1, le=100)
    events_max_pending: int = Field(default=10_000, ge=1, le=1_000_000)
    # ... and at most this many bytes of them, in memory and in the outbox (with the text on, an event
    # is as large as its answer: without a bound, a receiver's outage would fill Redis).
    events_max_pending_bytes: int = Field(default=64 * 1024 * 1024, ge=1024 * 1024, le=4 * 1024**3)

    _split = field_validator(
        "session_secrets",
        "auth",
        "modes",
        "allowed_origins",
        "trusted_proxies",
        "trace_trusted",
        "allowed_hosts",
        mode="before",
    )(_split_commas)

    @field_validator("upstream_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("session_secrets")
    @classmethod
    def _secrets_long_enough(cls, value: list[SecretStr]) -> list[SecretStr]:
        for position, secret in enumerate(value, start=1):
            key = secret.get_secret_value()
            if len(key) < MIN_SECRET_CHARS:
                raise ValueError(f"key {position} is shorter than {MIN_SECRET_CHARS} characters; {HOW_TO_GENERATE}")
            if (problem := secret_problem(key)) is not None:
                raise ValueError(f"key {position} {problem}; {HOW_TO_GENERATE}")
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _jwt_secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        # RFC 7518 §3.2: an HS256 key must be at least as long as the hash (256 bits).
        if len(value.get_secret_value().encode()) < MIN_SECRET_CHARS:
            raise ValueError(f"must be at least {MIN_SECRET_CHARS} bytes (HS256 needs a 256-bit key)")
        if (problem := secret_problem(value.get_secret_value())) is not None:
            raise ValueError(f"{problem}; use the secret your identity provider signs with")
        return value

    @field_validator("api_key")
    @classmethod
    def _api_key_not_a_placeholder(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and any(mark in value.get_secret_value().lower() for mark in PLACEHOLDER_MARKS):
            raise ValueError("is a placeholder: set the upstream API key (sk_...)")
        return value

    @field_validator("jwks_url", "oidc_issuer", "public_url", "events_url")
    @classmethod
    def _over_https(cls, value: str | None) -> str | None:
        # Keys fetched, and a browser redirected, over plain http could be swapped in transit; plain
        # http only on loopback, for development and the tests.
        parts = urlsplit(value or "")
        if value is None or (parts.scheme == "https" and parts.hostname):
            return value
        if parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS:
            return value
        raise ValueError("must be an https:// URL (http:// only for localhost)")

    @field_validator("events_secret")
    @classmethod
    def _webhook_key(cls, value: SecretStr | None) -> SecretStr | None:
        secret = "" if value is None else value.get_secret_value()
        if not secret.startswith(WEBHOOK_SECRET_PREFIX):
            if value is not None and (len(secret) < MIN_SECRET_CHARS or secret_problem(secret)):
                raise ValueError(
                    f"must be {WEBHOOK_SECRET_PREFIX}<base64 of at least {MIN_WEBHOOK_KEY_BYTES} random bytes>, "
                    f"or a random string of at least {MIN_SECRET_CHARS} characters; {HOW_TO_GENERATE}"
                )
            return value
        try:
            key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX), validate=True)
        except binascii.Error:
            raise ValueError(f"what follows {WEBHOOK_SECRET_PREFIX} is not base64") from None
        if len(key) < MIN_WEBHOOK_KEY_BYTES:
            raise ValueError(f"must hold at least {MIN_WEBHOOK_KEY_BYTES} bytes after {WEBHOOK_SECRET_PREFIX}")
        return value

    @field_validator("public_url")
    @classmethod
    def _origin_only(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value.rstrip("/")).path:
            raise ValueError("must be an origin like https://tutor.example.com, without a path")
        return value.rstrip("/") if value is not None else None

    @field_validator("modes")
    @classmethod
    def _modes_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one of: token, relay")
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _exact_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin == "*" or not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
                raise ValueError(f"{origin!r} is not an exact origin like https://app.example.com")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        for host in value:
            if not HOST_PATTERN.fullmatch(host):
                raise ValueError(f"{host!r} is not a host name like app.example.com or *.example.com (no port)")
        return value

    @field_validator("trusted_proxies", "trace_trusted")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR") from None
        return value

    @field_validator("rate_limits")
    @classmethod
    def _rate_limits_parse(cls, value: str) -> str:
        try:
            parse_rate_limits(value)
        except RateLimitConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("storage_url")
    @classmethod
    def _storage_supported(cls, value: str) -> str:
        storage_scheme(value)  # memory://, redis://host or rediss://host; raises ValueError otherwise
        return value

    def missing_for_serve(self) -> list[str]:
        """The settings `serve` cannot run without, by environment-variable name."""
        missing = []
        if self.api_key is None or not self.api_key.get_secret_value():
            missing.append("BFF_API_KEY")
        if not self.session_secrets:
            missing.append("BFF_SESSION_SECRETS")
        if not self.workflows and self.workflows_file is None:
            missing.append("BFF_WORKFLOWS or BFF_WORKFLOWS_FILE")
        if not self.auth:
            missing.append("BFF_AUTH")
        if "jwt" in self.auth and self.jwt_secret is None and not self.jwks_url:
            missing.append("BFF_JWT_SECRET or BFF_JWKS_URL (BFF_AUTH includes jwt)")
        if "password" in self.auth and self.users_file is None:
            missing.append("BFF_USERS_FILE (BFF_AUTH includes password)")
        if "oidc" in self.auth:
            missing += [f"{name} (BFF_AUTH includes oidc)" for name in self.missing_for_oidc()]
        if self.events_url and self.events_secret is None:
            missing.append("BFF_EVENTS_SECRET (BFF_EVENTS_URL is set: events are signed with it)")
        return missing

    def missing_for_oidc(self) -> list[str]:
        missing = []
        if not self.oidc_issuer:
            missing.append("BFF_OIDC_ISSUER")
        if not self.oidc_client_id:
            missing.append("BFF_OIDC_CLIENT_ID")
        if self.oidc_client_secret is None and self.oidc_private_key_file is None:
            missing.append("BFF_OIDC_CLIENT_SECRET or BFF_OIDC_PRIVATE_KEY_FILE")
        if not self.public_url:
            missing.append("BFF_PUBLIC_URL")
        return missing

    def secret_values(self) -> list[str]:
        """Every secret this process holds, for the log redaction filter."""
        secrets = [s.get_secret_value() for s in self.session_secrets]
        if self.api_key is not None:
            secrets.append(self.api_key.get_secret_value())
        password = urlsplit(self.storage_url).password
        if password:
            secrets.append(password)
        if self.jwt_secret is not None:
            secrets.append(self.jwt_secret.get_secret_value())
        if self.oidc_client_secret is not None:
            secrets.append(self.oidc_client_secret.get_secret_value())
        if self.events_secret is not None:
            secrets.append(self.events_secret.get_secret_value())
        return [s for s in secrets if s]


# Comma-separated settings: an item's error names the item, and how items are separated.
LIST_HINTS = {
    "auth": "a comma list of guest, jwt, password, oidc",
    "modes": "a comma list of token, relay",
}


def describe_errors(error: ValidationError) -> list[str]:
    """One line per invalid setting, named as the user set it (`BFF_TOKEN_TTL: ...`), with the value
    at fault where it is no secret."""
    lines = []
    for item in error.errors():
        field = str(item["loc"][0])
        message = item["msg"].removeprefix("Value error, ")
        if field in LIST_HINTS and len(item["loc"]) > 1:  # one item of the list
            message = f"{item['input']!r} is not valid here; use {LIST_HINTS[field]}"
        lines.append(f"BFF_{field.upper()}: {message}")
    return list(dict.fromkeys(lines))


def invalid_fields(error: ValidationError) -> set[str]:
    return {str(item["loc"][0]) for item in error.errors()}
