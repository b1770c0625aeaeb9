"""The identity provider's tokens at rest: AES-GCM with keys derived from `BFF_SESSION_SECRETS`.

A session record of an OpenID Connect sign-in holds the IdP's access, refresh and ID tokens. Whoever
reads the storage (a Redis dump, a backup, a replica of the database) must not get them, so they are
sealed before they are written, in memory as in Redis: one code path, tested once.

Each session secret gives one key (HKDF-SHA256 with a label of its own, so the key that seals is never
the key that signs cookies); the newest seals, every one opens, and each sealed value names its key by
a short id. Every write re-seals with the newest key, so rotating `BFF_SESSION_SECRETS` (prepend a new
secret, drop the old one after `BFF_SESSION_MAX_SECONDS`) rotates these keys too. The session's
storage key is the associated data: a sealed value copied into another session's record does not open.
"""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = "v1"
KEY_LABEL = b"workflow-bff.idp-tokens.v1"
NONCE_BYTES = 12


class SealError(ValueError):
    """A sealed value that does not open: another key (retired), another session, or altered."""


def derive_key(secret: str) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=b"workflow-bff", info=KEY_LABEL).derive(secret.encode())


class TokenSealer:
    def __init__(self, secrets_newest_first: list[str]) -> None:
        if not secrets_newest_first:
            raise ValueError("at least one session secret is required")
        keys = [derive_key(secret) for secret in secrets_newest_first]
        self._keys = {hashlib.sha256(key).hexdigest()[:8]: AESGCM(key) for key in keys}
        self._newest = hashlib.sha256(keys[0]).hexdigest()[:8]

    def seal(self, plaintext: bytes, *, bound_to: str) -> str:
        nonce = os.urandom(NONCE_BYTES)  # random 96-bit nonces: far below the 2^32 messages per key limit
        sealed = self._keys[self._newest].encrypt(nonce, plaintext, bound_to.encode())
        return f"{VERSION}.{self._newest}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open(self, value: str, *, bound_to: str) -> bytes:
        version, _, rest = value.partition(".")
        kid, _, data = rest.partition(".")
        aead = self._keys.get(kid)
        if version != VERSION or aead is None:
            raise SealError("sealed with a key this process does not hold")
        try:
            raw = base64.urlsafe_b64decode(data)
            return aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], bound_to.encode())
        except (InvalidTag, ValueError):
            raise SealError("does not open") from None
