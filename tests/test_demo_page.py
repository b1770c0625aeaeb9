"""The quickstart works as a newcomer sees it: `make run`'s page streams an answer in a real browser."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from proxy.emulator import generate_text
from tests.conftest import require_tool
from tests.servers import ROOT, ServerProcess
from tests.test_chat_node import NODE_DIR, require_node_modules

ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def demo() -> Iterator[ServerProcess]:
    server = ServerProcess(["demo"], {k: "" for k in os.environ if k.startswith("BFF_")}).start()
    yield server
    server.stop()


def test_the_demo_page_signs_in_and_streams_answers_in_both_modes(demo: ServerProcess) -> None:
    require_tool("chromium")
    require_node_modules(NODE_DIR)
    ARTIFACTS.mkdir(exist_ok=True)

    result = subprocess.run(
        ["node", "demo-page.mjs", demo.url + "/", str(ARTIFACTS / "demo.png")],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=90,
    )

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for mode in ("relay", "token"):
        assert report["answers"][mode]["status"] == "done"
        assert report["answers"][mode]["text"] == generate_text("wf_demo_tutor", {"message": f"volcanoes via {mode}"})
    assert report["violations"] == []  # the strict CSP lets the page do everything it needs
