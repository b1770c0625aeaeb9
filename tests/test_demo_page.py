"""The quickstart works as a newcomer sees it: `make run`'s page streams an answer in a real browser.

tests/node/demo-page.mjs drives the page in headless Chromium; the demo's emulated upstream runs in the
same process, and the script reaches its `/_control` API at `/_emulator/_control`. Screenshots go to
test-artifacts/ (git-ignored): look at them after a change to the page.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from proxy.emulator import generate_text, split_chunks
from tests.conftest import require_tool
from tests.oidc_idp import CLIENT_ID, CLIENT_SECRET, Idp, idp_port, running_idp
from tests.servers import ROOT, ServerProcess, free_port
from tests.test_chat_node import NODE_DIR, node_binary, require_node_modules

ARTIFACTS = ROOT / "test-artifacts"
WORKFLOW_ID = "wf_demo_tutor"


def demo_env(**env: str) -> dict[str, str]:
    # The documented default, spelled out: a run outlives its reader this long (resume after a reload).
    return {**{k: "" for k in os.environ if k.startswith("BFF_")}, "BFF_RESUME_GRACE_SECONDS": "20", **env}


@pytest.fixture(scope="module")
def demo() -> Iterator[ServerProcess]:
    server = ServerProcess(["demo"], demo_env()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oidc_demo() -> Iterator[tuple[ServerProcess, Idp]]:
    """`python -m proxy demo` with the test provider's issuer and client in its environment, and no
    BFF_PUBLIC_URL: the demo's own address is the one registered at the provider. Ports are chosen up
    front, as each side must know the other's address."""
    require_node_modules(NODE_DIR)
    port, demo_port = idp_port(), free_port()
    issuer = f"http://localhost:{port}"  # another site than the demo's 127.0.0.1, as in production
    env = demo_env(BFF_OIDC_ISSUER=issuer, BFF_OIDC_CLIENT_ID=CLIENT_ID, BFF_OIDC_CLIENT_SECRET=CLIENT_SECRET)
    server = ServerProcess(["demo"], env, port=demo_port).start()
    try:
        with running_idp(node_binary(), str(NODE_DIR), server.url, port) as idp:
            assert idp.issuer == issuer
            yield server, idp
    finally:
        server.stop()


def answer(question: str) -> str:
    return generate_text(WORKFLOW_ID, {"message": question})


def png_size(path: Path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk
    return width, height


def drive_demo_page(demo: ServerProcess, scenario: str, console_errors: tuple[str, ...] = ()) -> dict[str, Any]:
    require_tool("chromium")
    require_node_modules(NODE_DIR)
    ARTIFACTS.mkdir(exist_ok=True)
    result = subprocess.run(
        [node_binary(), "demo-page.mjs", demo.url + "/", str(ARTIFACTS), scenario],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["violations"] == []  # the strict CSP lets the page do everything it needs
    assert report["pageErrors"] == []
    # A first visit logs nothing: no 401 from a session check, no missing favicon.
    assert report["onLoad"] == {"consoleErrors": [], "failedResponses": [], "logoLoaded": True, "icon": "/favicon.svg"}
    assert tuple(report["consoleErrors"]) == console_errors  # and later only what the scenario provokes
    assert report["screenshots"]
    for screenshot in map(Path, report["screenshots"]):
        assert screenshot.stat().st_size > 0
    return report


def test_the_demo_page_signs_in_and_streams_answers_in_both_modes(demo: ServerProcess) -> None:
    refusal = "Failed to load resource: the server responded with a status of 402 (Payment Required)"
    report = drive_demo_page(demo, "modes", console_errors=(refusal,))

    for mode in ("relay", "token"):
        shown = report["answers"][mode]
        assert shown["status"] == "done"
        assert shown["text"] == answer(f"volcanoes via {mode}")
        assert shown["badge"] == f"{mode} mode"  # which mode produced the answer
        assert shown["hint"].startswith(mode.capitalize() + ":")  # the mode, explained in one line
    assert report["answers"]["relay"]["hint"] != report["answers"]["token"]["hint"]
    refused = report["refused"]  # the error is shown where the answer would have been
    assert refused["status"] == "error" and refused["answer"] == "" and refused["sendShown"]
    assert len(refused["alerts"]) == 1 and "credits" in refused["alerts"][0]


def test_the_demo_page_reloaded_mid_answer_shows_the_whole_answer_once(demo: ServerProcess) -> None:
    question = "volcanoes after a reload"
    first_chunk = split_chunks(answer(question))[0]

    report = drive_demo_page(demo, "reload")

    # A fresh tab has no chat to resume: nothing is drawn.
    assert report["onFirstLoad"] == {"status": "idle", "messages": 0}
    assert report["beforeReload"] == {"status": "streaming", "answer": first_chunk}
    # After the reload, while the upstream still holds: the question is redrawn, and the answer is
    # replayed from its first character under the same chat id (the reload kept its guest session).
    assert report["afterReload"] == {
        "status": "streaming",
        "questions": [question],
        "answers": [first_chunk],
        "sameChat": True,
    }
    # Released: the whole answer, exactly once, from the one upstream stream (the reload asked nothing new).
    assert report["finished"] == {"status": "done", "questions": [question], "answers": [answer(question)]}
    assert report["upstream"] == {"starts": 1, "ends": ["complete"]}


def test_the_demo_pages_stop_button_ends_the_answer_upstream(demo: ServerProcess) -> None:
    question = "volcanoes to stop"
    first_chunk = split_chunks(answer(question))[0]

    report = drive_demo_page(demo, "stop")

    # The run outlives its reader for 20 s, so the upstream sees the cancel within the 10 s waited for
    # only because Stop also called POST /api/chat/tutor/{chatId}/stop.
    assert report["stopped"] == {
        "upstreamCancelled": True,
        "status": "stopped",
        "answers": [first_chunk],
        "marked": ["stopped"],
    }


def assert_fits(stage: dict[str, Any], width: int) -> None:
    assert stage["innerWidth"] == width
    assert stage["scrollWidth"] <= width  # no horizontal overflow
    # Every control lies inside the viewport, at least 24 px, and nothing covers its centre.
    assert {control: problems for control, problems in stage["controls"].items() if problems} == {}


@pytest.mark.parametrize(("width", "height"), [(360, 740), (390, 844), (1280, 800)])
def test_the_demo_page_fits_and_works_from_a_phone_to_a_desktop(demo: ServerProcess, width: int, height: int) -> None:
    report = drive_demo_page(demo, f"layout:{width}x{height}")

    assert_fits(report["idle"], width)
    assert {"#send", ".suggestion[0]", 'label[for="mode-token"]'} <= set(report["idle"]["controls"])

    waiting = report["waiting"]  # before the first word: dots in the answer's place, and Stop
    assert_fits(waiting, width)
    assert "#stop" in waiting["controls"]
    assert waiting["status"] == "streaming" and waiting["answer"] == ""

    streaming = report["streaming"]
    assert_fits(streaming, width)
    assert "#stop" in streaming["controls"]
    assert streaming["status"] == "streaming" and "relay mode" in streaming["statusText"]
    assert streaming["answer"] == split_chunks(answer("How do volcanoes erupt?"))[0]
    assert streaming["sendHidden"] is True  # Stop takes Send's place while the tutor answers
    assert streaming["streamingShown"] == 1
    assert streaming["logBusy"] == "true"  # screen readers read the answer once it is complete
    assert report["stopped"] == {"status": "stopped", "focused": "prompt"}

    chat = report["chat"]
    assert_fits(chat, width)
    assert chat["status"] == "done"
    assert chat["answers"] == [answer(question) for question in chat["questions"]]
    assert chat["badges"] == ["token mode", "relay mode", "token mode", "relay mode"]
    assert chat["composerMoved"] == 0 and chat["composerAtBottom"]  # the composer stays at the bottom
    assert chat["lastAnswerInView"]  # the conversation scrolls to the newest answer, above the composer
    if width < 1000:
        assert chat["chatScrolls"]  # the chat is longer than the screen, so this proves something
    assert set(report["hints"]) == {"relay", "token"} and report["hints"]["relay"] != report["hints"]["token"]

    for screenshot in map(Path, report["screenshots"]):
        assert png_size(screenshot) == (width, height)


def test_the_demo_serves_a_favicon_and_a_session_check_that_never_answers_401(demo: ServerProcess) -> None:
    icon = httpx.get(demo.url + "/favicon.svg")
    legacy = httpx.get(demo.url + "/favicon.ico")
    with httpx.Client(base_url=demo.url, headers={"X-CSRF": "1"}) as client:
        before = client.get("/demo/session")
        client.post("/auth/guest").raise_for_status()
        after = client.get("/demo/session")
        contract = httpx.get(demo.url + "/auth/session")

    assert icon.status_code == legacy.status_code == 200
    assert icon.headers["content-type"] == "image/svg+xml" and icon.text.startswith("<svg")
    assert "default-src 'none'" in icon.headers["content-security-policy"]
    assert before.status_code == 200 and before.json()["user"] is None
    assert set(before.json()["modes"]) == {"relay", "token"}
    assert before.json()["sign_in"] is None  # no identity provider configured: guests only, as before
    assert after.status_code == 200 and after.json()["user"]["kind"] == "guest"
    assert contract.status_code == 401  # /auth/session keeps its contract


def test_the_demo_with_an_identity_provider_offers_sign_in_beside_guests(
    oidc_demo: tuple[ServerProcess, Idp],
) -> None:
    server, idp = oidc_demo
    with httpx.Client(base_url=server.url, headers={"X-CSRF": "1"}) as client:
        offered = client.get("/demo/session")
        guest = client.post("/auth/guest")
        login = client.get("/auth/login", params={"returnTo": "/"})

    assert offered.status_code == 200 and offered.json()["user"] is None
    assert offered.json()["sign_in"] == "/auth/login"
    assert guest.status_code == 200 and guest.json()["user"]["kind"] == "guest"  # guests as before
    assert login.status_code == 302 and login.headers["location"].startswith(idp.issuer + "/")
    # No BFF_PUBLIC_URL: the provider sends the browser back to the demo's own address.
    assert parse_qs(urlsplit(login.headers["location"]).query)["redirect_uri"] == [f"{server.url}/auth/callback"]


@pytest.mark.parametrize(("width", "height"), [(360, 740), (1280, 800)])
def test_the_demo_page_signs_in_at_the_provider_and_shows_the_user_by_name(
    oidc_demo: tuple[ServerProcess, Idp], width: int, height: int
) -> None:
    server, idp = oidc_demo
    report = drive_demo_page(server, f"oidc:{width}x{height}")

    guest = report["guest"]  # a first visit is a guest, as without a provider, now with "Sign in"
    assert guest["session"] == "guest" and guest["who"].startswith("Guest ")
    assert guest["signInShown"] and not guest["signOutShown"]
    assert guest["href"] == "/auth/login?returnTo=%2F"
    assert_fits(guest, width)

    assert report["loginPage"] == urlsplit(idp.issuer).netloc  # the provider's own login page
    signed_in = report["signedIn"]  # back on the demo, by name, and the tutor answers
    assert signed_in["path"] == "/"
    assert signed_in["user"] == {"id": "oidc:alice", "kind": "oidc", "name": "Test alice"}
    assert signed_in["session"] == "oidc" and signed_in["who"] == "Test alice"
    assert signed_in["intro"] == "You are signed in as Test alice."
    assert signed_in["signOutShown"] and not signed_in["signInShown"]
    assert signed_in["answer"] == {"status": "done", "text": answer("volcanoes as alice")}
    assert_fits(signed_in, width)

    signed_out = report["signedOut"]  # signed out at the provider too, and a guest again
    assert signed_out["session"] == "guest" and signed_out["signInShown"] and not signed_out["signOutShown"]
    assert any(event["event"] == "end_session.success" for event in idp.lines)

    failed = report["authError"]
    assert failed["text"] == "Sign-in failed: the sign-in was cancelled at the identity provider."
    assert failed["role"] == "alert" and failed["search"] == ""  # said once: gone from the address bar
    assert_fits(failed, width)
    assert report["unknownAuthError"] == "Sign-in failed: the sign-in did not complete. Try again."
    for screenshot in map(Path, report["screenshots"]):
        assert png_size(screenshot) == (width, height)
