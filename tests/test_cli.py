"""The command line (CONTRACT B9): configuration errors, `check`, and the `demo` a newcomer runs first."""

from __future__ import annotations

import os
import socket
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


# A first hour that explains itself: every problem of a configuration, named, in one run


def check_with(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run_cli("check", env={**proxy_env("http://127.0.0.1:9"), **env})


def workflows_file(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "workflows.toml"
    path.write_text(text)
    return {"BFF_WORKFLOWS": "", "BFF_WORKFLOWS_FILE": str(path)}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('# tutors\n[workflow.tutor]\nid = "wf_tutor"\n', ["line 2", "'workflow'", "did you mean [workflows."]),
        ("# nothing configured yet\n", ["no workflow is configured", "[workflows.<alias>]"]),
        ('[workflows.tutor]\nid = "wf_tutor"\nchatinput = "q"\n', ["line 1", "unknown keys: chatinput", "chat_input"]),
        ('[workflows.tutor]\nid = "wf_tutor"\n[limits]\nrelay = 1\n', ["line 3", "'limits'"]),
    ],
    ids=["misspelt-table", "no-workflows", "unknown-key", "unknown-table"],
)
def test_a_workflows_file_with_a_typo_or_no_workflows_stops_start_up_naming_the_file_and_line(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    result = check_with(tmp_path, **workflows_file(tmp_path, text))

    assert result.returncode == 2
    assert "BFF_WORKFLOWS_FILE:" in result.stderr
    assert str(tmp_path / "workflows.toml") in result.stderr
    for words in expected:
        assert words in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "secret",
    ["REPLACE_ME_with_at_least_32_random_characters", "a" * 32, "passwordpasswordpasswordpassword"],
    ids=["shipped-placeholder", "one-character", "a-word-repeated"],
)
def test_placeholder_and_guessable_session_secrets_are_refused_saying_how_to_make_one(
    tmp_path: Path, secret: str
) -> None:
    result = check_with(tmp_path, BFF_SESSION_SECRETS=secret)

    assert result.returncode == 2
    assert "BFF_SESSION_SECRETS: key 1" in result.stderr
    assert "python -m proxy secret" in result.stderr
    assert secret not in result.stderr


def test_the_secret_command_makes_a_key_serve_accepts(tmp_path: Path, emulator: ServerProcess) -> None:
    made = run_cli("secret", env={})
    key = made.stdout.strip()

    assert made.returncode == 0
    assert len(key) >= 48
    assert run_cli("check", env=proxy_env(emulator.url, BFF_SESSION_SECRETS=key)).returncode == 0


def test_every_problem_of_a_broken_configuration_is_reported_in_one_run(tmp_path: Path) -> None:
    result = run_cli(
        "check",
        env={
            "BFF_SESSION_SECRETS": "REPLACE_ME_with_at_least_32_random_characters",
            "BFF_AUTH": "guests",
            "BFF_RATE_LIMITS": "mint=30/minute,relay=20/minute",
            "BFF_WORKFLOWS": "tutor=wf_1;math=wf_2",
            "BFF_TOKEN_TTL": "900",
        },
    )

    assert result.returncode == 2
    lines = result.stderr.splitlines()[1:]
    named = [line.split(":", 1)[0] for line in lines]
    assert named == [
        "BFF_SESSION_SECRETS",
        "BFF_AUTH",
        "BFF_RATE_LIMITS",
        "BFF_TOKEN_TTL",
        "BFF_API_KEY",
        "BFF_WORKFLOWS",
    ]
    # Each says what is wrong with the value as written, and how values are separated.
    assert "'guests'" in result.stderr and "comma list" in result.stderr
    assert "separate the limits of different names with ';'" in result.stderr
    assert "separate workflows with ','" in result.stderr
    assert "Value error" not in result.stderr


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ("foo=1/minute", "'foo' is not a limit name (use login, mint, relay)"),
        ("mint=lots", "not a limit like 30/minute"),
    ],
)
def test_a_rate_limit_typo_says_what_names_and_syntax_are_accepted(tmp_path: Path, limits: str, expected: str) -> None:
    result = check_with(tmp_path, BFF_RATE_LIMITS=limits)

    assert result.returncode == 2
    assert "BFF_RATE_LIMITS: " in result.stderr
    assert expected in result.stderr


def test_check_names_an_unreachable_upstream_and_storage_with_their_causes(tmp_path: Path) -> None:
    result = check_with(tmp_path, BFF_UPSTREAM_URL="http://127.0.0.1:1", BFF_STORAGE_URL="redis://127.0.0.1:1/0")

    assert result.returncode == 2
    assert "BFF_STORAGE_URL: cannot reach the storage" in result.stderr
    assert "127.0.0.1:1" in result.stderr
    assert "BFF_UPSTREAM_URL" in result.stderr and "ConnectError" in result.stderr
    assert TEST_API_KEY not in result.stderr + result.stdout


def test_a_busy_port_is_named_with_the_way_out(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("emulator", "--port", str(port), env={"BFF_API_KEY": TEST_API_KEY})

    assert result.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in result.stderr
    assert "--port" in result.stderr


def test_the_emulator_refuses_an_empty_key_as_serve_does() -> None:
    result = run_cli("emulator", env={"BFF_API_KEY": ""})

    assert result.returncode == 2
    assert "BFF_API_KEY: required" in result.stderr


def test_help_shows_defaults_and_where_configuration_comes_from_and_version_exists() -> None:
    top = run_cli("--help", env={})
    serve_help = run_cli("serve", "--help", env={})
    version = run_cli("--version", env={})

    assert "BFF_*" in top.stdout and ".env" in top.stdout
    assert "(default: 8000)" in serve_help.stdout and "(default: 127.0.0.1)" in serve_help.stdout
    assert version.stdout.startswith("workflow-bff ") and version.returncode == 0


def test_serve_answers_its_root_with_what_it_is_and_nothing_secret(proxy: ServerProcess) -> None:
    response = httpx.get(proxy.url + "/")

    assert response.status_code == 200
    body = response.json()
    assert body["service"] == "workflow-bff"
    assert body["openapi"] == "/openapi.json"
    assert TEST_API_KEY not in response.text


def test_a_csrf_refusal_is_logged_with_its_code(proxy: ServerProcess) -> None:
    refused = httpx.post(proxy.url + "/auth/guest", headers={"X-Request-ID": "csrf-refused"})

    assert refused.status_code == 403
    line = proxy.wait_for_log(lambda e: e.get("message") == "request end" and e.get("request_id") == "csrf-refused")
    assert (line["status"], line["end"]) == (403, "refused:csrf_failed")


def test_the_installed_entry_point_names_itself() -> None:
    entry_point = Path(sys.executable).parent / "workflow-bff"
    if not entry_point.exists():
        pytest.skip("workflow-bff is not installed in this environment (make test installs it)")

    result = subprocess.run([str(entry_point), "--help"], capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == 0
    assert result.stdout.startswith("usage: workflow-bff ")


@pytest.mark.parametrize("command", [("usage",), ("sessions", "list", "--user", "someone")])
def test_the_operator_commands_name_a_bad_setting_without_quoting_it(command: tuple[str, ...]) -> None:
    secret = "x9Lq" + "7" * 40 + "LEAKED"  # a valid session secret beside an invalid one
    env = {
        "BFF_SESSION_SECRETS": f"{secret},short",
        "BFF_EVENTS_SECRET": "tooShortLEAKED",
        "BFF_EVENTS_URL": "http://hooks.example.com/x?token=LEAKED",
    }
    result = run_cli(*command, env=env)
    assert result.returncode == 2
    assert "BFF_EVENTS_URL" in result.stderr and "BFF_EVENTS_SECRET" in result.stderr
    assert "LEAKED" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw-SECRET@localhost:notaport/0",
        "redis://[::1",
        "redis://localhost:6379/0?socket_timeout=abc",
        "rediss://:pw-SECRET@localhost:6379/0?ssl_cert_reqs=bogus",
    ],
)
def test_the_operator_commands_name_a_storage_url_they_cannot_use_in_one_line(url: str) -> None:
    result = run_cli("usage", env={"BFF_STORAGE_URL": url})
    assert result.returncode == 2
    assert result.stderr.startswith("error: BFF_STORAGE_URL:") and len(result.stderr.splitlines()) == 1
    assert "SECRET" not in result.stderr and "Traceback" not in result.stderr
