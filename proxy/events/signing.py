"""Standard Webhooks signing (standardwebhooks.com, as Svix and OpenAI sign): the receiver checks
`v1,<base64 HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>")>` with the shared secret,
and refuses a timestamp far from its clock, so a captured request cannot be replayed later.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from proxy.settings import WEBHOOK_SECRET_PREFIX


def webhook_key(secret: str) -> bytes:
    """The HMAC key a secret stands for: the bytes a `whsec_<base64>` secret encodes (the spec's
    form), or the secret's own UTF-8 bytes."""
    if secret.startswith(WEBHOOK_SECRET_PREFIX):
        return base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX))
    return secret.encode()


def signature(key: bytes, event_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{event_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(key: bytes, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one delivery attempt: the same id on every attempt (receivers dedupe by it),
    the attempt's own timestamp, so a retry hours later is still inside the receiver's window."""
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, event_id, timestamp, body),
    }
