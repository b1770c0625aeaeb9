"""Resuming a cut answer with the real AI SDK clients in Node (ai 7, 6, 5; AI SDK 4), on one proxy
and across two replicas sharing a real Redis.

tests/node/chat-client.mjs runs the scenario `cut-resume`: a chat's connection is cut after the first
text delta while the emulated upstream holds the rest back. There it pauses (`handshake`), and this
file checks that the proxy saw the client leave and kept the run and its upstream stream going
(BFF_RESUME_GRACE_SECONDS > 0). Then a reloaded page of the same chat resumes: first while the
upstream still holds back (so what it shows is replayed from the run's log), then live; and once
more after the run ended.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Callable, Iterator

import pytest

from proxy.emulator import split_chunks
from tests.servers import TEST_API_KEY, EmulatorControl, RedisServer, ServerProcess, start_proxy
from tests.test_chat_node import (
    NODE_DIR,
    WORKFLOWS,
    Report,
    answer,
    inputs,
    node_binary,
    require_node_modules,
    run_client,
    shown,
)

GRACE_SECONDS = "20"  # a run outlives its client this long: far longer than a test takes to resume
CUT_QUESTION = "question cut short"  # as in chat-client.mjs
CLIENTS = [("ai-7", "ui"), ("ai-6", "ui"), ("ai-5", "ui"), ("ai-5-strict", "ui"), ("ui-utils", "data")]
IDS = [f"{client}-{protocol}" for client, protocol in CLIENTS]
NODE_TIMEOUT_SECONDS = 60
CHAT_ROUTE = "/api/chat/{alias}"  # POST: a turn; GET: AI SDK 4's experimental_resume
RESUME_ROUTE = "/api/chat/{alias}/{chat_id}/stream"
AtCut = Callable[[str], None]


@pytest.fixture(scope="module")
def upstream() -> Iterator[EmulatorControl]:
    require_node_modules(NODE_DIR)
    server = ServerProcess(["emulator", "--chunk-delay", "0"], {"BFF_API_KEY": TEST_API_KEY}).start()
    yield EmulatorControl(server.url)
    server.stop()


@pytest.fixture(scope="module")
def workflows_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("resume") / "workflows.toml"
    path.write_text(WORKFLOWS)
    return str(path)


def resumable(upstream: EmulatorControl, workflows_file: str, **extra: str) -> ServerProcess:
    return start_proxy(
        upstream.url,
        BFF_WORKFLOWS="",
        BFF_WORKFLOWS_FILE=workflows_file,
        BFF_RESUME_GRACE_SECONDS=GRACE_SECONDS,
        **extra,
    )


@pytest.fixture(scope="module")
def proxy(upstream: EmulatorControl, workflows_file: str) -> Iterator[ServerProcess]:
    server = resumable(upstream, workflows_file)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(
    upstream: EmulatorControl, workflows_file: str, redis_server: RedisServer
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    first = resumable(upstream, workflows_file, BFF_STORAGE_URL=redis_server.url)
    try:
        second = resumable(upstream, workflows_file, BFF_STORAGE_URL=redis_server.url)
    except Exception:
        first.stop()
        raise
    yield first, second
    first.stop()
    second.stop()


def run_cut_resume(
    client: str,
    protocol: str,
    proxy: ServerProcess,
    upstream: EmulatorControl,
    at_cut: AtCut,
    resume_proxy: ServerProcess | None = None,
) -> Report:
    """chat-client.mjs's `cut-resume`, with `at_cut(run_id)` run while it waits at the cut."""
    config = {
        "client": client,
        "protocol": protocol,
        "proxy": proxy.url,
        "emulator": upstream.url,
        "only": ["cut-resume"],
        "handshake": True,
        "timeoutMs": NODE_TIMEOUT_SECONDS * 1000,
    }
    if resume_proxy is not None:
        config["resumeProxy"] = resume_proxy.url
    with tempfile.TemporaryFile("w+") as stderr:
        node = subprocess.Popen(
            [node_binary(), "chat-client.mjs", json.dumps(config)],
            cwd=NODE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        assert node.stdin is not None and node.stdout is not None
        try:
            # Bounded: the script exits by itself after timeoutMs, which ends this read.
            paused = node.stdout.readline()
            if not paused:
                node.wait(NODE_TIMEOUT_SECONDS)
                stderr.seek(0)
                raise AssertionError(f"chat-client.mjs ended before the cut ({node.returncode}):\n{stderr.read()}")
            pause = json.loads(paused)
            assert pause["pause"] == "cut"
            at_cut(pause["runId"])
            node.stdin.write("go\n")
            node.stdin.flush()
            out, _ = node.communicate(timeout=NODE_TIMEOUT_SECONDS)
        finally:
            if node.poll() is None:
                node.kill()
                node.wait()
        stderr.seek(0)
        assert node.returncode == 0, stderr.read()
    report: Report = json.loads(out)["cut-resume"]
    return report


def request_ends(server: ServerProcess, run_id: str) -> list[dict[str, object]]:
    """The server's access-log lines of the requests that followed this run."""
    return [e for e in server.log_entries() if e.get("message") == "request end" and e.get("run_id") == run_id]


def the_client_left(producer: ServerProcess, upstream: EmulatorControl) -> AtCut:
    """At the cut: the proxy saw the client go, and kept the run and its upstream stream open."""

    def check(run_id: str) -> None:
        line = producer.wait_for_log(lambda e: e.get("message") == "request end" and e.get("run_id") == run_id)
        assert (line["method"], line["route"], line["status"], line["end"]) == ("POST", CHAT_ROUTE, 200, "client_gone")
        assert upstream.events(kind="stream_end") == []  # still held back by the emulator, not cancelled
        assert len(upstream.requests("stream")) == 1

    return check


def assert_resumed_whole(report: Report, protocol: str, resumed_at: ServerProcess, upstream: EmulatorControl) -> None:
    full = answer(CUT_QUESTION)
    first_chunk = split_chunks(full)[0]
    post = report["post"]
    assert (post["method"], post["status"]) == ("POST", 200)
    assert post["runId"]

    # Cut after the first delta, with the rest held back: the page showed only that much.
    assert report["textAtCut"] == first_chunk != full
    assert shown(report["afterCut"]) == [("user", CUT_QUESTION), ("assistant", first_chunk)]
    assert report["afterCut"]["status"] in ("ready", "error")

    # The reloaded page was shown the first chunk while the upstream still held the rest back: a
    # replay from the run's log. Then the rest, live: the whole answer, exactly once, no error.
    assert report["textReplayed"] == first_chunk
    assert report["streamEndsAtReplay"] == 0
    resumed = report["resumed"]
    assert (resumed["status"], resumed["error"]) == ("ready", None)
    assert shown(resumed) == [("user", CUT_QUESTION), ("assistant", full)]

    # Every resume found the same run, on the replica the balancer sent it to.
    assert len(report["resumes"]) == 2
    for response in report["resumes"]:
        assert response["url"].startswith(resumed_at.url)
        assert (response["status"], response["runId"], response["streamHeader"]) == (200, post["runId"], "v1")

    if protocol == "ui":
        # The resumed message is the original one (same `start` messageId), so a client that still
        # shows the partial answer replaces it instead of adding a second one.
        message_id = report["postMessageId"]
        assert message_id and message_id.startswith("msg_")
        assert resumed["messages"][1]["id"] == message_id
        for response in report["resumes"]:
            assert response["url"].endswith("/stream")
            assert response["contentType"].startswith("text/event-stream")
            assert response["head"].startswith(f'data: {{"type":"start","messageId":"{message_id}"}}\n\n')
        # After the run ended: reconnectToStream + readUIMessageStream still give it all.
        assert report["afterEnd"] == {"id": message_id, "text": full, "errors": []}
    else:
        # AI SDK 4 asks GET {api}?chatId=... and reads the data stream; its messages carry no server id.
        for response in report["resumes"]:
            assert "?chatId=cut-ui-utils-" in response["url"]
            assert response["head"].startswith("0:" + json.dumps(first_chunk) + "\n")
        after_end = report["afterEnd"]
        assert (after_end["status"], after_end["error"]) == ("ready", None)
        assert shown(after_end) == [("user", CUT_QUESTION), ("assistant", full)]

    # One run: the upstream was asked once, and that stream ran to its end.
    assert report["upstream"] == [inputs(CUT_QUESTION)]
    ends = upstream.wait(kind="stream_end")
    assert [end["reason"] for end in ends] == ["complete"]
    assert len(upstream.requests("stream")) == 1


@pytest.mark.parametrize(("client", "protocol"), CLIENTS, ids=IDS)
def test_a_cut_answer_resumes_whole_with_the_real_client(
    proxy: ServerProcess, upstream: EmulatorControl, client: str, protocol: str
) -> None:
    report = run_cut_resume(client, protocol, proxy, upstream, the_client_left(proxy, upstream))

    assert_resumed_whole(report, protocol, proxy, upstream)
    route = RESUME_ROUTE if protocol == "ui" else CHAT_ROUTE
    resumes = [e for e in request_ends(proxy, report["post"]["runId"]) if e["method"] == "GET"]
    assert [(e["route"], e["status"], e["end"]) for e in resumes] == [(route, 200, "complete")] * 2


@pytest.mark.parametrize(("client", "protocol"), CLIENTS, ids=IDS)
def test_a_cut_answer_resumes_whole_on_another_replica(
    replicas: tuple[ServerProcess, ServerProcess], upstream: EmulatorControl, client: str, protocol: str
) -> None:
    first, second = replicas
    # Started on the first replica; every resume goes to the second, with the same cookie.
    report = run_cut_resume(client, protocol, first, upstream, the_client_left(first, upstream), resume_proxy=second)

    assert_resumed_whole(report, protocol, second, upstream)
    run_id = report["post"]["runId"]
    assert [e["method"] for e in request_ends(first, run_id)] == ["POST"]
    route = RESUME_ROUTE if protocol == "ui" else CHAT_ROUTE
    served = [(e["method"], e["route"], e["status"], e["end"]) for e in request_ends(second, run_id)]
    assert served == [("GET", route, 200, "complete")] * 2


def test_ai_sdk_4_resume_of_a_chat_without_a_run_is_an_empty_stream(
    proxy: ServerProcess, upstream: EmulatorControl
) -> None:
    """experimental_resume() on mount, for a chat with no run: 200 with an empty data stream (a 204
    would be "The response body is empty."); the chat stays ready, its saved messages as they were."""
    report = run_client("ui-utils", "data", proxy, upstream, only=["resume-none"])["resume-none"]

    response = report["response"]
    assert response["method"] == "GET"
    assert "/api/chat/tutor?chatId=unknown-ui-utils-" in response["url"]
    assert (response["status"], response["head"], response["streamHeader"]) == (200, "", "v1")
    assert response["runId"] is None
    assert (report["status"], report["error"], report["updates"]) == ("ready", None, 0)
    assert shown(report) == [("user", "earlier question"), ("assistant", answer("earlier question"))]
    assert report["upstream"] == [inputs("earlier question")]  # the saved turn only; the resume asked nothing
