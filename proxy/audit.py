"""The audit log: one structured line per session event (bff-security R25).

Events: `session.created`, `session.renewed` (a sign-in replaced the browser's session with a new id),
`session.revoked` (logout, logout-all, idle or absolute expiry), `token.minted`, `relay.start` and
`relay.end`. Each line names the session by `sid_hash`, a keyed hash of the session's storage key, so
lines of one session can be followed without the log ever holding anything that opens the session:
not the raw id, not the cookie, not the storage key, not a token or a signing key. Session events are
also counted in the `bff_session_events` metric, and request summary lines name the user by
`user_hash`, a keyed hash of the user id made with the same key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from starlette.requests import HTTPConnection

from proxy.metrics import Metrics

logger = logging.getLogger("proxy.audit")

# Its own derivation label, so the audit key is never the key that signs cookies (bff-security R28).
AUDIT_KEY_LABEL = b"workflow-bff.audit-session-hash"
SID_HASH_CHARS = 16
USER_HASH_DOMAIN = b"user:"
# Counted in `bff_session_events` by what follows the prefix: created, renewed, revoked.
SESSION_EVENT_PREFIX = "session."


class AuditLog:
    def __init__(self, secret: str, *, metrics: Metrics | None = None) -> None:
        # Keyed by the newest signing key: without it the hashes cannot be linked to storage keys.
        # A key rotation therefore starts new hashes for sessions that outlive it.
        self._key = hashlib.sha256(AUDIT_KEY_LABEL + secret.encode()).digest()
        self._metrics = metrics

    def sid_hash(self, session_key: str) -> str:
        return hmac.new(self._key, session_key.encode(), hashlib.sha256).hexdigest()[:SID_HASH_CHARS]

    def user_hash(self, user_id: str) -> str:
        """The user as request summary lines name them: linkable across requests, not reversible.
        A separate input domain, so a user hash never equals a session hash."""
        return hmac.new(self._key, USER_HASH_DOMAIN + user_id.encode(), hashlib.sha256).hexdigest()[:SID_HASH_CHARS]

    def record(
        self,
        event: str,
        session_key: str,
        *,
        user_id: str,
        connection: HTTPConnection | None = None,
        **details: object,
    ) -> None:
        fields: dict[str, object] = {
            "audit": event,
            "sid_hash": self.sid_hash(session_key),
            "user": user_id,
            **details,
        }
        if connection is not None and connection.client is not None:
            fields["client_ip"] = connection.client.host
        logger.info(event, extra=fields)
        if self._metrics is not None and event.startswith(SESSION_EVENT_PREFIX):
            self._metrics.sessions.labels(event.removeprefix(SESSION_EVENT_PREFIX)).inc()
