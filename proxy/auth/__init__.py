"""Sign-in methods (CONTRACT B1), one module each behind one interface (`Authenticator`).

`BFF_AUTH` names the enabled ones; `build_authenticators` turns the settings into them and fails at
start-up, naming the variable, when one cannot work with the configuration it was given.
"""

from __future__ import annotations

from limits.aio.storage import Storage as LimitsStorage

from proxy.auth.base import AuthConfigError, Authenticator
from proxy.auth.guest import GuestAuthenticator
from proxy.auth.jwt import JwtAuthenticator
from proxy.auth.oidc import OidcClient, build_oidc_client
from proxy.auth.password import PasswordAuthenticator
from proxy.settings import Settings
from proxy.throttle import LoginThrottle, WindowFailureCounter


def build_authenticators(settings: Settings, limits_storage: LimitsStorage) -> list[Authenticator]:
    """`limits_storage` keeps the password throttle's counters (shared when it is Redis)."""
    authenticators: list[Authenticator] = []
    if "guest" in settings.auth:
        authenticators.append(GuestAuthenticator())
    if "jwt" in settings.auth:
        if settings.jwt_secret is None and not settings.jwks_url:
            raise AuthConfigError("BFF_JWT_SECRET or BFF_JWKS_URL: required when BFF_AUTH includes jwt")
        authenticators.append(
            JwtAuthenticator(
                secret=settings.jwt_secret.get_secret_value() if settings.jwt_secret else None,
                jwks_url=settings.jwks_url,
                jwks_max_age=settings.jwks_max_age_seconds,
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
            )
        )
    if "password" in settings.auth:
        if settings.users_file is None:
            raise AuthConfigError("BFF_USERS_FILE: required when BFF_AUTH includes password")
        window = settings.login_failure_window_seconds
        throttle = LoginThrottle(
            per_ip=WindowFailureCounter(limits_storage, "ip", settings.login_failures_per_ip, window),
            per_user=WindowFailureCounter(limits_storage, "user", settings.login_failures_per_user, window),
            per_account=WindowFailureCounter(limits_storage, "account", settings.login_failures_per_account, window),
        )
        authenticators.append(PasswordAuthenticator(settings.users_file, throttle))
    return authenticators


def build_oidc(settings: Settings) -> OidcClient | None:
    """`oidc` signs in through the provider's pages, not with one request, so it is no `Authenticator`:
    its client is handed to the routes (proxy/routes/oidc.py) and to the session manager."""
    return build_oidc_client(settings) if "oidc" in settings.auth else None


__all__ = ["AuthConfigError", "Authenticator", "build_authenticators", "build_oidc"]
