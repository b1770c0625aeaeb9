"""The command line (CONTRACT B9): configuration errors, `check`, and the `demo` a newcomer runs first."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.emulator import generate_text
from tests.servers import ROOT, TEST_API_KEY, EmulatorControl, ServerProcess, browser, proxy_env


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BFF_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env={**clean, **env},
        cwd=ROOT / "tests",  # no .env here
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_refuses_to_start_without_its_required_settings() -> None:
    result = run_cli("serve", env={})

    assert result.returncode == 2
    for name in ("BFF_API_KEY", "BFF_SESSION_SECRETS", "BFF_WORKFLOWS", "BFF_AUTH"):
        assert name in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"BFF_SESSION_SECRETS": "too-short"}, "BFF_SESSION_SECRETS"),
        ({"BFF_TOKEN_TTL": "301"}, "BFF_TOKEN_TTL"),
        ({"BFF_WORKFLOWS": "tutor"}, "BFF_WORKFLOWS"),
        ({"BFF_WORKFLOWS": "tutor=../../etc"}, "BFF_WORKFLOWS"),
        ({"BFF_AUTH": "magic"}, "BFF_AUTH"),
        ({"BFF_ALLOWED_ORIGINS": "*"}, "BFF_ALLOWED_ORIGINS"),
        ({"BFF_UPSTREAM_URL": "ftp://x"}, "BFF_UPSTREAM_URL"),
    ],
)
def test_a_bad_setting_is_named_at_start_up(override: dict[str, str], message: str) -> None:
    result = run_cli("check", env={**proxy_env("http://127.0.0.1:9"), **override})

    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert TEST_API_KEY not in result.stderr + result.stdout


def test_check_mints_one_test_token_with_the_key(emulator: ServerProcess, upstream: EmulatorControl) -> None:
    result = run_cli("check", env=proxy_env(emulator.url))

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok:")
    [mint] = upstream.requests("mint")
    assert mint["query"]["ttl"] == "1"
    assert "pub_tok_" not in result.stdout + result.stderr


def test_check_reports_a_rejected_key_without_printing_it(emulator: ServerProcess) -> None:
    wrong = "sk_wrong_" + "z" * 30
    result = run_cli("check", env=proxy_env(emulator.url, BFF_API_KEY=wrong))

    assert result.returncode == 2
    assert "upstream_auth_failed" in result.stderr
    assert wrong not in result.stderr + result.stdout


@pytest.fixture(scope="module")
def demo() -> Iterator[ServerProcess]:
    clean = {k: "" for k in os.environ if k.startswith("BFF_")}
    server = ServerProcess(["demo"], clean).start()
    yield server
    server.stop()


def test_the_demo_serves_its_page_with_a_strict_csp(demo: ServerProcess) -> None:
    page = httpx.get(demo.url + "/")
    script = httpx.get(demo.url + "/demo.js")

    assert page.status_code == 200
    assert "workflow-bff demo" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert script.status_code == 200
    assert "/api/chat/" in script.text  # the page relays through the chat route, so it can resume


def test_the_demo_relays_and_mints_without_any_configuration(demo: ServerProcess) -> None:
    with browser(demo.url) as client:
        client.post("/auth/guest").raise_for_status()
        relayed = client.post("/api/workflows/tutor/stream", json={"message": "volcanoes"})
        minted = client.post("/api/token", json={"workflow": "tutor"}).json()
        direct = httpx.post(minted["stream_url"], json={"message": "volcanoes"})

    expected = generate_text("wf_demo_tutor", {"message": "volcanoes"})
    assert relayed.text == expected
    assert minted["stream_url"].startswith(demo.url + "/_emulator/")
    assert direct.text == expected


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('chat_input = "question"\nhistory_input = "question"', "must be different inputs"),
        ('chat_input = "question"\nfixed = { question = "x" }', "none of them fixed"),
        ("history_input = 5", "history_input must be a string"),
    ],
    ids=["history-is-the-chat-input", "chat-input-fixed", "name-not-a-string"],
)
def test_a_workflows_file_that_would_lose_the_users_message_is_refused_at_start_up(
    tmp_path: Path, table: str, message: str
) -> None:
    workflows = tmp_path / "workflows.toml"
    workflows.write_text(f'[workflows.tutor]\nid = "wf_tutor"\n{table}\n')

    result = run_cli(
        "check", env={**proxy_env("http://127.0.0.1:9"), "BFF_WORKFLOWS": "", "BFF_WORKFLOWS_FILE": str(workflows)}
    )

    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
