"""Test identity providers: JWTs signed the ways real providers (and attackers) sign them, a real JWKS
endpoint on a loopback socket whose keys can be rotated, and users files for password sign-in."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from itsdangerous import URLSafeTimedSerializer

from proxy.auth.password import hash_password, save_users
from proxy.sessions import COOKIE_SALT

JWT_SECRET = "test-jwt-hs256-secret-fc93cb07e1ad92898527100e58a1cf1d1e7f65e9"
ISSUER = "https://id.example.test/"
AUDIENCE = "workflow-bff-tests"
PASSWORD = "correct horse battery staple"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass
class SigningKey:
    kid: str
    private: PrivateKey
    algorithm: str

    @classmethod
    def rsa(cls, kid: str) -> SigningKey:
        return cls(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        return cls(kid, ec.generate_private_key(ec.SECP256R1()), "ES256")

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.algorithms.RSAAlgorithm if self.algorithm == "RS256" else jwt.algorithms.ECAlgorithm
        entry: dict[str, Any] = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**entry, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, **claims: Any) -> str:
        return jwt.encode(claims_with_defaults(claims), self.private, self.algorithm, headers={"kid": self.kid})


def claims_with_defaults(claims: dict[str, Any]) -> dict[str, Any]:
    now = int(time.time())
    defaults = {"sub": "user-1", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300}
    return {key: value for key, value in {**defaults, **claims}.items() if value is not None}


def hs256(secret: str = JWT_SECRET, **claims: Any) -> str:
    return jwt.encode(claims_with_defaults(claims), secret, "HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(**claims: Any) -> str:
    """`alg: none`: what a library that trusts the header would accept."""
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims_with_defaults(claims)).encode())}."


def hmac_with(key_material: bytes, kid: str | None = None, **claims: Any) -> str:
    """HS256 "signed" with arbitrary bytes, e.g. a provider's public key: the algorithm-confusion attack.
    Built by hand, because PyJWT itself refuses to use a PEM key as an HMAC secret."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims_with_defaults(claims)).encode())}"
    signature = hmac.new(key_material, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


@dataclass
class JwksServer:
    """A provider's JWKS endpoint on a real loopback socket; `keys` can be replaced (a rotation)."""

    keys: list[SigningKey]
    fetches: int = 0
    # "ok"; "fail" answers 500; "hang" answers nothing until the server stops.
    mode: str = "ok"
    _server: ThreadingHTTPServer | None = field(default=None, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/.well-known/jwks.json"

    def start(self) -> JwksServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.fetches += 1
                if owner.mode == "hang":
                    owner._stopping.wait(60)
                    return
                if owner.mode == "fail":
                    self.send_error(500)
                    return
                body = json.dumps({"keys": [key.jwk() for key in owner.keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@contextmanager
def jwks_server(*keys: SigningKey) -> Iterator[JwksServer]:
    server = JwksServer(list(keys)).start()
    try:
        yield server
    finally:
        server.stop()


def write_users(path: Path, users: dict[str, str]) -> Path:
    save_users(path, {name: hash_password(password) for name, password in users.items()})
    return path


def session_id_of(cookie: str, secret: str) -> str:
    """The raw session id inside a cookie, read with a signing key the test knows."""
    value = URLSafeTimedSerializer(secret, salt=COOKIE_SALT).loads(cookie)
    assert isinstance(value, str)
    return value


def cookie_for(session_id: str, secret: str) -> str:
    """A cookie for `session_id` signed with `secret`, exactly as the service signs its own."""
    return URLSafeTimedSerializer(secret, salt=COOKIE_SALT).dumps(session_id)
