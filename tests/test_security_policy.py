"""Request policy (CONTRACT B4, B5, bff-security R10-R13, R18, R29): CSRF header, fetch metadata and
Origin checks, credentialed CORS for listed origins only, JSON-only size-capped bodies, security
headers on every answer, and the workflow input policy, all against a live proxy."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.servers import EmulatorControl, ServerProcess, browser, start_proxy

APP_ORIGIN = "https://app.example.test"
EVIL_ORIGIN = "https://evil.example"
WORKFLOWS_TOML = """
[workflows.tutor]
id = "wf_tutor"
inputs = ["question", "topic", "image_url"]
image_input = "image_url"
fixed = { grade = "5" }
"""
STATE_CHANGING = ["/auth/guest", "/auth/logout", "/auth/logout-all", "/api/token", "/api/workflows/tutor/stream"]


@pytest.fixture(scope="module")
def policy(emulator: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workflows = tmp_path_factory.mktemp("policy") / "workflows.toml"
    workflows.write_text(WORKFLOWS_TOML)
    server = start_proxy(
        emulator.url,
        BFF_WORKFLOWS="story=wf_story",
        BFF_WORKFLOWS_FILE=str(workflows),
        BFF_ALLOWED_ORIGINS=APP_ORIGIN,
        BFF_MAX_BODY_BYTES="1024",
        BFF_MAX_INPUT_CHARS="100",
    )
    yield server
    server.stop()


@pytest.fixture
def signed_in(policy: ServerProcess, upstream: EmulatorControl) -> Iterator[httpx.Client]:
    with browser(policy.url) as client:
        client.post("/auth/guest").raise_for_status()
        yield client


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


# --- CSRF: the static header, fetch metadata and Origin -------------------------------------------------


@pytest.mark.parametrize("path", STATE_CHANGING)
@pytest.mark.parametrize("value", [None, "", "0", "true", "11"])
def test_a_state_changing_request_without_x_csrf_1_is_refused(
    signed_in: httpx.Client, upstream: EmulatorControl, path: str, value: str | None
) -> None:
    headers = {"X-CSRF": value} if value is not None else {}
    request = signed_in.build_request("POST", path, json={"workflow": "tutor"}, headers=headers)
    if value is None:
        del request.headers["X-CSRF"]

    assert_error(signed_in.send(request), 403, "csrf_failed")
    assert signed_in.get("/auth/session").status_code == 200  # nothing was changed
    assert upstream.requests() == []


@pytest.mark.parametrize("fetch_site", ["cross-site", "same-site"])
def test_a_cross_site_request_is_refused(signed_in: httpx.Client, upstream: EmulatorControl, fetch_site: str) -> None:
    response = signed_in.post("/api/token", json={"workflow": "tutor"}, headers={"Sec-Fetch-Site": fetch_site})

    assert_error(response, 403, "csrf_failed")
    assert upstream.requests() == []


@pytest.mark.parametrize(
    "origin", [EVIL_ORIGIN, "null", "https://app.example.test.evil.example", "http://app.example.test"]
)
def test_a_foreign_origin_is_refused(signed_in: httpx.Client, upstream: EmulatorControl, origin: str) -> None:
    response = signed_in.post("/api/token", json={"workflow": "tutor"}, headers={"Origin": origin})

    assert_error(response, 403, "csrf_failed")
    assert "access-control-allow-origin" not in response.headers
    assert upstream.requests() == []


def test_same_origin_and_allowed_origins_pass(policy: ServerProcess, signed_in: httpx.Client) -> None:
    own = signed_in.post(
        "/api/token", json={"workflow": "tutor"}, headers={"Origin": policy.url, "Sec-Fetch-Site": "same-origin"}
    )
    allowed = signed_in.post(
        "/api/token", json={"workflow": "tutor"}, headers={"Origin": APP_ORIGIN, "Sec-Fetch-Site": "cross-site"}
    )

    assert own.status_code == 200
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert allowed.headers["access-control-allow-credentials"] == "true"
    # What a cross-origin app's code may read: limits, the request id, the chat route's error code.
    exposed = {name.strip().lower() for name in allowed.headers["access-control-expose-headers"].split(",")}
    assert {"retry-after", "x-error-code", "x-request-id", "x-ratelimit-remaining"} <= exposed


def test_reading_the_session_needs_no_csrf_header(policy: ServerProcess, signed_in: httpx.Client) -> None:
    cookie = signed_in.cookies["bff_session"]

    assert httpx.get(policy.url + "/auth/session", headers={"Cookie": f"bff_session={cookie}"}).status_code == 200


# --- CORS ----------------------------------------------------------------------------------------------


def preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(
        url + "/api/token",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-csrf",
        },
    )


def test_a_preflight_from_an_allowed_origin_is_answered(policy: ServerProcess) -> None:
    response = preflight(policy.url, APP_ORIGIN)

    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == APP_ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "x-csrf" in response.headers["access-control-allow-headers"].lower()
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "origin" in response.headers["vary"].lower()


@pytest.mark.parametrize("origin", [EVIL_ORIGIN, "null", APP_ORIGIN + ":8443", APP_ORIGIN.upper()])
def test_a_preflight_from_any_other_origin_is_refused(policy: ServerProcess, origin: str) -> None:
    response = preflight(policy.url, origin)

    assert_error(response, 403, "csrf_failed")
    assert not [name for name in response.headers if name.startswith("access-control-")]


def test_cors_is_off_by_default(proxy: ServerProcess) -> None:
    assert_error(preflight(proxy.url, APP_ORIGIN), 403, "csrf_failed")
    response = httpx.get(proxy.url + "/auth/session", headers={"Origin": APP_ORIGIN})
    assert "access-control-allow-origin" not in response.headers


def test_the_allowed_origin_is_echoed_never_a_wildcard(policy: ServerProcess) -> None:
    answers = [
        httpx.get(policy.url + "/auth/session", headers={"Origin": APP_ORIGIN}),
        httpx.get(policy.url + "/healthz", headers={"Origin": APP_ORIGIN}),
        httpx.post(policy.url + "/auth/guest", headers={"Origin": APP_ORIGIN}),  # a 403 the app can read
        httpx.get(policy.url + "/auth/session", headers={"Origin": EVIL_ORIGIN}),
    ]

    assert [a.headers.get("access-control-allow-origin") for a in answers] == [APP_ORIGIN, APP_ORIGIN, APP_ORIGIN, None]
    assert all("origin" in a.headers["vary"].lower() for a in answers)


# --- Bodies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]
)
def test_a_body_that_is_not_json_is_refused(
    signed_in: httpx.Client, upstream: EmulatorControl, content_type: str | None
) -> None:
    request = signed_in.build_request("POST", "/api/token", content=b'{"workflow": "tutor"}')
    if content_type is None:
        request.headers.pop("Content-Type", None)
    else:
        request.headers["Content-Type"] = content_type

    assert_error(signed_in.send(request), 422, "invalid_input")
    assert upstream.requests() == []


NOT_TEXT = {
    "encoded-surrogate": '{"topic": "\ud800"}'.encode("utf-8", "surrogatepass"),
    "not-utf-8": b'{"topic": "\xff"}',
    "nested-too-deeply": b"[" * 20_000 + b"]" * 20_000,  # within the default body cap (64 KB)
}


@pytest.mark.parametrize("body", NOT_TEXT.values(), ids=NOT_TEXT.keys())
@pytest.mark.parametrize("path", ["/api/token", "/api/workflows/tutor/stream", "/api/workflows/tutor/run"])
def test_json_that_is_not_text_is_a_422_before_anything_is_spent(
    guest: httpx.Client, upstream: EmulatorControl, path: str, body: bytes
) -> None:
    response = guest.post(path, content=body, headers={"Content-Type": "application/json"})

    assert_error(response, 422, "invalid_input")
    assert upstream.requests() == []  # no token minted, no stream opened


def test_a_declared_oversized_body_is_refused_before_it_is_read(signed_in: httpx.Client) -> None:
    response = signed_in.post("/api/workflows/tutor/run", json={"topic": "x" * 2000})

    assert_error(response, 413, "body_too_large")


def test_a_chunked_oversized_body_is_refused_while_it_streams(
    signed_in: httpx.Client, upstream: EmulatorControl
) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"topic": "'
        for _ in range(64):
            yield b"x" * 64
        yield b'"}'

    response = signed_in.post(
        "/api/workflows/tutor/run", content=chunks(), headers={"Content-Type": "application/json"}
    )

    assert_error(response, 413, "body_too_large")
    assert upstream.requests() == []


# --- Security headers ----------------------------------------------------------------------------------


def test_every_answer_carries_the_security_headers(policy: ServerProcess, signed_in: httpx.Client) -> None:
    answers = [
        signed_in.get("/auth/session"),  # 200
        httpx.get(policy.url + "/auth/session"),  # 401
        httpx.post(policy.url + "/auth/guest"),  # 403 from the CSRF middleware
        preflight(policy.url, EVIL_ORIGIN),  # 403 from the CORS middleware
        signed_in.post("/api/workflows/nope/run", json={}),  # 404 from a route
        httpx.get(policy.url + "/no/such/path"),  # 404 from the router
        signed_in.post("/api/workflows/tutor/run", json={"topic": "x" * 2000}),  # 413 from the body policy
        httpx.get(policy.url + "/healthz"),
    ]

    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
        # HSTS only when the service is configured as https (BFF_COOKIE_SECURE=true).
        assert "strict-transport-security" not in answer.headers


# --- Workflow input policy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inputs",
    [
        {"persona": "pirate"},  # not in the workflow's `inputs` allowlist
        {"grade": "12"},  # a `fixed` input: the server's value always wins
        {"topic": "fractions", "grade": "5"},  # even when it repeats the fixed value
        {"topic": 42},
        {"topic": ["a"]},
        {"topic": {"nested": "object"}},
        {"topic": "x" * 101},  # over BFF_MAX_INPUT_CHARS
        {"bad name": "x"},
        ["topic"],
    ],
)
def test_inputs_outside_the_workflow_policy_are_refused(
    signed_in: httpx.Client, upstream: EmulatorControl, inputs: object
) -> None:
    for route in ("/api/workflows/tutor/run", "/api/workflows/tutor/stream"):
        assert_error(signed_in.post(route, json=inputs), 422, "invalid_input")
    assert upstream.requests() == []


@pytest.mark.parametrize(
    "url",
    [
        "http://images.example/cat.png",
        "javascript:alert(1)",
        "data:image/png;base64,iVBORw0KGgo=",
        "file:///etc/passwd",
        "//images.example/cat.png",
        "https:///no-host.png",
        "https://images.example/cat.png\nhttp://evil.example/x.png",
        "https://images.example/a b.png",
    ],
)
def test_image_inputs_must_be_https_urls(signed_in: httpx.Client, upstream: EmulatorControl, url: str) -> None:
    response = signed_in.post("/api/workflows/tutor/run", json={"topic": "cats", "image_url": url})

    assert_error(response, 422, "invalid_input")
    assert upstream.requests() == []


def test_allowed_inputs_go_upstream_with_the_fixed_ones(signed_in: httpx.Client, upstream: EmulatorControl) -> None:
    image = "https://images.example/cat.png"
    response = signed_in.post("/api/workflows/tutor/run", json={"topic": "cats", "image_url": image})

    assert response.status_code == 200
    [sent] = upstream.requests("run")
    assert sent["body"] == {"topic": "cats", "image_url": image, "grade": "5"}


@pytest.mark.parametrize("url", ["http://images.example/cat.png", "javascript:alert(1)", "data:image/png;base64,AAAA"])
def test_chat_image_attachments_must_be_https_urls(
    signed_in: httpx.Client, upstream: EmulatorControl, url: str
) -> None:
    message = {
        "id": "m1",
        "role": "user",
        "parts": [{"type": "text", "text": "what is this?"}, {"type": "file", "mediaType": "image/png", "url": url}],
    }
    response = signed_in.post("/api/chat/tutor", json={"id": "c1", "messages": [message], "trigger": "submit-message"})

    assert response.status_code == 422
    assert response.headers["content-type"].startswith("text/plain")
    assert upstream.requests() == []


def test_a_host_not_allowed_is_refused_before_the_origin_check_can_be_fooled(emulator: ServerProcess) -> None:
    """DNS rebinding's shape: the page's own name in both Host and Origin passes an origin check that
    trusts Host. With BFF_ALLOWED_HOSTS, such a request never gets that far; probes still answer."""
    server = start_proxy(emulator.url, BFF_ALLOWED_HOSTS="127.0.0.1,*.example.com")
    try:
        rebound = httpx.post(
            server.url + "/auth/guest",
            headers={"Host": "evil.example", "Origin": "http://evil.example", "X-CSRF": "1"},
        )
        allowed = httpx.post(
            server.url + "/auth/guest",
            headers={"Host": "app.example.com", "Origin": "http://app.example.com", "X-CSRF": "1"},
        )
        probe = httpx.get(server.url + "/healthz", headers={"Host": "10.1.2.3:8000"})
        own = httpx.get(server.url + "/")
    finally:
        server.stop()
    assert (rebound.status_code, rebound.json()["error"]["code"]) == (400, "invalid_host")
    assert "set-cookie" not in rebound.headers
    assert allowed.status_code == 200
    assert probe.status_code == 200
    assert own.status_code == 200


def test_serve_warns_when_any_host_is_answered(proxy: ServerProcess) -> None:
    warning = proxy.wait_for_log(lambda e: "BFF_ALLOWED_HOSTS is empty" in e.get("message", ""))
    assert warning["level"] == "warning"
