"""Every upstream failure maps to its CONTRACT B6 status and code, whatever shape its error body has."""

from __future__ import annotations

import socket

import httpx
import pytest

from proxy.upstream.client import MINT_ATTEMPTS
from tests.servers import TEST_API_KEY, EmulatorControl, ServerProcess, browser, start_proxy

SHAPES = ["flat", "nested", "text"]
MAPPING = [
    (401, 502, "upstream_auth_failed"),
    (402, 402, "upstream_out_of_credits"),
    (404, 404, "workflow_not_found"),
    (429, 503, "upstream_rate_limited"),
    (500, 502, "upstream_error"),
]


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert TEST_API_KEY not in response.text
    if status == 503:
        assert response.headers["retry-after"] == "30"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("upstream_status", "status", "code"), [m for m in MAPPING if m[0] != 429])
def test_mint_failures_map_to_the_contract(
    guest: httpx.Client, upstream: EmulatorControl, shape: str, upstream_status: int, status: int, code: str
) -> None:
    # 5xx mints are retried, so the fault must outlast the retries to be seen.
    upstream.fault(op="mint", status=upstream_status, shape=shape, times=3)

    assert_error(guest.post("/api/token", json={"workflow": "tutor"}), status, code)


@pytest.mark.parametrize(("upstream_status", "status", "code"), [m for m in MAPPING if m[0] != 401])
def test_stream_failures_map_to_the_contract(
    guest: httpx.Client, upstream: EmulatorControl, upstream_status: int, status: int, code: str
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", status=upstream_status, shape="nested")

    assert_error(guest.post("/api/workflows/tutor/stream", json={"message": "x"}), status, code)


def test_a_refused_stream_token_is_an_upstream_error_not_an_auth_failure(
    guest: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="stream", workflow="wf_tutor", status=401)

    assert_error(guest.post("/api/workflows/tutor/stream", json={"message": "x"}), 502, "upstream_error")


@pytest.mark.parametrize(("upstream_status", "status", "code"), MAPPING)
def test_run_failures_map_to_the_contract(
    guest: httpx.Client, upstream: EmulatorControl, upstream_status: int, status: int, code: str
) -> None:
    upstream.fault(op="run", workflow="wf_story", status=upstream_status, shape="flat")

    assert_error(guest.post("/api/workflows/story/run", json={"topic": "x"}), status, code)


@pytest.mark.parametrize(
    ("op", "workflow", "path", "body"),
    [
        ("mint", None, "/api/token", {"workflow": "tutor"}),
        ("run", "wf_story", "/api/workflows/story/run", {"topic": "x"}),
    ],
    ids=["mint", "run"],
)
def test_an_unreadable_upstream_answer_is_a_502_not_a_500(
    guest: httpx.Client, upstream: EmulatorControl, op: str, workflow: str | None, path: str, body: dict[str, str]
) -> None:
    """A 200 whose body is not the gzip its Content-Encoding says: httpx raises a DecodingError, which
    is no transport error. (Mints are retried, so the fault must outlast the retries to be seen.)"""
    upstream.fault(op=op, workflow=workflow, garble=True, times=MINT_ATTEMPTS)

    assert_error(guest.post(path, json=body), 502, "upstream_error")


def test_a_failed_mint_in_relay_mode_is_reported_before_streaming(
    guest: httpx.Client, upstream: EmulatorControl
) -> None:
    upstream.fault(op="mint", status=402)

    assert_error(guest.post("/api/workflows/tutor/stream", json={"message": "x"}), 402, "upstream_out_of_credits")
    assert upstream.requests("stream") == []


def test_minting_is_retried_after_a_server_error(guest: httpx.Client, upstream: EmulatorControl) -> None:
    upstream.fault(op="mint", status=500, times=2)

    response = guest.post("/api/token", json={"workflow": "tutor"})

    assert response.status_code == 200
    assert len(upstream.requests("mint")) == 3


def test_a_client_error_on_mint_is_not_retried(guest: httpx.Client, upstream: EmulatorControl) -> None:
    upstream.fault(op="mint", status=402, times=3)

    guest.post("/api/token", json={"workflow": "tutor"})

    assert len(upstream.requests("mint")) == 1


def test_a_wrong_api_key_is_a_502_that_does_not_reveal_the_key(
    emulator: ServerProcess, upstream: EmulatorControl
) -> None:
    wrong_key = "sk_wrong_" + "x" * 30
    server = start_proxy(emulator.url, BFF_API_KEY=wrong_key)
    try:
        with browser(server.url) as client:
            client.post("/auth/guest").raise_for_status()
            response = client.post("/api/token", json={"workflow": "tutor"})
        assert_error(response, 502, "upstream_auth_failed")
        assert wrong_key not in response.text
    finally:
        server.stop()
    assert not any(wrong_key in line for line in server.logs)


def test_an_unreachable_upstream_is_a_502_then_the_circuit_answers_fast(upstream: EmulatorControl) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))  # a port nobody listens on
        dead_url = f"http://127.0.0.1:{placeholder.getsockname()[1]}"
        server = start_proxy(dead_url)
    try:
        with browser(server.url) as client:
            client.post("/auth/guest").raise_for_status()
            # Three refused connections (the mint's retries), then two more open the circuit (threshold 5).
            assert_error(client.post("/api/token", json={"workflow": "tutor"}), 502, "upstream_error")
            stream = client.post("/api/workflows/tutor/stream", json={"m": "x"})
            run = client.post("/api/workflows/tutor/run", json={"m": "x"})
        for response in (stream, run):
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "upstream_unavailable"
            assert int(response.headers["retry-after"]) >= 1
    finally:
        server.stop()
