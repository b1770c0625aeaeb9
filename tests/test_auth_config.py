"""Sign-in configuration is checked at start-up: a method that cannot work stops `serve` with the
name of the variable to fix, and never with a traceback or a secret in the message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from tests.identity import JWT_SECRET
from tests.servers import ROOT, TEST_API_KEY, proxy_env


def serve(**overrides: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BFF_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--port", "0"],
        # PYTHONPATH: this checkout's code, whatever the venv has installed (the cwd is not the root).
        env={**clean, **proxy_env("http://127.0.0.1:9"), **overrides, "PYTHONPATH": str(ROOT)},
        cwd=ROOT / "tests",  # no .env here
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"BFF_AUTH": "jwt"}, "BFF_JWT_SECRET or BFF_JWKS_URL"),
        ({"BFF_AUTH": "guest,password"}, "BFF_USERS_FILE"),
        ({"BFF_AUTH": "password", "BFF_USERS_FILE": "/nonexistent/users.json"}, "BFF_USERS_FILE"),
        ({"BFF_AUTH": "jwt", "BFF_JWT_SECRET": "short"}, "BFF_JWT_SECRET"),
        ({"BFF_AUTH": "jwt", "BFF_JWKS_URL": "http://id.example.com/jwks.json"}, "BFF_JWKS_URL"),
        ({"BFF_SESSION_SECRETS": "11507a0e2f5e69d5dfa40a62a1bd7b6ee57e6bcd,too-short-old-key"}, "BFF_SESSION_SECRETS"),
        ({"BFF_AUTH": "oidc"}, "BFF_OIDC_ISSUER"),
        ({"BFF_AUTH": "oidc", "BFF_OIDC_ISSUER": "https://id.example.com"}, "BFF_OIDC_CLIENT_SECRET"),
        ({"BFF_OIDC_ISSUER": "http://id.example.com"}, "BFF_OIDC_ISSUER"),
        ({"BFF_PUBLIC_URL": "https://tutor.example.com/app"}, "BFF_PUBLIC_URL"),
        (
            {
                "BFF_AUTH": "oidc",
                "BFF_OIDC_ISSUER": "https://id.example.com",
                "BFF_OIDC_CLIENT_ID": "bff",
                "BFF_OIDC_PRIVATE_KEY_FILE": "/nonexistent/key.pem",
                "BFF_PUBLIC_URL": "https://tutor.example.com",
            },
            "BFF_OIDC_PRIVATE_KEY_FILE",
        ),
    ],
)
def test_a_sign_in_method_that_cannot_work_stops_start_up(overrides: dict[str, str], named: str) -> None:
    result = serve(**overrides)

    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert "Traceback" not in result.stderr
    assert TEST_API_KEY not in result.stderr + result.stdout


def test_a_corrupt_users_file_stops_start_up(tmp_path: Path) -> None:
    users = tmp_path / "users.json"
    users.write_text('{"users": {"alice": {"hash": "plaintext-password"}}}')

    result = serve(BFF_AUTH="password", BFF_USERS_FILE=str(users))

    assert result.returncode == 2
    assert "BFF_USERS_FILE" in result.stderr and "alice" in result.stderr
    assert "plaintext-password" not in result.stderr


def test_the_jwt_secret_is_never_echoed_in_an_error(tmp_path: Path) -> None:
    result = serve(BFF_AUTH="jwt,password", BFF_JWT_SECRET=JWT_SECRET)

    assert result.returncode == 2
    assert JWT_SECRET not in result.stderr + result.stdout


def test_a_private_key_that_can_sign_neither_rs256_nor_es256_stops_start_up(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())  # ES384: signing it as ES256 failed every sign-in
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    key_file = tmp_path / "key.pem"
    key_file.write_text(pem)

    result = serve(
        BFF_AUTH="oidc",
        BFF_OIDC_ISSUER="https://id.example.com",
        BFF_OIDC_CLIENT_ID="bff",
        BFF_OIDC_PRIVATE_KEY_FILE=str(key_file),
        BFF_PUBLIC_URL="https://tutor.example.com",
    )

    assert result.returncode == 2, result.stderr
    assert "BFF_OIDC_PRIVATE_KEY_FILE" in result.stderr and "P-256" in result.stderr
    assert "Traceback" not in result.stderr
    assert pem.splitlines()[1] not in result.stderr + result.stdout
