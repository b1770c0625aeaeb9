"""Bad input, generated: schemathesis against `/openapi.json` of a live proxy, signed in.

Every operation of the document gets requests generated from its schema, valid and deliberately
invalid (wrong types, missing fields, bad headers, odd characters). Whatever arrives, the answer
must be no 5xx the document does not list, with a status, content type, headers and body the
document says that operation can answer. A few hundred cases here; `make fuzz` runs many more
(`BFF_FUZZ_EXAMPLES`).

The proxy runs with every sign-in method and a workflow with every input setting (chat, history,
image, allowlist, fixed inputs), so the generated requests reach the validators, not only the
"unknown workflow" refusal. Its upstream answers at once, so the requests that pass stream for real.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from proxy.openapi import OPERATIONS
from tests.identity import JWT_SECRET, PASSWORD, write_users
from tests.oidc_idp import CLIENT_ID, CLIENT_SECRET, Idp, idp_port, running_idp
from tests.servers import TEST_API_KEY, ServerProcess, browser, start_proxy
from tests.test_chat_node import NODE_DIR, node_binary, require_node_modules

EXAMPLES = int(os.environ.get("BFF_FUZZ_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
WORKFLOWS = """
[workflows.tutor]
id = "wf_tutor"
chat_input = "question"
history_input = "history"
image_input = "image_url"
inputs = ["question", "topic", "image_url"]
fixed = { grade = "5" }

[workflows.story]
id = "wf_story"
"""


# Served only with `oidc` in BFF_AUTH, which needs the test identity provider (Node).
OIDC_OPERATIONS = {("get", "/auth/login"), ("get", "/auth/callback"), ("post", "/auth/backchannel-logout")}


@pytest.fixture(scope="module")
def fuzz_idp() -> Iterator[Idp | None]:
    """The test identity provider, for the `oidc` routes; None where Node is missing (CI requires it).
    Sign-ins never complete here: the registered client URL is a closed port."""
    try:
        require_node_modules(NODE_DIR)
    except pytest.skip.Exception:
        yield None
        return
    with running_idp(node_binary(), str(NODE_DIR), "http://127.0.0.1:9", idp_port()) as idp:
        yield idp


@pytest.fixture(scope="module")
def fuzz_proxy(tmp_path_factory: pytest.TempPathFactory, fuzz_idp: Idp | None) -> Iterator[ServerProcess]:
    config = tmp_path_factory.mktemp("fuzz")
    (config / "workflows.toml").write_text(WORKFLOWS)
    users = write_users(config / "users.json", {"alice": PASSWORD})
    upstream = ServerProcess(["emulator", "--chunk-delay", "0"], {"BFF_API_KEY": TEST_API_KEY}).start()
    try:
        proxy = start_proxy(
            upstream.url,
            BFF_WORKFLOWS="",
            BFF_WORKFLOWS_FILE=str(config / "workflows.toml"),
            BFF_AUTH="guest,password,jwt" + (",oidc" if fuzz_idp else ""),
            **(
                {
                    "BFF_OIDC_ISSUER": fuzz_idp.issuer,
                    "BFF_OIDC_CLIENT_ID": CLIENT_ID,
                    "BFF_OIDC_CLIENT_SECRET": CLIENT_SECRET,
                    "BFF_PUBLIC_URL": "http://127.0.0.1:9",
                }
                if fuzz_idp
                else {}
            ),
            BFF_USERS_FILE=str(users),
            BFF_JWT_SECRET=JWT_SECRET,
            BFF_MAX_STREAM_SECONDS="10",
        )
        yield proxy
        proxy.stop()
    finally:
        upstream.stop()


class SignedIn:
    """A guest session cookie, renewed whenever a generated request ended or replaced it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = requests.Session()
        self.cookie = ""
        self.renew()

    def renew(self) -> None:
        with browser(self.url) as client:
            client.post("/auth/guest").raise_for_status()
            self.cookie = client.cookies["bff_session"]

    def after(self, response: requests.Response) -> None:
        # Logout, logout-all and every sign-in end the session this cookie points at.
        if "set-cookie" in response.headers:
            self.renew()


@pytest.fixture(scope="module")
def signed_in(fuzz_proxy: ServerProcess) -> Iterator[SignedIn]:
    session = SignedIn(fuzz_proxy.url)
    yield session
    session.http.close()


@pytest.fixture(scope="module")
def api(fuzz_proxy: ServerProcess) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(fuzz_proxy.url + "/openapi.json")


# Bodies that pass every check, sent with generated everything-else: random bodies that satisfy the
# schema rarely satisfy the rules it cannot express (the last chat message must be the user's).
WORKING_BODIES: dict[str, object] = {
    "/api/chat/{alias}": {"messages": [{"role": "user", "parts": [{"type": "text", "text": "fractions"}]}]},
    "/api/workflows/{alias}/stream": {"question": "fractions", "topic": "maths"},
    "/api/workflows/{alias}/run": {"question": "fractions"},
    "/api/token": {"workflow": "tutor"},
    "/auth/login": {"username": "alice", "password": PASSWORD},
}


def cases(operation: APIOperation) -> st.SearchStrategy[schemathesis.Case]:
    """Valid requests, requests that break the schema somewhere, and working bodies with generated
    parameters. Not every operation has anything to break: /healthz takes no input."""
    strategy = operation.as_strategy(GenerationMode.POSITIVE)
    if operation.method.upper() == "POST" and operation.path in WORKING_BODIES:
        strategy |= operation.as_strategy(GenerationMode.POSITIVE, body=WORKING_BODIES[operation.path])
    try:
        return strategy | operation.as_strategy(GenerationMode.NEGATIVE)
    except Exception:  # schemathesis says "nothing to negate" in more than one way
        return strategy


# Every operation the fuzzed proxy serves: it has every sign-in method and both modes.
@pytest.mark.parametrize(("method", "path"), sorted(OPERATIONS), ids=lambda value: str(value))
def test_every_operation_answers_any_input_as_documented_and_never_with_a_server_error(
    api: schemathesis.BaseSchema, signed_in: SignedIn, fuzz_idp: Idp | None, method: str, path: str
) -> None:
    if fuzz_idp is None and (method, path) in OIDC_OPERATIONS:
        pytest.skip("the oidc routes need the test identity provider (Node)")
    operation = api[path][method.upper()]

    @given(case=cases(operation))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=os.environ.get("CI") == "true",  # CI reruns the same cases; `make fuzz` explores
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def answers_as_documented(case: schemathesis.Case) -> None:
        response = case.call(session=signed_in.http, cookies={"bff_session": signed_in.cookie}, timeout=30)
        try:
            case.validate_response(response, checks=CHECKS)
        finally:
            signed_in.after(response)

    answers_as_documented()


@pytest.mark.parametrize("path", sorted(WORKING_BODIES))
def test_an_unpaired_surrogate_escape_is_invalid_input_not_a_server_error(
    fuzz_proxy: ServerProcess, signed_in: SignedIn, path: str
) -> None:
    """JSON allows "\\ud800", but it is no character and cannot be sent on as UTF-8. Hypothesis never
    generates one (its text is always valid Unicode), so this is asked for by hand."""
    body = json.dumps(WORKING_BODIES[path]).replace('fractions"', 'fractions\\ud800"')
    body = body.replace('alice"', 'alice\\udfff"').replace('tutor"', 'tutor\\ud83d"')
    assert "\\ud" in body
    request_id = f"surrogate-{abs(hash(path))}"

    response = requests.post(
        fuzz_proxy.url + path.replace("{alias}", "tutor"),
        data=body.encode(),
        headers={"Content-Type": "application/json", "X-CSRF": "1", "X-Request-ID": request_id},
        cookies={"bff_session": signed_in.cookie},
        timeout=30,
    )

    assert response.status_code == 422
    if path.startswith("/api/chat/"):
        assert response.text == "The body is not valid JSON text."
    else:
        assert response.json()["error"]["code"] == "invalid_input"
    line = fuzz_proxy.wait_for_log(lambda e: e.get("message") == "request end" and e.get("request_id") == request_id)
    assert line["upstream_status"] is None  # refused before anything (a token, say) was spent upstream


def test_the_fuzzed_proxy_logged_no_unhandled_exception(fuzz_proxy: ServerProcess) -> None:
    """Runs after the fuzzing above: a 500 that a client never saw (a stream already started) would
    still have been logged by uvicorn or the relay."""
    entries = fuzz_proxy.log_entries()
    assert not [e for e in entries if e.get("message", "").startswith("Exception in ASGI application")]
    assert not [e for e in entries if e.get("message") == "relay failed"]
    assert not [e for e in entries if e.get("message") == "request end" and e.get("status") == 500]
    passed = {(e["method"], e["route"]) for e in entries if e.get("message") == "request end" and e["status"] == 200}
    # The generated requests got past validation into real relays, not only into refusals.
    for path in WORKING_BODIES:
        assert ("POST", path) in passed, path
