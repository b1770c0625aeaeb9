"""The example React app (examples/react-chat) in a real browser: useChat against the relay, end to end.

The app is built with Vite from its pinned dependencies, served by workflow-bff itself at `/` (one
origin, as behind one host), and driven by playwright-core in headless Debian Chromium
(tests/node/browser.mjs). A screenshot of the finished chat goes to test-artifacts/chat.png.

The relay runs with the default grace period: a run goes on generating for 20 s after its reader
leaves, so a reload can resume it, and only the chat's stop route ends it sooner.
"""

from __future__ import annotations

import json
import os
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
from tests.servers import ROOT, EmulatorControl, ServerProcess, proxy_env
from tests.test_chat_node import NODE_DIR, require_node_modules

APP_DIR = ROOT / "examples" / "react-chat"
ARTIFACTS = ROOT / "test-artifacts"
NO_CREDITS = "The upstream account has no credits left."
QUESTIONS = ("first question", "question to stop", "question to resume")


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
    require_tool("node")
    require_node_modules(APP_DIR)
    require_node_modules(NODE_DIR)
    out = tmp_path_factory.mktemp("react-chat") / "dist"
    subprocess.run(
        [str(APP_DIR / "node_modules" / ".bin" / "vite"), "build", "--outDir", str(out), "--logLevel", "warn"],
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
        ["node", "browser.mjs", json.dumps(config)],
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
