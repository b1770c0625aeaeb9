"""The example React app (examples/react-chat) in a real browser: useChat against the relay, end to end.

Two ways, both driven by playwright-core in headless Debian Chromium:

- as its README runs it: Vite's dev server (`npm run dev`, on a free port) forwarding to workflow-bff's
  demo (`make run`), on another origin than workflow-bff; sign-in and a streamed answer on each of its
  three pages (tests/node/dev-server.mjs; screenshots test-artifacts/dev-server-{ui,text,token}.png);
- built with Vite from its pinned dependencies and served by workflow-bff itself at `/` (one origin,
  as behind one host): an answer, Stop, a reload mid-answer, an error (tests/node/browser.mjs). A
  screenshot of the finished chat goes to test-artifacts/chat.png.

The relay runs with the default grace period: a run goes on generating for 20 s after its reader
leaves, so a reload can resume it, and only the chat's stop route ends it sooner.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.emulator import generate_text, split_chunks
from tests.conftest import require_tool
from tests.servers import ROOT, START_TIMEOUT, EmulatorControl, ServerProcess, proxy_env
from tests.test_chat_node import APP_DIR, NODE_DIR, node_binary, require_node_modules

ARTIFACTS = ROOT / "test-artifacts"
VITE = APP_DIR / "node_modules" / "vite" / "bin" / "vite.js"  # what `npm run dev` and `npm run build` run
NO_CREDITS = "The upstream account has no credits left."
QUESTIONS = ("first question", "question to stop", "question to resume")
DEV_QUESTION = "Explain fractions"
DEV_SERVER_URL = re.compile(r"Local:\s+(http://127\.0\.0\.1:\d+)")


@dataclass
class AppServer(ServerProcess):
    """workflow-bff serving the built app too: `python -m tests.app_server` instead of `-m proxy`."""

    def start(self) -> AppServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.app_server", *self.command, "--host", "127.0.0.1", "--port", "0"],
            cwd=ROOT,
            env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(20) or not self.url:
            self.stop()
            raise RuntimeError("the app server did not start:\n" + "\n".join(self.logs))
        return self


@pytest.fixture(scope="module")
def built_app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_node_modules(APP_DIR)
    require_node_modules(NODE_DIR)
    out = tmp_path_factory.mktemp("react-chat") / "dist"
    subprocess.run(
        [node_binary(APP_DIR), str(VITE), "build", "--outDir", str(out), "--logLevel", "warn"],
        cwd=APP_DIR,
        check=True,
        timeout=120,
    )
    return out


@pytest.fixture(scope="module")
def app_server(built_app: Path, emulator: ServerProcess) -> Iterator[ServerProcess]:
    server = AppServer(["--static", str(built_app)], proxy_env(emulator.url, BFF_RESUME_GRACE_SECONDS="20")).start()
    yield server
    server.stop()


def drive_browser(app: ServerProcess, upstream: EmulatorControl, chromium: str, screenshot: Path) -> dict[str, Any]:
    config = {"url": app.url, "emulator": upstream.url, "chromium": chromium, "screenshot": str(screenshot)}
    done = subprocess.run(
        [node_binary(), "browser.mjs", json.dumps(config)],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_the_react_example_chats_stops_resumes_and_shows_errors_in_chromium(
    app_server: ServerProcess, upstream: EmulatorControl
) -> None:
    chromium = require_tool("chromium")
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "chat.png"
    first, to_stop, to_resume = (generate_text("wf_tutor", {"message": q}) for q in QUESTIONS[:3])

    report = drive_browser(app_server, upstream, chromium, screenshot)

    # useChat({id, resume: true}) on page load: the tab's new chat id has no run, and the 204 leaves
    # the chat ready, not in error.
    chat_id = report["onLoad"]["chatId"]
    assert chat_id
    assert report["onLoad"] == {
        "status": "ready",
        "error": 0,
        "chatId": chat_id,
        "resumes": [{"path": f"/api/chat/tutor/{chat_id}/stream", "status": 204}],
    }
    # The answer streams in and is exactly what the upstream produced.
    assert report["answered"] == {"status": "ready", "answers": [first]}
    # Stop mid-stream: the Stop button called the chat's stop route, which cancelled the upstream
    # request well inside the grace period; the partial answer stays.
    stopped = report["stopped"]
    assert stopped["statusWhileStreaming"] == "streaming"
    assert stopped["upstreamCancelled"] is True
    assert stopped["stops"] == [{"path": f"/api/chat/tutor/{chat_id}/stop", "status": 204}]
    assert stopped["status"] == "ready"
    assert stopped["answers"][1] == split_chunks(to_stop)[0]
    # Reloaded mid-answer: the same chat, its saved messages, and the answer resumed from the one
    # upstream stream (nothing asked again). The replay's message id matches the saved partial
    # message, so the whole answer shows once, in its place.
    assert report["resumed"] == {
        "sameChat": True,
        "statusWhileHeld": "streaming",
        "status": "ready",
        "questions": list(QUESTIONS[:3]),
        "answers": [first, split_chunks(to_stop)[0], to_resume],
        "resumes": [{"path": f"/api/chat/tutor/{chat_id}/stream", "status": 200}],
        "upstreamStarts": 1,
    }
    # An upstream 402 becomes the relay's short plain-text body, shown as the chat's error.
    assert report["refused"] == {"status": "error", "error": NO_CREDITS}
    assert report["consoleErrors"] == []
    assert screenshot.stat().st_size > 0


@pytest.fixture(scope="module")
def demo_server() -> Iterator[ServerProcess]:
    """`make run`: workflow-bff's demo, with its emulated upstream in the same process at /_emulator."""
    server = ServerProcess(["demo"], {k: "" for k in os.environ if k.startswith("BFF_")}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dev_server(demo_server: ServerProcess) -> Iterator[str]:
    """`npm run dev` with `BFF_URL` set to the demo, on 127.0.0.1 and a free port (`--port 0`): its URL."""
    require_node_modules(APP_DIR)
    process = subprocess.Popen(
        [node_binary(APP_DIR), str(VITE), "--host", "127.0.0.1", "--port", "0"],
        cwd=APP_DIR,
        env={**os.environ, "BFF_URL": demo_server.url, "NO_COLOR": "1"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    logs: list[str] = []
    urls: list[str] = []
    listening = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            logs.append(line.rstrip("\n"))
            if not urls and (found := DEV_SERVER_URL.search(line)):
                urls.append(found[1])
                listening.set()
        listening.set()  # it exited

    threading.Thread(target=read, daemon=True).start()
    try:
        if not listening.wait(START_TIMEOUT) or not urls:
            raise RuntimeError("the Vite dev server did not start:\n" + "\n".join(logs))
        yield urls[0]
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def test_the_react_examples_dev_server_signs_in_and_streams_on_all_three_pages(
    dev_server: str, demo_server: ServerProcess
) -> None:
    """The README's path: `make run`, then `npm run dev`. The page is on the dev server's origin, not
    workflow-bff's: the proxied requests must still pass workflow-bff's origin check, with no setting."""
    chromium = require_tool("chromium")
    require_node_modules(NODE_DIR)
    ARTIFACTS.mkdir(exist_ok=True)
    assert dev_server != demo_server.url  # another origin, as localhost:5173 is for :8000
    config = {
        "url": dev_server,
        "emulator": f"{demo_server.url}/_emulator",
        "chromium": chromium,
        "screenshots": str(ARTIFACTS),
        "question": DEV_QUESTION,
    }
    done = subprocess.run(
        [node_binary(), "dev-server.mjs", json.dumps(config)],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    full = generate_text("wf_demo_tutor", {"message": DEV_QUESTION})
    first_chunk = split_chunks(full)[0]
    # The call that streamed the answer on each page (the token page mints first, then streams from
    # the stream_url it got: the demo's upstream, reached through the dev server).
    streamed_from = {
        "ui": "/api/chat/tutor",
        "text": "/api/chat/tutor",
        "token": "/_emulator/api/v1/run/wf_demo_tutor/stream",
    }

    for page, stream_path in streamed_from.items():
        result = report[page]
        calls = result["calls"]
        # Signed in: before the fix, 403 "This origin is not allowed." showed here instead.
        assert result["refusal"] is None, page
        assert re.fullmatch(r"Signed in as guest guest_\w+", result["signedIn"]), page
        assert {"method": "POST", "origin": dev_server, "path": "/auth/guest", "status": 200} in calls
        # Streamed: while the upstream held back all but its first chunk, the page showed exactly that
        # chunk, then the whole answer once released. Nothing buffered it on the way.
        assert result["held"] == {"status": "streaming", "text": first_chunk}, page
        assert result["done"] == {"status": "ready", "text": full, "error": 0}, page
        assert {"method": "POST", "origin": dev_server, "path": stream_path, "status": 200} in calls, page
        # Every call went to the page's own origin (no CORS, no preflight), and none was refused; the
        # only error answer allowed is the "not signed in yet" of /auth/session on load.
        assert {call["origin"] for call in calls} == {dev_server}, page
        assert [call for call in calls if call["method"] == "OPTIONS"] == [], page
        assert [call for call in calls if call["status"] >= 400 and call["path"] != "/auth/session"] == [], page
    assert {"method": "POST", "origin": dev_server, "path": "/api/token", "status": 200} in report["token"]["calls"]
    assert report["pageErrors"] == []
    for page in streamed_from:
        assert (ARTIFACTS / f"dev-server-{page}.png").stat().st_size > 0
