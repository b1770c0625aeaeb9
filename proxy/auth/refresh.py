"""Keeping an OpenID Connect session's provider tokens fresh (issue 18: refresh).

When the provider issued a refresh token, the session's tokens are refreshed shortly before the
access token expires (`BFF_OIDC_REFRESH_MARGIN_SECONDS`), by the first request that finds them due.
At most one refresh per session runs at a time across every replica: a lease in the storage is the
lock. It is required, not an optimisation: providers rotate refresh tokens, and the reuse of a
rotated one (two replicas refreshing at once) revokes the whole grant, signing the user out.

A refresh the provider refuses (the user was disabled, the grant revoked) ends the session: the
provider no longer vouches for the user. A provider that cannot be reached does not: the session
goes on while its access token is valid, and after that answers 503 until the provider is back.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid

import anyio

from proxy.auth.oidc import IdpTokens, OidcClient, OidcError, index_hash
from proxy.errors import AUTH_UNAVAILABLE, ApiError
from proxy.sealing import SealError, TokenSealer
from proxy.storage import SessionRecord, Storage

logger = logging.getLogger("proxy.auth.oidc")

# Longer than one refresh can take (`CALL_TIMEOUT_SECONDS`, plus the ID token's keys), so the lock
# never lapses under a refresh that is still running; a crashed replica's lock frees itself after it.
LOCK_SECONDS = 30.0
# A request that finds another one refreshing, with the access token already expired, waits this long
# for the new tokens, looking every `POLL_SECONDS`.
WAIT_SECONDS = 5.0
POLL_SECONDS = 0.25


def unavailable() -> ApiError:
    return AUTH_UNAVAILABLE.error("Sign-in cannot be renewed right now. Try again shortly.", retry_after=5)


class TokenRefresher:
    def __init__(self, client: OidcClient, storage: Storage, sealer: TokenSealer) -> None:
        self._client = client
        self._storage = storage
        self._sealer = sealer
        self.margin = client.refresh_margin

    def due(self, record: SessionRecord, now: float) -> bool:
        # idp_expires_at is 0 when there is nothing to refresh (no refresh token was issued).
        return bool(record.idp_expires_at) and now >= record.idp_expires_at - self.margin

    async def fresh(self, record: SessionRecord) -> SessionRecord | None:
        """`record` with tokens that are not due, or None when the provider refused to refresh them
        (the session must end). Raises 503 `auth_unavailable` when it cannot tell and the access
        token has expired."""
        lock, holder = f"oidc-refresh:{record.key}", uuid.uuid4().hex
        if not await self._storage.acquire_lease(lock, holder, 1, LOCK_SECONDS):
            return await self._refreshed_elsewhere(record)
        try:
            # Re-read under the lock: another replica may have refreshed since this request read it.
            current = await self._storage.get_session(record.key)
            if current is None or not self.due(current, time.time()):
                return current
            return await self._refresh(current)
        finally:
            await self._storage.release_lease(lock, holder)

    async def _refreshed_elsewhere(self, record: SessionRecord) -> SessionRecord | None:
        if time.time() < record.idp_expires_at:
            return record  # still valid: serve with it while the other request refreshes
        with anyio.move_on_after(WAIT_SECONDS):
            while True:
                await anyio.sleep(POLL_SECONDS)
                current = await self._storage.get_session(record.key)
                if current is None or current.idp_expires_at != record.idp_expires_at:
                    return current
        raise unavailable()

    async def _refresh(self, record: SessionRecord) -> SessionRecord | None:
        try:
            tokens = IdpTokens.loads(self._sealer.open(record.idp_tokens, bound_to=record.key))
        except (SealError, ValueError, KeyError, TypeError):
            logger.warning("oidc refresh impossible: tokens do not open")
            return None
        if tokens.refresh_token is None:
            return record
        try:
            answer = await self._client.refresh(tokens.refresh_token)
            fresh = self._client.tokens_from(answer, previous=tokens)
            if "id_token" in answer:
                # A new ID token must be about the same user (OpenID Connect Core §12.2); it has no nonce.
                claims = await self._client.verify_id_token(fresh.id_token, nonce=None)
                if index_hash(self._client.issuer, claims["sub"]) != record.idp_sub_hash:
                    raise OidcError("refreshed ID token for another subject")
        except OidcError as exc:
            if exc.unavailable:
                logger.warning("oidc refresh failed; will retry", extra={"reason": exc.reason})
                if time.time() < record.idp_expires_at:
                    return record
                raise unavailable() from None
            logger.info("oidc refresh refused", extra={"reason": exc.reason})
            return None
        sealed = self._sealer.seal(fresh.dumps(), bound_to=record.key)
        expires_at = fresh.expires_at if fresh.refresh_token else 0.0
        if not await self._storage.update_idp_tokens(record.key, sealed, expires_at):
            return None  # signed out meanwhile
        return dataclasses.replace(record, idp_tokens=sealed, idp_expires_at=expires_at)
