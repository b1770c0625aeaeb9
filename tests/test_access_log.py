"""One summary line per request, written when the response or stream ends (proxy/middleware/access_log.py),
and session events counted in `/metrics`."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.servers import EmulatorControl, ServerProcess
from tests.test_metrics import sample

STREAM = "/api/workflows/tutor/stream"


def summary(proxy: ServerProcess, request_id: str) -> dict[str, Any]:
    return proxy.wait_for_log(lambda e: e.get("message") == "request end" and e.get("request_id") == request_id)


def lines_of(proxy: ServerProcess, request_id: str) -> list[dict[str, Any]]:
    return [e for e in proxy.log_entries() if e.get("request_id") == request_id and e.get("logger") == "proxy.access"]


def test_a_relay_gets_one_line_with_what_the_client_saw_and_the_upstream_did(
    proxy: ServerProcess, guest: httpx.Client, upstream: EmulatorControl
) -> None:
    request_id = f"access-{uuid.uuid4().hex[:12]}"
    marker = f"secret-input-{uuid.uuid4().hex}"
    user_id = guest.get("/auth/session").json()["user"]["id"]

    response = guest.post(STREAM, json={"message": marker}, headers={"X-Request-ID": request_id})

    assert response.status_code == 200
    line = summary(proxy, request_id)
    assert line["method"] == "POST"
    assert line["route"] == "/api/workflows/{alias}/stream"  # the template, never the raw path
    assert (line["status"], line["upstream_status"], line["end"]) == (200, 200, "complete")
    assert line["bytes"] == len(response.content)
    assert line["chars"] == len(response.text)
    assert line["relay"] == "stream:tutor"
    assert 0 <= line["ttfb_ms"] <= line["duration_ms"]
    assert len(line["user_hash"]) == 16 and user_id not in str(line)
    assert len(lines_of(proxy, request_id)) == 1
    # Neither the body, nor the cookie, nor the token the relay minted is on any line of the request.
    [stream_call] = upstream.requests("stream")
    request_lines = str([e for e in proxy.log_entries() if e.get("request_id") == request_id])
    for private in (marker, guest.cookies["bff_session"], stream_call["query"]["token"]):
        assert private not in request_lines


def test_the_user_hash_follows_a_user_across_requests_and_differs_between_users(
    proxy: ServerProcess, guest: httpx.Client, anonymous: httpx.Client
) -> None:
    first, second, other = (f"access-{uuid.uuid4().hex[:12]}" for _ in range(3))
    guest.get("/auth/session", headers={"X-Request-ID": first})
    guest.post("/api/workflows/story/run", json={"topic": "x"}, headers={"X-Request-ID": second})
    anonymous.post("/auth/guest", headers={"X-Request-ID": other})

    hashes = [summary(proxy, request_id)["user_hash"] for request_id in (first, second, other)]

    assert hashes[0] == hashes[1] != hashes[2]
    assert summary(proxy, second)["upstream_status"] == 200


def test_an_upstream_refusal_is_written_with_the_upstream_status_and_why_the_relay_ended(
    proxy: ServerProcess, guest: httpx.Client, upstream: EmulatorControl
) -> None:
    request_id = f"access-{uuid.uuid4().hex[:12]}"
    upstream.fault(op="stream", workflow="wf_tutor", status=402)

    response = guest.post(STREAM, json={"message": "x"}, headers={"X-Request-ID": request_id})

    line = summary(proxy, request_id)
    assert (response.status_code, line["status"], line["upstream_status"]) == (402, 402, 402)
    assert line["end"] == "refused:upstream_out_of_credits"
    assert line["bytes"] == len(response.content)
    assert line["ttfb_ms"] is None  # no upstream byte was relayed


def test_requests_refused_before_any_route_are_written_too(proxy: ServerProcess, anonymous: httpx.Client) -> None:
    refused, unknown = f"access-{uuid.uuid4().hex[:12]}", f"access-{uuid.uuid4().hex[:12]}"
    anonymous.post(STREAM, json={}, headers={"X-Request-ID": refused, "X-CSRF": "0"})
    anonymous.get("/no/such/path", headers={"X-Request-ID": unknown})

    assert (summary(proxy, refused)["status"], summary(proxy, unknown)["status"]) == (403, 404)
    assert summary(proxy, unknown)["route"] == "unmatched"
    assert summary(proxy, refused)["user_hash"] is None


def test_session_events_are_counted_in_the_metrics(proxy: ServerProcess, anonymous: httpx.Client) -> None:
    def counts() -> list[float]:
        text = httpx.get(proxy.url + "/metrics").text
        return [sample(text, "bff_session_events_total", event=event) for event in ("created", "renewed", "revoked")]

    before = counts()
    anonymous.post("/auth/guest").raise_for_status()  # created
    anonymous.post("/auth/guest").raise_for_status()  # renewed: the old session is revoked ("replaced")
    anonymous.post("/auth/logout").raise_for_status()  # revoked

    assert [after - then for after, then in zip(counts(), before, strict=True)] == [1, 1, 2]


def test_a_route_s_refusal_is_written_with_its_code(proxy: ServerProcess, anonymous: httpx.Client) -> None:
    # Refused by the route (no session), not by a middleware: the line says why, not "complete".
    request_id = f"access-{uuid.uuid4().hex[:12]}"
    answer = anonymous.post(STREAM, json={"message": "x"}, headers={"X-Request-ID": request_id, "X-CSRF": "1"})
    assert answer.status_code == 401
    assert summary(proxy, request_id)["end"] == "refused:unauthenticated"
