"""Reading a chat request costs time linear in its size, for every trigger and message shape
(issue 16: a regenerate with a long history once held the event loop for seconds at the body cap).

In-process, on `parse_chat_request` and `chat_inputs` alone. Not a timing assertion: the cost of a
request 8 times larger is compared with a small one's, and linear work gives about 8 times, quadratic
about 64; the bound (24) sits far from both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from proxy.chat import chat_inputs, parse_chat_request
from proxy.workflows import Workflow

WORKFLOW = Workflow(alias="tutor", id="wf_tutor", history_input="history", image_input="image_url")
SMALL, GROWTH, LINEAR_BOUND = 1500, 8, 24


def ui(role: str, n: int) -> dict[str, Any]:
    return {"id": f"{role}{n}", "role": role, "parts": [{"type": "text", "text": f"{role} {n}"}]}


def turns(n: int) -> list[dict[str, Any]]:
    return [ui("user" if i % 2 == 0 else "assistant", i) for i in range(n)]


SHAPES: dict[str, Callable[[int], dict[str, Any]]] = {
    "submit": lambda n: {"messages": [*turns(n), ui("user", n)], "trigger": "submit-message"},
    "regenerate-after-many-answers": lambda n: {
        "messages": [ui("user", 0), *(ui("assistant", i) for i in range(n))],
        "trigger": "regenerate-message",
    },
    "edit-an-early-message": lambda n: {
        "messages": [ui("user", 0), *turns(n)],
        "trigger": "submit-message",
        "messageId": "user0",
    },
    "v4-content": lambda n: {"messages": [{"role": m["role"], "content": m["id"]} for m in [*turns(n), ui("user", n)]]},
    "many-parts": lambda n: {
        "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "x"}] * n}],
    },
    "many-system-messages": lambda n: {
        "messages": [*({"id": f"s{i}", "role": "system", "parts": []} for i in range(n)), ui("user", 0)],
    },
}


def cost(body: dict[str, Any]) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        chat_inputs(parse_chat_request(body), WORKFLOW, 1_000_000)
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_reading_a_chat_request_is_linear_in_its_size(shape: str) -> None:
    build = SHAPES[shape]
    small, large = cost(build(SMALL)), cost(build(SMALL * GROWTH))

    assert large / small < LINEAR_BOUND, f"{shape}: {GROWTH}x the size cost {large / small:.0f}x the time"
