"""OpenTelemetry tracing (proxy/tracing/): the spans of a chat answer, as a collector receives them.

A real OTLP receiver (tests/otlp_receiver.py) takes the exports of a proxy started with the standard
OTEL_* variables; the emulated upstream records the `traceparent` it was sent. With tracing off, the
SDK is not even imported.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.emulator import generate_text
from proxy.tracing import exporter_names
from tests.otlp_receiver import Received, ReceivedSpan, otlp_grpc_receiver, otlp_http_receiver
from tests.servers import (
    ROOT,
    SESSION_SECRET,
    TEST_API_KEY,
    EmulatorControl,
    RedisServer,
    ServerProcess,
    browser,
    guest_of,
    proxy_env,
    replicas_of,
    start_proxy,
)
from tests.test_deploy import nginx_in_front_of

QUESTION = "fractions, asked in confidence"
ANSWER = generate_text("wf_tutor", {"message": QUESTION})
REQUEST = {
    "id": "chat-traced",
    "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": QUESTION}]}],
    "trigger": "submit-message",
}
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def traced_env(endpoint: str, **overrides: str) -> dict[str, str]:
    # Exported every 50 ms, so a test waits for spans briefly (on an event, never a sleep).
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50", **overrides}


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[str, Received]]:
    with otlp_http_receiver() as found:
        yield found


@pytest.fixture(scope="module")
def traced(emulator: ServerProcess, receiver: tuple[str, Received]) -> Iterator[ServerProcess]:
    """A proxy exporting to the receiver, trusting no caller's trace context; its runs outlive their
    connection for the default grace period, so they can be resumed."""
    server = start_proxy(emulator.url, **traced_env(receiver[0], BFF_RESUME_GRACE_SECONDS="20"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def traced_behind_proxy(emulator: ServerProcess, receiver: tuple[str, Received]) -> Iterator[ServerProcess]:
    """A proxy that trusts 127.0.0.1 (where every test client is), and names users by a keyed hash."""
    server = start_proxy(
        emulator.url, **traced_env(receiver[0], BFF_TRACE_TRUSTED="127.0.0.1", BFF_TRACE_USER="hashed")
    )
    yield server
    server.stop()


def chat(client: httpx.Client, **headers: str) -> httpx.Response:
    response = client.post("/api/chat/tutor?protocol=text", json=REQUEST, headers=headers)
    assert response.status_code == 200
    assert response.text == ANSWER
    return response


def answer_span(received: Received, run_id: str) -> ReceivedSpan:
    """The run's GenAI span: exported when the run has ended, after the rest of its trace."""
    return received.wait_for(lambda span: span.attributes.get("gen_ai.response.id") == run_id, f"of {run_id}")


def server_span(received: Received, trace_id: str) -> ReceivedSpan:
    return received.wait_for(
        lambda span: span.trace_id == trace_id and span.kind == "server", f"of the server in {trace_id}"
    )


def only(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    named = [span for span in spans if span.name == name]
    assert len(named) == 1, f"{name}: {[span.name for span in spans]}"
    return named[0]


def stream_request(upstream: EmulatorControl, trace_id: str) -> dict[str, Any]:
    seen = [r for r in upstream.requests("stream") if trace_id in r["headers"].get("traceparent", "")]
    assert len(seen) == 1
    return seen[0]


def test_a_chat_answer_is_one_trace_from_the_request_to_the_upstream(
    traced: ServerProcess, receiver: tuple[str, Received], upstream: EmulatorControl
) -> None:
    received = receiver[1]
    with guest_of(traced.url) as client:
        run_id = chat(client).headers["x-run-id"]

    answer = answer_span(received, run_id)
    server = server_span(received, answer.trace_id)
    spans = received.trace(answer.trace_id)
    assert server.name == "POST /api/chat/{alias}"
    assert server.attributes["http.route"] == "/api/chat/{alias}"
    assert server.parent_id == ""
    admission = only(spans, "bff.admission")
    mint = only(spans, "bff.mint")
    assert {admission.parent_id, mint.parent_id, answer.parent_id} == {server.span_id}

    assert answer.name == "chat tutor" and answer.kind == "client"
    assert answer.attributes["gen_ai.operation.name"] == "chat"
    assert answer.attributes["gen_ai.request.model"] == "tutor"
    assert answer.attributes["gen_ai.provider.name"] == "ai_tutor"
    assert answer.attributes["bff.run.end"] == "complete"
    assert answer.attributes["bff.output.chars"] == len(ANSWER)
    assert [name for name, _ in answer.events] == ["upstream.headers", "upstream.first_chunk"]
    assert not answer.error

    token_call = only(spans, "GET /api/v1/token")
    stream_call = only(spans, "POST /api/v1/run/{workflow_id}/stream")
    assert token_call.parent_id == mint.span_id and token_call.kind == "client"
    assert stream_call.parent_id == answer.span_id
    assert stream_call.attributes["http.response.status_code"] == 200
    # The upstream was told the trace, and our span that called it.
    # (The flags after it: sampled, and a random trace id, W3C Trace Context level 2.)
    sent = stream_request(upstream, answer.trace_id)["headers"]["traceparent"]
    assert sent.startswith(f"00-{answer.trace_id}-{stream_call.span_id}-")
    mints = [r for r in upstream.requests("mint") if answer.trace_id in r["headers"].get("traceparent", "")]
    assert [r["headers"]["traceparent"].rpartition("-")[0] for r in mints] == [
        f"00-{answer.trace_id}-{token_call.span_id}"
    ]


def test_a_workflow_run_and_a_refusal_are_traced_with_their_outcome(
    traced: ServerProcess, receiver: tuple[str, Received], upstream: EmulatorControl
) -> None:
    received = receiver[1]
    with guest_of(traced.url) as client:
        ran = client.post("/api/workflows/story/run", json={"message": "a dog"})
        assert ran.status_code == 200
        upstream.fault(op="stream", status=402, times=1)
        refused = client.post("/api/workflows/tutor/stream", json={"message": "hi"})
        assert refused.status_code == 402

    done = answer_span(received, ran.headers["x-run-id"])
    assert done.name == "invoke_workflow story"
    assert done.attributes["bff.run.end"] == "complete"
    assert only(received.trace(done.trace_id), "POST /api/v1/run/{workflow_id}").parent_id == done.span_id
    failed = answer_span(received, refused.headers["x-run-id"])
    assert failed.attributes["bff.run.end"] == "refused:upstream_out_of_credits"
    assert failed.attributes["error.type"] == "upstream_out_of_credits"
    assert only(received.trace(failed.trace_id), "POST /api/v1/run/{workflow_id}/stream").error


def test_a_stop_and_a_resume_are_events_of_the_answer(
    traced: ServerProcess, receiver: tuple[str, Received], upstream: EmulatorControl
) -> None:
    received = receiver[1]
    upstream.fault(op="stream", hold_after=1, times=1)
    with guest_of(traced.url) as client, client.stream("POST", "/api/chat/tutor?protocol=text", json=REQUEST) as first:
        run_id = first.headers["x-run-id"]
        next(first.iter_raw())
        with client.stream("GET", "/api/chat/tutor/chat-traced/stream?protocol=text") as resumed:
            assert resumed.status_code == 200
            next(resumed.iter_raw())
            assert client.post(f"/api/runs/{run_id}/stop").status_code == 204

    answer = answer_span(received, run_id)
    assert answer.attributes["bff.run.end"] == "stopped"
    events = dict(answer.events)
    assert events["bff.run.stop"] == {"bff.run.stop_reason": "stopped"}
    assert "bff.run.resume" in events
    resume = received.wait_for(lambda span: span.kind == "server" and bool(span.links), "of the resume")
    assert resume.name == "GET /api/chat/{alias}/{chat_id}/stream"
    assert resume.trace_id != answer.trace_id
    assert resume.links == [(answer.trace_id, answer.span_id, {"bff.link": "run"})]


def test_a_resume_on_another_replica_links_to_the_trace_that_started_the_answer(
    emulator: ServerProcess, receiver: tuple[str, Received], redis_server: RedisServer, upstream: EmulatorControl
) -> None:
    received = receiver[1]
    env = traced_env(receiver[0], BFF_STORAGE_URL=redis_server.url, BFF_RESUME_GRACE_SECONDS="20")
    upstream.fault(op="stream", hold_after=1, times=1)
    with replicas_of(emulator.url, **env) as (first, second), guest_of(first.url) as on_first:
        with (
            browser(second.url, cookies=on_first.cookies) as on_second,
            on_first.stream("POST", "/api/chat/tutor?protocol=text", json=REQUEST) as started,
        ):
            run_id = started.headers["x-run-id"]
            next(started.iter_raw())
            with on_second.stream("GET", "/api/chat/tutor/chat-traced/stream?protocol=text") as resumed:
                assert resumed.status_code == 200
                next(resumed.iter_raw())
                assert on_second.post(f"/api/runs/{run_id}/stop").status_code == 204

        answer = answer_span(received, run_id)
        origin = server_span(received, answer.trace_id)
        resume = received.wait_for(
            lambda span: span.kind == "server" and any(link[0] == answer.trace_id for link in span.links),
            "of the resume on the other replica",
        )
    assert resume.name == "GET /api/chat/{alias}/{chat_id}/stream" and resume.trace_id != answer.trace_id
    assert origin.name == "POST /api/chat/{alias}"
    # The link goes into the trace that started the answer, where the answer's span is.
    assert [(trace_id, attributes) for trace_id, _, attributes in resume.links] == [
        (answer.trace_id, {"bff.link": "run"})
    ]
    assert {span.span_id for span in received.trace(answer.trace_id)} >= {resume.links[0][1], answer.span_id}


def test_a_requests_log_line_names_its_trace(traced: ServerProcess, receiver: tuple[str, Received]) -> None:
    with guest_of(traced.url) as client:
        run_id = chat(client).headers["x-run-id"]
    answer = answer_span(receiver[1], run_id)
    line = traced.wait_for_log(lambda entry: entry.get("run_id") == run_id and entry.get("route"))
    assert line["trace_id"] == answer.trace_id


def test_an_untrusted_callers_traceparent_is_ignored(traced: ServerProcess, receiver: tuple[str, Received]) -> None:
    with guest_of(traced.url) as client:
        run_id = chat(client, traceparent=f"00-{CALLER_TRACE}-{CALLER_SPAN}-01").headers["x-run-id"]

    answer = answer_span(receiver[1], run_id)
    assert answer.trace_id != CALLER_TRACE
    assert server_span(receiver[1], answer.trace_id).parent_id == ""


def test_an_untrusted_websocket_handshake_cannot_pick_its_trace(
    traced: ServerProcess, receiver: tuple[str, Received]
) -> None:
    host, port = traced.url.removeprefix("http://").split(":")
    handshake = (
        "GET /api/usage HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"traceparent: 00-{CALLER_TRACE}-{CALLER_SPAN}-01\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(handshake.encode())
        assert connection.recv(4096).startswith(b"HTTP/1.1 403")
    # Spans are exported in the order they end: once a later answer's span is in, the handshake's is too.
    with guest_of(traced.url) as client:
        run_id = chat(client).headers["x-run-id"]
    answer_span(receiver[1], run_id)
    assert not [span for span in receiver[1].spans if span.trace_id == CALLER_TRACE]


def test_probes_and_scrapes_are_not_traced(traced: ServerProcess, receiver: tuple[str, Received]) -> None:
    with guest_of(traced.url) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200
        run_id = chat(client).headers["x-run-id"]

    answer_span(receiver[1], run_id)  # exported after the probes' spans would have been
    assert not [span for span in receiver[1].spans if span.name in ("GET /healthz", "GET /metrics")]


def test_a_trusted_callers_traceparent_is_continued(
    traced_behind_proxy: ServerProcess, receiver: tuple[str, Received], upstream: EmulatorControl
) -> None:
    with guest_of(traced_behind_proxy.url) as client:
        headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "baggage": "user=alice"}
        run_id = chat(client, **headers).headers["x-run-id"]

    answer = answer_span(receiver[1], run_id)
    assert answer.trace_id == CALLER_TRACE
    server = receiver[1].wait_for(
        lambda span: span.kind == "server" and span.parent_id == CALLER_SPAN, "continuing the caller's"
    )
    assert server.name == "POST /api/chat/{alias}"
    sent = stream_request(upstream, CALLER_TRACE)["headers"]
    assert sent["traceparent"].startswith(f"00-{CALLER_TRACE}-")
    assert "baggage" not in sent  # the caller's baggage is not the upstream's business


def test_a_trusted_load_balancer_is_no_trusted_tracer(emulator: ServerProcess, receiver: tuple[str, Received]) -> None:
    # BFF_TRUSTED_PROXIES is believed for the client's address; a balancer passes a browser's
    # traceparent on, so that list does not make the trace context trusted: BFF_TRACE_TRUSTED does.
    proxy = start_proxy(emulator.url, **traced_env(receiver[0], BFF_TRUSTED_PROXIES="127.0.0.1"))
    try:
        with guest_of(proxy.url) as client:
            run_id = chat(client, traceparent=f"00-{CALLER_TRACE}-{CALLER_SPAN}-01").headers["x-run-id"]
        answer = answer_span(receiver[1], run_id)
    finally:
        proxy.stop()
    assert answer.trace_id != CALLER_TRACE


def test_an_attributes_length_is_bounded(traced: ServerProcess, receiver: tuple[str, Received]) -> None:
    with guest_of(traced.url) as client:
        client.headers["User-Agent"] = "ua-" + "x" * 60_000
        run_id = chat(client).headers["x-run-id"]
    server = server_span(receiver[1], answer_span(receiver[1], run_id).trace_id)
    agents = [value for key, value in server.attributes.items() if "user_agent" in key]
    assert agents and all(str(value).startswith("ua-") and len(str(value)) == 1024 for value in agents)


def test_a_browsers_traceparent_stops_at_the_edge_nginx(
    emulator: ServerProcess, receiver: tuple[str, Received], tmp_path: Path
) -> None:
    # The app trusts the nginx in front of it (127.0.0.1 here), which must not pass a browser's on.
    proxy = start_proxy(emulator.url, **traced_env(receiver[0], BFF_TRACE_TRUSTED="127.0.0.1"))
    try:
        with nginx_in_front_of(proxy.url, tmp_path) as edge, browser(edge) as client:
            client.headers.update({"Origin": edge, "Sec-Fetch-Site": "same-origin"})
            client.post("/auth/guest").raise_for_status()
            run_id = chat(client, traceparent=f"00-{CALLER_TRACE}-{CALLER_SPAN}-01").headers["x-run-id"]
        answer = answer_span(receiver[1], run_id)
    finally:
        proxy.stop()

    assert answer.trace_id != CALLER_TRACE
    assert server_span(receiver[1], answer.trace_id).parent_id == ""


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [str(value)]


def every_value(spans: list[ReceivedSpan]) -> list[str]:
    """Every attribute value a collector saw: of spans, events, links and resources."""
    values: list[str] = []
    for span in spans:
        values += [span.name, *_strings([span.attributes, span.resource])]
        values += _strings([attributes for _, attributes in span.events])
        values += _strings([attributes for _, _, attributes in span.links])
    return values


@pytest.mark.parametrize("hashed", [False, True], ids=["plain", "hashed-user"])
def test_no_span_carries_a_secret_a_user_or_their_words(
    hashed: bool,
    traced: ServerProcess,
    traced_behind_proxy: ServerProcess,
    receiver: tuple[str, Received],
    upstream: EmulatorControl,
) -> None:
    server = traced_behind_proxy if hashed else traced
    with guest_of(server.url) as client:
        user_id = client.get("/auth/session").json()["user"]["id"]
        cookie = next(iter(client.cookies.jar)).value
        run_id = chat(client).headers["x-run-id"]
        minted = client.post("/api/token", json={"workflow": "tutor"}).json()["token"]
        client.get("/api/chat/tutor?chatId=a-chat-id-from-the-query")  # AI SDK 4's resume
        client.get("/auth/callback?code=an-authorization-code&state=s")  # no route without OIDC: "GET"

    answer = answer_span(receiver[1], run_id)
    spans = receiver[1].trace(answer.trace_id)
    receiver[1].wait_for(lambda span: span.name == "GET" and span.kind == "server", "of the callback")
    values = every_value(receiver[1].spans)
    tokens = [r["query"]["token"] for r in upstream.requests("stream")]
    queries = ["an-authorization-code", "a-chat-id-from-the-query"]
    forbidden = [TEST_API_KEY, SESSION_SECRET, cookie, user_id, QUESTION, ANSWER, minted, *queries]
    for secret in forbidden + tokens:
        assert not [value for value in values if secret in value], secret
    # The answer's words are not even there in pieces.
    assert not [value for value in values if ANSWER[:20] in value]
    pseudo = [span.attributes["enduser.pseudo.id"] for span in spans if "enduser.pseudo.id" in span.attributes]
    assert pseudo == ([answer.attributes["enduser.pseudo.id"]] if hashed else [])
    if hashed:
        assert len(pseudo[0]) == 16 and pseudo[0] not in user_id


def test_spans_are_exported_over_grpc_too(emulator: ServerProcess) -> None:
    with otlp_grpc_receiver() as (endpoint, received):
        server = start_proxy(emulator.url, **traced_env(endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="grpc"))
        try:
            with guest_of(server.url) as client:
                run_id = chat(client).headers["x-run-id"]
            answer = answer_span(received, run_id)
            assert server_span(received, answer.trace_id).name == "POST /api/chat/{alias}"
        finally:
            server.stop()
    assert answer.resource["service.name"] == "workflow-bff"


TRACING_MODULES = (
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter",
    "opentelemetry.instrumentation",
    "opentelemetry.propagate",
    "proxy.tracing.",
)

# A started app, serving a chat answer, then what it imported. Run in a child process of its own, so
# nothing this test process imported counts.
STARTED_APP = textwrap.dedent(
    """
    import asyncio, json, socket, sys
    import aiohttp, uvicorn
    from proxy.app import create_app
    from proxy.settings import Settings

    async def main(upstream_url):
        settings = Settings(
            _env_file=None, upstream_url=upstream_url, api_key=sys.argv[2], session_secrets=sys.argv[3],
            workflows="tutor=wf_tutor", auth="guest", cookie_secure=False,
        )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)  # connections wait in the backlog until uvicorn serves: no polling
        url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(settings), log_config=None))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        jar = aiohttp.CookieJar(unsafe=True)  # keeps cookies of an IP address
        async with aiohttp.ClientSession(headers={"X-CSRF": "1"}, cookie_jar=jar) as client:
            async with client.post(url + "/auth/guest") as response:
                assert response.status == 200, response.status
            body = {"messages": [{"role": "user", "content": "hi"}]}
            async with client.post(url + "/api/chat/tutor?protocol=text", json=body) as response:
                assert response.status == 200 and await response.text()
        server.should_exit = True
        await serving
        print(json.dumps(sorted(sys.modules)))

    asyncio.run(main(sys.argv[1]))
    """
)


def imported_by_a_started_app(upstream_url: str, **env: str) -> list[str]:
    """What of the tracing SDK, its exporters and instrumentations, and our spans module a started app
    imported. (redis-py imports OpenTelemetry's API and metrics SDK by itself when they are installed,
    for its own metrics, which stay off unless configured: not ours to count.)"""
    clean = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", STARTED_APP, upstream_url, TEST_API_KEY, SESSION_SECRET],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    imported: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return [name for name in imported if name.startswith(TRACING_MODULES)]


def test_with_tracing_off_opentelemetry_is_not_even_imported(
    emulator: ServerProcess, receiver: tuple[str, Received]
) -> None:
    assert imported_by_a_started_app(emulator.url) == []
    assert imported_by_a_started_app(emulator.url, OTEL_SDK_DISABLED="true", OTEL_TRACES_EXPORTER="otlp") == []
    # The same app with tracing on does import them: the check above can see an import.
    on = imported_by_a_started_app(emulator.url, **traced_env(receiver[0]))
    assert {"opentelemetry.sdk.trace", "opentelemetry.instrumentation.asgi", "proxy.tracing.spans"} <= set(on)


def test_redis_commands_are_spans_of_the_request_that_made_them(
    emulator: ServerProcess, receiver: tuple[str, Received], redis_server: RedisServer, upstream: EmulatorControl
) -> None:
    received = receiver[1]
    server = start_proxy(emulator.url, BFF_STORAGE_URL=redis_server.url, **traced_env(receiver[0]))
    try:
        with guest_of(server.url) as client:
            user_id = client.get("/auth/session").json()["user"]["id"]
            run_id = chat(client).headers["x-run-id"]
        answer = answer_span(received, run_id)
    finally:
        server.stop()  # exports what is left: a root span of a background task would be in by now

    spans = received.trace(answer.trace_id)
    commands = [
        span for span in spans if "redis" in (span.attributes.get("db.system"), span.attributes.get("db.system.name"))
    ]
    admission = only(spans, "bff.admission")
    assert [span for span in commands if span.parent_id == admission.span_id]  # the slot, the budget
    # Without their arguments (keys hold user ids and session ids): "EVALSHA ? ? ?".
    assert all(user_id not in value for value in every_value(commands))
    assert not [span for span in received.spans if span.parent_id == "" and span.kind == "client"]


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, []),
        ({"OTEL_SERVICE_NAME": "tutor-bff"}, []),  # naming the service turns nothing on
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp, console", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, []),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, []),
    ],
)
def test_tracing_is_on_only_when_the_standard_variables_ask(environ: dict[str, str], exporters: list[str]) -> None:
    assert exporter_names(environ) == exporters


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
    ],
)
def test_an_exporter_we_do_not_ship_stops_start_up_named(environ: dict[str, str]) -> None:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check"],
        cwd=ROOT,
        env={**clean, **proxy_env("http://127.0.0.1:9"), **environ},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert (
        "OTEL_TRACES_EXPORTER" if "OTEL_TRACES_EXPORTER" in environ else "OTEL_EXPORTER_OTLP_PROTOCOL"
    ) in result.stderr
    assert "Traceback" not in result.stderr


def test_only_a_peer_in_the_trusted_list_may_hand_over_its_trace() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from proxy.tracing.spans import Tracing

    tracing = Tracing(TracerProvider(), [], trusted=[ip_network("10.0.0.0/8"), ip_network("::1")])

    assert tracing.trusts(("10.1.2.3", 40000)) and tracing.trusts(["::1", 40000])
    assert not tracing.trusts(("192.168.1.1", 40000))
    assert not tracing.trusts(None)  # a Unix socket, or a server that does not say
    assert not tracing.trusts(("not-an-address", 0))
    assert not Tracing(TracerProvider(), []).trusts(("10.1.2.3", 40000))


def test_the_pseudonymous_user_id_is_keyed_stable_and_short() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from proxy.tracing.spans import Tracing

    one, other = (Tracing(TracerProvider(), [], user_key=key) for key in (b"k" * 32, b"q" * 32))

    assert one.pseudo_id("guest:abc") == one.pseudo_id("guest:abc") != one.pseudo_id("guest:abd")
    assert one.pseudo_id("guest:abc") != other.pseudo_id("guest:abc")  # without the key, no dictionary attack
    assert len(one.pseudo_id("guest:abc") or "") == 16
    assert Tracing(TracerProvider(), []).pseudo_id("guest:abc") is None
