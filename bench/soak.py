"""Soak: mixed traffic with faults injected at random, for a bounded time, then the proof.

`python -m bench.soak --seconds 300` (`make soak`); tests/test_soak.py runs 20 seconds of it in `make test`.

Real processes (the emulated upstream and `python -m proxy serve`) and concurrent clients. Each client
is one signed-in user with a workflow of its own, so a stream fault it injects into the emulator
(`/_control/faults` for its workflow) can only meet its own requests: it knows what it should see.
It sends relays in all three protocols, runs, token mints, session checks and invalid bodies, and a
chaos task breaks mints now and then for everyone. Clients also give up before the first byte and
leave mid-stream. Afterwards:

- every answer was exact (byte for byte, or the exact text in the UI and data protocols) or an
  explicit failure: an error status with an error body, an in-band error, or, for plain text, a
  stream that broke off (never one that ended cleanly with the wrong or a short text);
- nothing leaked: `bff_open_streams` is 0, the upstream saw every stream it started end, the proxy's
  resident memory and open file descriptors were flat after the warm-up;
- the proxy's metrics agree with what the clients saw: requests by route and status, stream ends by
  reason, disconnects by stage, relayed bytes, upstream cuts, and mints with the upstream's count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from proxy.emulator import generate_text, split_chunks
from proxy.runs.ending import INTERRUPTED
from tests.servers import TEST_API_KEY, ServerProcess, start_proxy

SAMPLE_SECONDS = 0.25
WARM_UP_SHARE = 0.3  # memory and descriptors are judged after this share of the run
# Allowed growth after the warm-up: allocator noise on a short run, never a per-request leak.
RSS_SLACK_BYTES = 8 * 1024 * 1024
RSS_SLACK_SHARE = 0.10
SETTLE_SECONDS = 15.0
MAX_BACKOFF_SECONDS = 1.0
WAIT_SECONDS = 10.0
QUESTIONS = ["fractions", "café ✓", "数学", "photosynthesis", "the water cycle", "long division"]
# Raw bytes that are not all UTF-8, split mid-character: relayed as-is in text, replaced in UI/data.
GARBAGE = [b"h\xc3", b"\xa9llo ", b"\xff\xfe", b"\xe2\x82", b"wor", b"\x00ld"]

# What a client does next, with weights.
ACTIONS = {"text": 4, "ui": 4, "data": 2, "run": 2, "token": 1, "session": 1, "invalid": 1}
# The stream fault a client injects for its next relay, with weights.
FAULTS: dict[str, tuple[int, dict[str, Any] | None]] = {
    "none": (10, None),
    "cut": (2, {"cut_after": 2}),
    "drop": (1, {"drop": True}),
    "garbage": (1, {"chunks": [chunk.decode("latin-1") for chunk in GARBAGE]}),
    "slow": (1, {"delay": 0.03}),
    "refuse": (2, None),  # a status, chosen when injected
    "give_up": (1, {"stall": 60}),  # the client leaves before the first byte
    "leave": (1, {"hold_after": 1}),  # the client leaves after the first chunk
}
REFUSALS = [402, 404, 429, 500]


@dataclass
class Tally:
    """What the clients saw, in the terms the proxy's metrics use."""

    requests: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # route, method, status
    ends: Counter[str] = field(default_factory=Counter)  # relay ends, refusals as "refused"
    disconnects: Counter[str] = field(default_factory=Counter)
    relayed_bytes: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # action:outcome, for the report
    faults: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


@dataclass
class Report:
    seconds: float
    tally: Tally
    rss: list[int]
    fds: list[int]
    problems: list[str]

    def summary(self) -> str:
        requests = sum(self.tally.requests.values())
        rss, fds = self.rss, self.fds
        lines = [
            f"soak: {self.seconds:.0f} s, {requests} requests",
            f"faults injected: {dict(sorted(self.tally.faults.items()))}",
            f"outcomes: {dict(sorted(self.tally.outcomes.items()))}",
            f"memory (RSS, MiB): {_mib(rss[0])} at start, {_mib(max(rss))} peak, {_mib(rss[-1])} at end",
            f"open descriptors: {fds[0]} at start, {max(fds)} peak, {fds[-1]} at end",
        ]
        lines += [f"PROBLEM: {problem}" for problem in self.problems] or ["no problems"]
        return "\n".join(lines)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f}"


class Backoff:
    """Waits out a refusal's Retry-After (at most a moment) before the next request, as a person
    would: without it, a client in a tight loop of instant 503s would be most of the traffic."""

    def __init__(self) -> None:
        self.seconds = 0.0

    async def __call__(self, response: httpx.Response) -> None:
        retry_after = response.headers.get("retry-after", "")
        if response.status_code in (429, 503) and retry_after.isdigit():
            self.seconds = min(float(retry_after), MAX_BACKOFF_SECONDS)

    async def wait(self) -> None:
        if self.seconds:
            await asyncio.sleep(self.seconds)
            self.seconds = 0.0


class Soak:
    def __init__(self, proxy: ServerProcess, emulator: ServerProcess, seconds: float, seed: int) -> None:
        self.proxy = proxy
        self.emulator = emulator
        self.deadline = time.monotonic() + seconds
        self.random = random.Random(seed)
        self.tally = Tally()
        self.control = httpx.AsyncClient(base_url=emulator.url, timeout=30.0)

    # Talking to the proxy, counting every answer the way /metrics counts it

    async def call(
        self, client: httpx.AsyncClient, method: str, path: str, route: str, **kwargs: Any
    ) -> httpx.Response:
        response = await client.request(method, path, **kwargs)
        self.tally.requests[(route, method, str(response.status_code))] += 1
        return response

    async def metrics(self, client: httpx.AsyncClient) -> str:
        return (await self.call(client, "GET", "/metrics", "/metrics")).text

    # Talking to the emulator

    async def fault(self, **rule: Any) -> None:
        (await self.control.post("/_control/faults", json=rule)).raise_for_status()

    async def events(self, **match: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = (await self.control.get("/_control/events", params=match)).json()
        return found

    async def wait_for(self, count: int, **match: str) -> bool:
        params = {**match, "count": str(count), "timeout": str(WAIT_SECONDS)}
        return (await self.control.get("/_control/wait", params=params)).status_code == 200

    # One user

    async def user(self, number: int) -> None:
        alias, workflow = f"w{number}", f"wf_w{number}"
        pending: str | None = None  # a fault injected for this user's workflow and not yet met
        backoff = Backoff()
        async with httpx.AsyncClient(
            base_url=self.proxy.url, headers={"X-CSRF": "1"}, timeout=30.0, event_hooks={"response": [backoff]}
        ) as client:
            (await self.call(client, "POST", "/auth/guest", "/auth/guest")).raise_for_status()
            while time.monotonic() < self.deadline:
                await backoff.wait()
                action = self.random.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
                question = self.random.choice(QUESTIONS)
                if action in ("text", "ui", "data"):
                    if pending is None:
                        pending = await self.inject(workflow)
                    started = len(await self.events(kind="stream_start", workflow=workflow))
                    await self.relay(client, action, alias, workflow, question, pending)
                    # A relay refused before it reached the upstream leaves the fault for the next one.
                    if len(await self.events(kind="stream_start", workflow=workflow)) > started:
                        pending = None
                else:
                    await self.other(client, action, alias, workflow, question)

    async def inject(self, workflow: str) -> str:
        names = list(FAULTS)
        name = self.random.choices(names, weights=[FAULTS[n][0] for n in names])[0]
        rule = FAULTS[name][1]
        if name == "refuse":
            rule = {"status": self.random.choice(REFUSALS), "retry_after": 1}
        if rule is not None:
            await self.fault(op="stream", workflow=workflow, **rule)
        self.tally.faults[name] += 1
        return name

    async def relay(
        self, client: httpx.AsyncClient, protocol: str, alias: str, workflow: str, question: str, fault: str
    ) -> None:
        body: dict[str, Any]
        if protocol == "text":
            path, route, body = f"/api/workflows/{alias}/stream", "/api/workflows/{alias}/stream", {"message": question}
        else:
            path, route = f"/api/chat/{alias}?protocol={protocol}", "/api/chat/{alias}"
            body = {"messages": [{"role": "user", "parts": [{"type": "text", "text": question}]}]}
        expected = [generate_text(workflow, {"message": question}).encode()]
        first = split_chunks(expected[0].decode())[0].encode()
        if fault == "garbage":
            expected.append(b"".join(GARBAGE))
        if fault == "give_up":
            started = len(await self.events(kind="stream_start", workflow=workflow))
            request = asyncio.ensure_future(self.call(client, "POST", path, route, json=body))
            # The client leaves once the upstream has the request and is still silent.
            gave_up = asyncio.ensure_future(self.wait_for(started + 1, kind="stream_start", workflow=workflow))
            done, _ = await asyncio.wait({request, gave_up}, return_when=asyncio.FIRST_COMPLETED)
            if request in done:
                gave_up.cancel()
                self.judge(protocol, request.result(), expected, stream=None)
                return
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
            self.tally.ends["client_gone_early"] += 1
            self.tally.disconnects["before_first_byte"] += 1
            self.tally.outcomes[f"{protocol}:gave_up"] += 1
            return
        async with client.stream("POST", path, json=body) as response:
            self.tally.requests[(route, "POST", str(response.status_code))] += 1
            received = b""
            try:
                async for chunk in response.aiter_raw():
                    received += chunk
                    if fault == "leave" and response.status_code == 200 and _first_chunk_in(protocol, received, first):
                        break
                else:
                    self.judge(protocol, response, expected, stream=received)
                    return
            except httpx.RemoteProtocolError:
                self.judge(protocol, response, expected, stream=received, broken=True)
                return
        self.tally.relayed_bytes += len(received)
        self.tally.ends["client_gone"] += 1
        self.tally.disconnects["after_first_byte"] += 1
        self.tally.outcomes[f"{protocol}:left"] += 1

    def judge(
        self,
        protocol: str,
        response: httpx.Response,
        expected: list[bytes],
        *,
        stream: bytes | None,
        broken: bool = False,
    ) -> None:
        """Exact, or explicitly failed; anything else is a violation."""
        body = stream if stream is not None else response.content
        if response.status_code != 200:
            self.tally.ends["refused"] += 1
            outcome = f"refused_{response.status_code}" if _explicit_refusal(protocol, response, body) else "VIOLATION"
        else:
            self.tally.relayed_bytes += len(body)
            text, ending = _relayed(protocol, body, broken)
            # The UI and data protocols carry text: what cannot be decoded arrives as U+FFFD.
            candidates = [raw if protocol == "text" else raw.decode("utf-8", "replace").encode() for raw in expected]
            if ending == "complete" and text in candidates:
                outcome = "complete"
            elif ending == "failed" and any(candidate.startswith(text) for candidate in candidates):
                outcome = "cut"
            else:
                outcome = "VIOLATION"
            self.tally.ends["complete" if outcome == "complete" else "upstream_cut"] += 1
        self.tally.outcomes[f"{protocol}:{outcome}"] += 1
        if outcome == "VIOLATION":
            self.tally.violations.append(f"{protocol} {response.status_code}: {body[:300]!r}")

    async def other(self, client: httpx.AsyncClient, action: str, alias: str, workflow: str, question: str) -> None:
        if action == "run":
            response = await self.call(
                client, "POST", f"/api/workflows/{alias}/run", "/api/workflows/{alias}/run", json={"message": question}
            )
            good = response.status_code == 200 and response.json()["result"] == generate_text(
                workflow, {"message": question}
            )
        elif action == "token":
            response = await self.call(client, "POST", "/api/token", "/api/token", json={"workflow": alias})
            good = response.status_code == 200 and response.json()["token"].startswith("pub_tok_")
        elif action == "session":
            response = await self.call(client, "GET", "/auth/session", "/auth/session")
            good = response.status_code == 200
        else:
            route = "/api/workflows/{alias}/stream"
            response = await self.call(client, "POST", f"/api/workflows/{alias}/stream", route, json={"message": 5})
            good = response.status_code == 422
        if not good and not _explicit_refusal("json", response, response.content):
            self.tally.violations.append(f"{action} {response.status_code}: {response.content[:300]!r}")
            self.tally.outcomes[f"{action}:VIOLATION"] += 1
        else:
            self.tally.outcomes[f"{action}:{'ok' if good else 'refused'}"] += 1

    async def chaos(self) -> None:
        """Now and then, break the next mint of whoever asks: retried (500, a dropped connection) or
        honoured for a second (429)."""
        while time.monotonic() < self.deadline:
            await asyncio.sleep(self.random.uniform(0.5, 2.0))
            kind = self.random.choices(["500", "drop", "429"], weights=[3, 3, 1])[0]
            rule: dict[str, Any] = {"drop": True} if kind == "drop" else {"status": int(kind), "retry_after": 1}
            await self.fault(op="mint", **rule)
            self.tally.faults[f"mint_{kind}"] += 1


def _first_chunk_in(protocol: str, received: bytes, first: bytes) -> bool:
    """Whether all the proxy sent before the upstream's hold has arrived: the first chunk, framed."""
    if protocol == "text":
        return len(received) >= len(first)
    if protocol == "ui":
        return b'"type":"text-delta"' in received and received.endswith(b"\n\n")
    return received.startswith(b"0:") and received.endswith(b"\n")


def _relayed(protocol: str, body: bytes, broken: bool) -> tuple[bytes, str]:
    """(the relayed text as UTF-8, "complete" | "failed" | "malformed") of a 200 answer."""
    if protocol == "text":
        return body, "failed" if broken else "complete"
    if broken:
        return b"", "malformed"  # UI and data streams end in-band; a broken one is a violation
    text = body.decode()
    if protocol == "ui":
        events = [
            line.removeprefix("data: ")
            for line in text.split("\n")
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
        chunks = [json.loads(event) for event in events]
        if not text.endswith("data: [DONE]\n\n"):
            return b"", "malformed"
        deltas = "".join(chunk.get("delta", "") for chunk in chunks if chunk.get("type") == "text-delta").encode()
        last = chunks[-1] if chunks else {}
        if last == {"type": "finish"}:
            return deltas, "complete"
        return deltas, "failed" if last == {"type": "error", "errorText": INTERRUPTED} else "malformed"
    parts = [(line[0], json.loads(line[2:])) for line in text.split("\n") if line]
    deltas = "".join(value for code, value in parts if code == "0").encode()
    if parts and parts[-1] == ("d", {"finishReason": "stop"}):
        return deltas, "complete"
    return deltas, "failed" if parts and parts[-1] == ("3", INTERRUPTED) else "malformed"


def _explicit_refusal(protocol: str, response: httpx.Response, body: bytes) -> bool:
    """An error status with an error body: JSON {"error": {"code", "message"}}, or a chat's short text."""
    if not 400 <= response.status_code < 600 or response.status_code == 500:
        return False
    if protocol in ("ui", "data") or response.headers.get("content-type", "").startswith("text/plain"):
        return 0 < len(body) < 300
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error.get("code"), str) and isinstance(error.get("message"), str)


def _sample(metrics: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            metric, _, value = line.rpartition(" ")
            found = dict(part.split("=", 1) for part in metric[len(name) + 1 : -1].split(",") if "=" in part)
            if all(found.get(key) == f'"{wanted}"' for key, wanted in labels.items()):
                total += float(value)
    return total


def _by_label(metrics: str, name: str, label: str) -> Counter[str]:
    found: Counter[str] = Counter()
    for line in metrics.splitlines():
        if line.startswith(name + "{"):
            metric, _, value = line.rpartition(" ")
            labels = dict(part.split("=", 1) for part in metric[len(name) + 1 : -1].split(","))
            found[labels[label].strip('"')] += int(float(value))
    return found


def _proc(pid: int) -> tuple[int, int]:
    """(resident memory in bytes, open file descriptors) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return rss, len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def _sample_process(pid: int, until: float, rss: list[int], fds: list[int]) -> None:
    while time.monotonic() < until:
        memory, descriptors = _proc(pid)
        rss.append(memory)
        fds.append(descriptors)
        await asyncio.sleep(SAMPLE_SECONDS)


def flat(samples: list[int], slack: float) -> str | None:
    """None when the samples after the warm-up do not grow; else what grew."""
    judged = samples[int(len(samples) * WARM_UP_SHARE) :]
    if len(judged) < 4:
        return "too few samples"
    half = len(judged) // 2
    early, late = max(judged[:half]), max(judged[half:])
    if late > early + slack:
        return f"grew from {early} to {late} after the warm-up"
    return None


async def soak(seconds: float, users: int, seed: int) -> Report:
    workflows = ",".join(f"w{n}=wf_w{n}" for n in range(users))
    # The upstream's own rate limit (600 keyed requests a minute) would refuse most of the run.
    command = ["emulator", "--chunk-delay", "0.01", "--rate-limit", "1000000"]
    emulator = ServerProcess(command, {"BFF_API_KEY": TEST_API_KEY}).start()
    # A short cooldown: mint faults may open the circuit, which must close again within the run.
    proxy = start_proxy(emulator.url, BFF_WORKFLOWS=workflows, BFF_UPSTREAM_COOLDOWN_SECONDS="1")
    assert proxy.process is not None
    pid = proxy.process.pid
    run = Soak(proxy, emulator, seconds, seed)
    rss: list[int] = []
    fds: list[int] = []
    problems: list[str] = []
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30.0) as observer:
            before = await run.metrics(observer)
            mints_before = len(await run.events(kind="mint"))
            sampler = asyncio.ensure_future(_sample_process(pid, run.deadline + SETTLE_SECONDS, rss, fds))
            await asyncio.gather(run.chaos(), *(run.user(n) for n in range(users)))
            after = await _settled(run, observer)
            sampler.cancel()
            rss.append(_proc(pid)[0])
            fds.append(_proc(pid)[1])
            problems += await _leaks(run)
            problems += _disagreements(run.tally, before, after, len(await run.events(kind="mint")) - mints_before)
    finally:
        await run.control.aclose()
        proxy.stop()
        emulator.stop()
    problems += [f"client saw: {violation}" for violation in run.tally.violations[:20]]
    for what, samples, slack in (
        ("resident memory", rss, max(RSS_SLACK_BYTES, int(rss[0] * RSS_SLACK_SHARE)) if rss else 0),
        ("open descriptors", fds, users + 10),  # idle keep-alive connections come and go
    ):
        grew = flat(samples, slack)
        if grew is not None:
            problems.append(f"{what} not flat: {grew}")
    problems += [f"server error logged: {line[:300]}" for line in proxy.logs if _server_error(line)][:10]
    return Report(seconds, run.tally, rss, fds, problems)


async def _settled(run: Soak, observer: httpx.AsyncClient) -> str:
    """The metrics once every relay has finished its bookkeeping."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while _sample(metrics := await run.metrics(observer), "bff_open_streams") != 0:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return metrics


async def _leaks(run: Soak) -> list[str]:
    started = len(await run.events(kind="stream_start"))
    if not await run.wait_for(started, kind="stream_end"):
        ended = len(await run.events(kind="stream_end"))
        return [f"the upstream saw {started} streams start and only {ended} end"]
    return []


def _disagreements(tally: Tally, before: str, after: str, upstream_mints: int) -> list[str]:
    problems = []

    def compare(what: str, metric: float, clients: float) -> None:
        if metric != clients:
            problems.append(f"{what}: metrics say {metric:g}, clients saw {clients:g}")

    compare("open streams at the end", _sample(after, "bff_open_streams"), 0)
    requests: Counter[tuple[str, str, str]] = Counter()
    for text, sign in ((after, 1), (before, -1)):
        for line in text.splitlines():
            if line.startswith("bff_requests_total{"):
                metric, _, value = line.rpartition(" ")
                labels = dict(part.split("=", 1) for part in metric[len("bff_requests_total{") : -1].split(","))
                key = (labels["route"].strip('"'), labels["method"].strip('"'), labels["status"].strip('"'))
                requests[key] += sign * int(float(value))
    clients = tally.requests.copy()
    clients[("/metrics", "GET", "200")] -= 1  # the last scrape is not in its own numbers
    for key in set(requests) | set(clients):
        compare(f"requests {' '.join(key)}", requests[key], clients[key])
    ends = _by_label(after, "bff_stream_ends_total", "end")
    ends.subtract(_by_label(before, "bff_stream_ends_total", "end"))
    refused = sum(count for end, count in ends.items() if end.startswith("refused:"))
    for end in ("complete", "upstream_cut", "client_gone", "client_gone_early"):
        compare(f"streams ended {end}", ends[end], tally.ends[end])
    compare("streams refused", refused, tally.ends["refused"])
    for stage in ("before_first_byte", "after_first_byte"):
        compare(
            f"disconnects {stage}",
            _sample(after, "bff_client_disconnects_total", stage=stage)
            - _sample(before, "bff_client_disconnects_total", stage=stage),
            tally.disconnects[stage],
        )
    compare(
        "relayed bytes",
        _sample(after, "bff_relayed_bytes_total") - _sample(before, "bff_relayed_bytes_total"),
        tally.relayed_bytes,
    )
    compare(
        "upstream cuts",
        _sample(after, "bff_upstream_errors_total", kind="cut")
        - _sample(before, "bff_upstream_errors_total", kind="cut"),
        tally.ends["upstream_cut"],
    )
    compare(
        "mints",
        _sample(after, "bff_mints_total", outcome="ok") - _sample(before, "bff_mints_total", outcome="ok"),
        upstream_mints,
    )
    return problems


def _server_error(line: str) -> bool:
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    message = str(entry.get("message", ""))
    return (
        message.startswith("Exception in ASGI application")
        or message == "relay failed"
        or (message == "request end" and entry.get("status") == 500)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="how long traffic runs (default 300)")
    parser.add_argument("--users", type=int, default=8, help="concurrent clients, one user each (default 8)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random choices (interleaving still varies)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    report = asyncio.run(soak(args.seconds, args.users, seed))
    print(report.summary())
    print(f"seed: {seed}")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
