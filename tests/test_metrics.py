"""`GET /metrics` (CONTRACT B7): Prometheus text that follows what the service did, with no per-user labels."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import UPSTREAM_ERROR_KINDS, Metrics
from proxy.runs.ending import REASONS
from tests.servers import EmulatorControl, ServerProcess, free_port, proxy_with, start_proxy


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample, 0 when it has not been recorded yet."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        match = re.fullmatch(r"([a-z_]+)(\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(3) or ""))
        if found == labels:
            return float(match.group(4))
    return 0.0


def test_metrics_count_requests_by_route_template_mints_and_upstream_errors(
    guest: httpx.Client, upstream: EmulatorControl
) -> None:
    before = guest.get("/metrics").text
    guest.post("/api/token", json={"workflow": "tutor"})
    guest.post("/api/workflows/tutor/stream", json={"message": "x"})
    upstream.fault(op="run", workflow="wf_story", status=402)
    guest.post("/api/workflows/story/run", json={"topic": "x"})

    after = guest.get("/metrics")

    assert after.status_code == 200
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    route = "/api/workflows/{alias}/stream"
    assert sample(text, "bff_requests_total", route=route, method="POST", status="200") == (
        sample(before, "bff_requests_total", route=route, method="POST", status="200") + 1
    )
    assert sample(text, "bff_mints_total", outcome="ok") == sample(before, "bff_mints_total", outcome="ok") + 2
    assert sample(text, "bff_upstream_errors_total", kind="4xx") == (
        sample(before, "bff_upstream_errors_total", kind="4xx") + 1
    )
    assert "guest_" not in text  # never a per-user label


def test_with_a_metrics_port_metrics_are_served_there_only(emulator: ServerProcess) -> None:
    port = free_port()
    server = start_proxy(emulator.url, BFF_METRICS_PORT=str(port))
    try:
        listening = server.wait_for_log(lambda e: e.get("message") == "listening")
        public = httpx.get(server.url + "/metrics")
        private = httpx.get(f"http://127.0.0.1:{port}/metrics")
        api_on_private = httpx.post(f"http://127.0.0.1:{port}/auth/guest", headers={"X-CSRF": "1"})
        still_public = httpx.get(server.url + "/healthz")
    finally:
        server.stop()
    assert listening["metrics_url"] == f"http://127.0.0.1:{port}/metrics"
    assert public.status_code == 404
    assert private.status_code == 200 and "bff_requests_total" in private.text
    assert api_on_private.status_code == 404
    assert still_public.status_code == 200


def families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    return {
        family.name: [(s.name, dict(s.labels), s.value) for s in family.samples if not s.name.endswith("_created")]
        for family in text_string_to_metric_families(text)
    }


@pytest.mark.parametrize("multiprocess", [False, True], ids=["one process", "PROMETHEUS_MULTIPROC_DIR"])
def test_a_fresh_proxy_scrapes_every_family_with_a_zero_for_each_closed_label_value(
    emulator: ServerProcess, tmp_path: Path, multiprocess: bool
) -> None:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)} if multiprocess else {}
    server = start_proxy(emulator.url, **env)
    try:
        scraped = families(httpx.get(server.url + "/metrics").text)
    finally:
        server.stop()

    # Every family but the requests by route, which has a series from the first answer on.
    expected = {family.name for family in Metrics().registry.collect()} - {"bff_requests"}
    assert expected <= scraped.keys()
    assert all(value == 0.0 for name in expected for _, _, value in scraped[name])
    zeros = {(sample, tuple(sorted(labels.items()))) for name in expected for sample, labels, _ in scraped[name]}
    assert ("bff_upstream_errors_total", (("kind", "5xx"),)) in zeros
    for kind in UPSTREAM_ERROR_KINDS:
        assert ("bff_upstream_errors_total", (("kind", kind),)) in zeros
    for limit in ("mint", "relay", "login"):
        assert ("bff_rate_limited_total", (("limit", limit),)) in zeros
    for end in REASONS:
        assert ("bff_stream_ends_total", (("end", end),)) in zeros
    for event in ("created", "renewed", "revoked"):
        assert ("bff_session_events_total", (("event", event),)) in zeros
    for outcome in ("deferred", "settled", "dropped"):
        assert ("bff_budget_charged_chars_total", (("outcome", outcome),)) in zeros
    for stage in ("before_first_byte", "after_first_byte"):
        assert ("bff_client_disconnects_total", (("stage", stage),)) in zeros
    for operation in ("mint", "stream", "run"):
        assert ("bff_upstream_headers_seconds_count", (("operation", operation), ("outcome", "ok"))) in zeros
    assert ("bff_upstream_mint_seconds_bucket", (("le", "+Inf"), ("outcome", "ok"))) in zeros
    assert ("bff_upstream_first_chunk_seconds_count", (("operation", "stream"), ("outcome", "ok"))) in zeros


def timings(text: str) -> dict[str, float]:
    """Each new histogram's count and sum, by operation and outcome, as `count mint ok`, `sum stream ok`, ..."""
    found: dict[str, float] = {}
    for name, labels, value in [s for f in families(text).values() for s in f]:
        for family in ("bff_upstream_mint_seconds", "bff_upstream_headers_seconds", "bff_upstream_first_chunk_seconds"):
            for part in ("count", "sum"):
                if name == f"{family}_{part}":
                    what = family.removeprefix("bff_upstream_").removesuffix("_seconds")
                    found[" ".join([part, what, labels.get("operation", "-"), labels["outcome"]])] = value
    return found


def grew(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: round(after[key] - before.get(key, 0.0), 3) for key in after if after[key] != before.get(key, 0.0)}


def counts(grown: dict[str, float]) -> dict[str, float]:
    return {key.removeprefix("count "): value for key, value in grown.items() if key.startswith("count ")}


def test_a_mint_a_stream_and_a_run_observe_the_upstream_timings(guest: httpx.Client, upstream: EmulatorControl) -> None:
    # Each upstream call made to wait before it answers, so the times observed can be told from noise.
    before = timings(guest.get("/metrics").text)
    upstream.fault(op="mint", stall=0.2)
    assert guest.post("/api/token", json={"workflow": "tutor"}).status_code == 200
    minted = timings(guest.get("/metrics").text)
    upstream.fault(op="stream", stall=0.3)
    assert guest.post("/api/workflows/tutor/stream", json={"message": "x"}).status_code == 200
    streamed = timings(guest.get("/metrics").text)
    upstream.fault(op="run", stall=0.3)
    assert guest.post("/api/workflows/story/run", json={"topic": "x"}).status_code == 200
    ran = timings(guest.get("/metrics").text)

    mint = grew(before, minted)
    assert counts(mint) == {"mint - ok": 1, "headers mint ok": 1}
    assert mint["sum mint - ok"] >= mint["sum headers mint ok"] >= 0.2
    stream = grew(minted, streamed)
    assert counts(stream) == {"mint - ok": 1, "headers mint ok": 1, "headers stream ok": 1, "first_chunk stream ok": 1}
    assert stream["sum first_chunk stream ok"] >= stream["sum headers stream ok"] >= 0.3
    run = grew(streamed, ran)
    assert counts(run) == {"headers run ok": 1, "first_chunk run ok": 1}
    assert run["sum first_chunk run ok"] >= run["sum headers run ok"] >= 0.3


def test_failed_upstream_calls_are_timed_by_outcome(guest: httpx.Client, upstream: EmulatorControl) -> None:
    before = timings(guest.get("/metrics").text)
    upstream.fault(op="run", workflow="wf_story", status=500)
    guest.post("/api/workflows/story/run", json={"topic": "x"})
    upstream.fault(op="stream", workflow="wf_tutor", cut_after=0)  # the headers, then nothing
    with pytest.raises(httpx.RemoteProtocolError):  # the relay's answer breaks off too
        guest.post("/api/workflows/tutor/stream", json={"message": "x"})
    after = timings(guest.get("/metrics").text)

    assert counts(grew(before, after)) == {
        "headers run 5xx": 1,
        "mint - ok": 1,
        "headers mint ok": 1,
        "headers stream ok": 1,
        "first_chunk stream cut": 1,
    }


def test_calls_the_open_circuit_refuses_are_upstream_errors(emulator: ServerProcess) -> None:
    # Nothing listens on the upstream's port; one failure opens the circuit.
    with proxy_with(f"http://127.0.0.1:{free_port()}", BFF_UPSTREAM_FAILURE_THRESHOLD="1") as client:
        assert client.post("/api/token", json={"workflow": "tutor"}).status_code == 503
        text = client.get("/metrics").text

    assert sample(text, "bff_upstream_errors_total", kind="connect") == 1
    assert sample(text, "bff_upstream_headers_seconds_count", operation="mint", outcome="connect") == 1
    # The mint's retry met the open circuit: nothing was sent, so nothing was timed.
    assert sample(text, "bff_upstream_errors_total", kind="circuit_open") == 1
    assert sample(text, "bff_mints_total", outcome="failed") == 1
    assert sample(text, "bff_upstream_mint_seconds_count", outcome="failed") == 1
