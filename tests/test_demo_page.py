"""The quickstart works as a newcomer sees it: `make run`'s page streams an answer in a real browser.

tests/node/demo-page.mjs drives the page in headless Chromium; the demo's emulated upstream runs in the
same process, and the script reaches its `/_control` API at `/_emulator/_control`.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.emulator import generate_text, split_chunks
from tests.conftest import require_tool
from tests.servers import ROOT, ServerProcess
from tests.test_chat_node import NODE_DIR, require_node_modules

ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def demo() -> Iterator[ServerProcess]:
    env = {k: "" for k in os.environ if k.startswith("BFF_")}
    # The documented default, spelled out: a run outlives its reader this long (resume after a reload).
    env["BFF_RESUME_GRACE_SECONDS"] = "20"
    server = ServerProcess(["demo"], env).start()
    yield server
    server.stop()


def drive_demo_page(demo: ServerProcess, scenario: str) -> dict[str, Any]:
    require_tool("chromium")
    require_node_modules(NODE_DIR)
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / f"demo-{scenario}.png"
    result = subprocess.run(
        ["node", "demo-page.mjs", demo.url + "/", str(screenshot), scenario],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["violations"] == []  # the strict CSP lets the page do everything it needs
    assert report["pageErrors"] == []
    assert screenshot.stat().st_size > 0
    return report


def test_the_demo_page_signs_in_and_streams_answers_in_both_modes(demo: ServerProcess) -> None:
    report = drive_demo_page(demo, "modes")

    for mode in ("relay", "token"):
        assert report["answers"][mode]["status"] == "done"
        assert report["answers"][mode]["text"] == generate_text("wf_demo_tutor", {"message": f"volcanoes via {mode}"})


def test_the_demo_page_reloaded_mid_answer_shows_the_whole_answer_once(demo: ServerProcess) -> None:
    question = "volcanoes after a reload"
    answer = generate_text("wf_demo_tutor", {"message": question})
    first_chunk = split_chunks(answer)[0]

    report = drive_demo_page(demo, "reload")

    # A fresh tab has no chat to resume: nothing is drawn.
    assert report["onFirstLoad"] == {"status": "idle", "messages": 0}
    assert report["beforeReload"] == {"status": "streaming", "answer": first_chunk}
    # After the reload, while the upstream still holds: the question is redrawn, and the answer is
    # replayed from its first character under the same chat id.
    assert report["afterReload"] == {
        "status": "streaming",
        "questions": [question],
        "answers": [first_chunk],
        "sameChat": True,
    }
    # Released: the whole answer, exactly once, from the one upstream stream (the reload asked nothing new).
    assert report["finished"] == {"status": "done", "questions": [question], "answers": [answer]}
    assert report["upstream"] == {"starts": 1, "ends": ["complete"]}


def test_the_demo_pages_stop_button_ends_the_answer_upstream(demo: ServerProcess) -> None:
    question = "volcanoes to stop"
    first_chunk = split_chunks(generate_text("wf_demo_tutor", {"message": question}))[0]

    report = drive_demo_page(demo, "stop")

    # The run outlives its reader for 20 s, so the upstream sees the cancel within the 10 s waited for
    # only because Stop also called POST /api/chat/tutor/{chatId}/stop.
    assert report["stopped"] == {
        "upstreamCancelled": True,
        "status": "stopped",
        "answers": [first_chunk + " [stopped]"],
    }
