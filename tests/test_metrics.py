"""`GET /metrics` (CONTRACT B7): Prometheus text that follows what the service did, with no per-user labels."""

from __future__ import annotations

import re

import httpx

from tests.servers import EmulatorControl, ServerProcess, free_port, start_proxy


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
