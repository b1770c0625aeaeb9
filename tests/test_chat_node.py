"""The real AI SDK clients against `/api/chat/{alias}`: every generation still in use, in Node.

tests/node/chat-client.mjs drives one client (pinned in tests/node/package-lock.json, installed by
`make test`) through the same scenarios and reports what the client ended up showing; this file
holds the expectations. The AbstractChat base class is the whole of `useChat` minus React; AI SDK 4
is `callChatApi`, which `useChat` of @ai-sdk/react 1.x runs for every turn.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.emulator import generate_text, split_chunks
from proxy.runs.ending import INTERRUPTED
from tests.conftest import IN_CI, require_tool
from tests.servers import ROOT, TEST_API_KEY, EmulatorControl, ServerProcess, start_proxy

NODE_DIR = ROOT / "tests" / "node"
APP_DIR = ROOT / "examples" / "react-chat"
# Node 24 from the npm registry (tests/node/runtime, installed by `make test` before tests/node itself).
RUNTIME_NODE = NODE_DIR / "runtime" / "node_modules" / ".bin" / "node"
CLIENTS_NEED_NODE = 22  # ai 7's engines: "node": ">=22"
WORKFLOW_ID = "wf_tutor"
WORKFLOWS = f"""
[workflows.tutor]
id = "{WORKFLOW_ID}"
history_input = "history"
image_input = "image_url"
"""
CLIENTS = [
    ("ai-7", "ui"),  # ai 7.0.173, the current release
    ("ai-6", "ui"),  # ai 6.0.326
    ("ai-5", "ui"),  # ai 5.0.277
    ("ai-5-strict", "ui"),  # ai 5.0.91: rejects unknown fields and finishReason on finish
    ("ai-7", "text"),  # TextStreamChatTransport
    ("ai-5-strict", "text"),
    ("ui-utils", "data"),  # AI SDK 4 (@ai-sdk/ui-utils 1.2.11), its default protocol
    ("ui-utils", "text"),  # AI SDK 4 with streamProtocol: "text"
]
SDK_CLIENTS = [(client, protocol) for client, protocol in CLIENTS if client != "ui-utils"]
NO_CREDITS = "The upstream account has no credits left."
Report = dict[str, Any]


def node_binary(directory: Path = NODE_DIR) -> str:
    """The one Node to run `directory`'s scripts and npm with, as `make test` installed them.

    tests/node: the Node 24 of tests/node/runtime (the clients include ai 7, which needs Node >= 22,
    and the machine's may be older), or where that is not installed (not linux-x64) the machine's
    own, if new enough. Anything else (the example app): the machine's `node`, the one a reader of
    examples/react-chat/README.md runs `npm ci` and `npm run dev` with.
    """
    if directory != NODE_DIR:
        return require_tool("node")
    if RUNTIME_NODE.exists():
        return str(RUNTIME_NODE)
    system = require_tool("node")
    if node_major(system) < CLIENTS_NEED_NODE:
        message = (
            f"tests/node needs Node >= {CLIENTS_NEED_NODE} (ai 7); {system} is older and "
            "tests/node/runtime is not installed: run `make test`, which installs it"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return system


@functools.cache
def node_major(node: str) -> int:
    done = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10, check=True)
    return int(done.stdout.strip().lstrip("v").split(".")[0])


def npm_env(directory: Path) -> dict[str, str]:
    """The environment in which `npm` (a `#!/usr/bin/env node` script) runs under node_binary()."""
    node_dir = os.path.dirname(node_binary(directory))
    return {**os.environ, "PATH": node_dir + os.pathsep + os.environ.get("PATH", "")}


def require_node_modules(directory: Path) -> None:
    node_binary(directory)
    if not (directory / "node_modules").is_dir():
        message = f"npm dependencies missing: run `npm ci` in {directory.relative_to(ROOT)} (make test does)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def fast_upstream() -> Iterator[EmulatorControl]:
    """An emulator of its own that streams without pauses between chunks: the clients run many turns.
    Incremental delivery is still proven, by holding the stream back (`hold_after`)."""
    require_node_modules(NODE_DIR)
    server = ServerProcess(["emulator", "--chunk-delay", "0"], {"BFF_API_KEY": TEST_API_KEY}).start()
    yield EmulatorControl(server.url)
    server.stop()


@pytest.fixture(scope="module")
def chat_proxy(fast_upstream: EmulatorControl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workflows = tmp_path_factory.mktemp("node") / "workflows.toml"
    workflows.write_text(WORKFLOWS)
    server = start_proxy(fast_upstream.url, BFF_WORKFLOWS="", BFF_WORKFLOWS_FILE=str(workflows))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reports() -> dict[tuple[str, str], Report]:
    """Each client runs its scenarios once per test run; several tests read the same report."""
    return {}


def report_of(
    reports: dict[tuple[str, str], Report], client: str, protocol: str, proxy: ServerProcess, upstream: EmulatorControl
) -> Report:
    if (client, protocol) not in reports:
        reports[client, protocol] = run_client(client, protocol, proxy, upstream)
    return reports[client, protocol]


def run_client(
    client: str, protocol: str, proxy: ServerProcess, upstream: EmulatorControl, **options: object
) -> Report:
    config = {"client": client, "protocol": protocol, "proxy": proxy.url, "emulator": upstream.url, **options}
    done = subprocess.run(
        [node_binary(), "chat-client.mjs", json.dumps(config)],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: Report = json.loads(done.stdout)
    return report


def inputs(message: str, history: str = "", **extra: str) -> dict[str, str]:
    return {"message": message, "history": history, **extra}


def answer(message: str, history: str = "") -> str:
    return generate_text(WORKFLOW_ID, inputs(message, history))


def shown(result: Report) -> list[tuple[str, str]]:
    return [(message["role"], message["text"]) for message in result["messages"]]


@pytest.mark.parametrize(("client", "protocol"), CLIENTS, ids=[f"{c}-{p}" for c, p in CLIENTS])
def test_the_real_client_chats_through_the_relay(
    chat_proxy: ServerProcess,
    fast_upstream: EmulatorControl,
    reports: dict[tuple[str, str], Report],
    client: str,
    protocol: str,
) -> None:
    report = report_of(reports, client, protocol, chat_proxy, fast_upstream)

    # Two turns: each answer is exactly what the upstream streamed, and the first one is kept.
    conversation = report["conversation"]
    first = answer("first question")
    history = f"User: first question\n\nAssistant: {first}"
    second = answer("second question", history)
    assert conversation["upstream"] == [inputs("first question"), inputs("second question", history)]
    assert (conversation["status"], conversation["error"]) == ("ready", None)
    assert shown(conversation) == [
        ("user", "first question"),
        ("assistant", first),
        ("user", "second question"),
        ("assistant", second),
    ]
    assert conversation["messages"][:2] == conversation["afterFirst"]["messages"]
    assert len({message["id"] for message in conversation["messages"]}) == 4

    # Incremental: the client showed text while the upstream was still holding the rest back.
    incremental = report["incremental"]
    full = answer("incremental question")
    assert incremental["streamEndsAtFirstDelta"] == 0
    assert incremental["textAtFirstDelta"]
    assert full.startswith(incremental["textAtFirstDelta"])
    assert incremental["textAtFirstDelta"] != full
    assert shown(incremental)[-1] == ("assistant", full)

    # An upstream failure mid-stream: the chat's error, with the partial answer kept.
    cut = report["cut"]
    assert cut["status"] == "error"
    if protocol == "text":
        assert cut["error"]  # plain text cannot say why; the client sees the dropped connection
    else:
        assert cut["error"] == INTERRUPTED
    partial = "".join(split_chunks(answer("question that breaks"))[:3])
    assert shown(cut) == [("user", "question that breaks"), ("assistant", partial)]

    # Refusals before streaming: the short text/plain body is the error the chat shows.
    assert (report["refused"]["status"], report["refused"]["error"]) == ("error", NO_CREDITS)
    assert shown(report["refused"]) == [("user", "question without credits")]
    assert report["unknown"]["error"] == "No workflow is configured under that name."
    assert report["unknown"]["upstream"] == []


@pytest.mark.parametrize(("client", "protocol"), SDK_CLIENTS, ids=[f"{c}-{p}" for c, p in SDK_CLIENTS])
def test_regenerate_edit_resume_and_images_work_with_the_real_client(
    chat_proxy: ServerProcess,
    fast_upstream: EmulatorControl,
    reports: dict[tuple[str, str], Report],
    client: str,
    protocol: str,
) -> None:
    report = report_of(reports, client, protocol, chat_proxy, fast_upstream)
    first = answer("first question")
    history = f"User: first question\n\nAssistant: {first}"

    # regenerate() replaces the last answer with a new message, asked with the same inputs.
    regenerate = report["regenerate"]
    assert regenerate["upstream"][2] == inputs("second question", history)
    assert shown(regenerate) == [
        ("user", "first question"),
        ("assistant", first),
        ("user", "second question"),
        ("assistant", answer("second question", history)),
    ]
    ids = [message["id"] for message in regenerate["messages"]]
    assert ids[:3] == regenerate["idsBefore"][:3]
    assert ids[3] != regenerate["idsBefore"][3]

    # Editing the first message drops everything after it, for the client and for the upstream.
    edit = report["edit"]
    assert edit["upstream"][2] == inputs("first question, edited")
    assert shown(edit) == [("user", "first question, edited"), ("assistant", answer("first question, edited"))]

    # resume: true on a chat that never ran: the route answers 204, and the chat stays ready and empty
    # (resuming a run that did: tests/test_resume_node.py).
    if protocol == "ui":
        resumed = report["resume"]
        assert resumed["response"]["method"] == "GET"
        assert resumed["response"]["url"].endswith("/stream")
        assert (resumed["response"]["status"], resumed["response"]["head"]) == (204, "")
        assert (resumed["status"], resumed["error"], resumed["messages"]) == ("ready", None, [])

    # An attached https image reaches the workflow's image input.
    image = report["image"]
    assert image["upstream"] == [inputs("what is in this picture?", image_url="https://images.example/cat.png")]
    assert image["status"] == "ready"
    assert image["firstUserParts"] == ["file", "text"]


@pytest.fixture(scope="module")
def short_deadline_proxy(fast_upstream: EmulatorControl) -> Iterator[ServerProcess]:
    """Streams end after 4 s here, so keep-alives come every second (a quarter of the deadline)."""
    server = start_proxy(fast_upstream.url, BFF_WORKFLOWS="tutor=wf_tutor", BFF_MAX_STREAM_SECONDS="4")
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("client", "protocol", "keepalive"),
    [("ai-5-strict", "ui", ": keep-alive\n\n"), ("ai-7", "ui", ": keep-alive\n\n"), ("ui-utils", "data", "\n")],
    ids=["ai-5-strict-ui", "ai-7-ui", "ui-utils-data"],
)
def test_keep_alives_before_the_first_byte_are_ignored_by_the_real_client(
    short_deadline_proxy: ServerProcess, fast_upstream: EmulatorControl, client: str, protocol: str, keepalive: str
) -> None:
    # The upstream answers only after 1.5 s: past the first keep-alive, well before the deadline.
    report = run_client(client, protocol, short_deadline_proxy, fast_upstream, only=["keepalive"], stall=1.5)

    slow = report["keepalive"]
    assert slow["rawStart"].startswith(keepalive)
    assert (slow["status"], slow["error"]) == ("ready", None)
    assert shown(slow) == [
        ("user", "slow question"),
        ("assistant", generate_text(WORKFLOW_ID, {"message": "slow question"})),
    ]


@pytest.mark.parametrize("directory", [NODE_DIR, APP_DIR], ids=["tests-node", "react-chat"])
def test_npm_ci_installs_every_pinned_package_on_the_node_that_runs_it(directory: Path, tmp_path: Path) -> None:
    """`npm ci` of the lockfile under node_binary(), refusing (engine-strict) any package whose `engines`
    exclude that Node: no EBADENGINE warning when `make test` (or a reader of the example's README,
    with the machine's Node) installs it. A dry run in a copy: the lockfile alone, nothing downloaded."""
    npm = require_tool("npm")
    assert "engine-strict=true" in (directory / ".npmrc").read_text().splitlines()  # npm ci refuses, not warns
    for name in ("package.json", "package-lock.json", ".npmrc"):
        shutil.copy(directory / name, tmp_path / name)
    done = subprocess.run(
        [npm, "ci", "--dry-run", "--no-audit", "--no-fund"],
        cwd=tmp_path,
        env=npm_env(directory),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "npm warn" not in done.stdout + done.stderr
    assert "add ai " in done.stdout or "add ai-7 " in done.stdout  # the dry run did list the packages
