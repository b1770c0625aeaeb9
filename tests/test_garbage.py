"""A relay leaves no reference cycles behind: everything it built is freed by reference counting.

`serve` runs the cycle collector rarely (proxy/cli.py `tune_garbage_collector`), which is cheap only
while requests make no cyclic garbage: before, every run (a registry entry holding `run.stop`) and
every disconnect watch (its cancelled task's traceback) was a cycle, and collecting them cost a fifth
of a relay's CPU. The proxy runs in this process here (uvicorn on a loopback socket, in a thread), so
the collector can be asked what a few real relays left over.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from proxy.app import create_app
from proxy.cli import bind
from proxy.settings import Settings
from tests.servers import EmulatorControl, RedisServer, ServerProcess, eventually, guest_of, proxy_env

RELAYS = 12


@pytest.fixture(params=["memory", "redis"])
def in_process_proxy(
    request: pytest.FixtureRequest, emulator: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    storage = {}
    if request.param == "redis":  # the one-script admission and the run log's writer
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        storage = {"BFF_STORAGE_URL": redis_server.url}
    for name, value in proxy_env(emulator.url, **storage).items():
        monkeypatch.setenv(name, value)
    app = create_app(Settings())
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    eventually(lambda: server.started, "the in-process proxy to start")
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def cyclic_garbage_of_proxy() -> list[str]:
    """The type names of the proxy's own objects that only the cycle collector could free."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return sorted({type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("proxy.")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_relays_leave_no_reference_cycles(in_process_proxy: str, emulator: ServerProcess) -> None:
    emulator_url = emulator.url
    with guest_of(in_process_proxy) as client:
        client.post("/api/workflows/tutor/stream", json={"topic": "warm up"}).raise_for_status()
        gc.collect()
        for index in range(RELAYS):
            streamed = client.post("/api/workflows/tutor/stream", json={"topic": f"cycles {index}"})
            assert streamed.status_code == 200 and streamed.text
            ran = client.post("/api/workflows/tutor/run", json={"topic": f"cycles {index}"})
            assert ran.status_code == 200 and ran.json()["result"]
        # The ways a run ends early: the upstream refuses the stream, or breaks off mid-answer (its
        # connection closed: a TLS or plain connection and its parser must be freed all the same).
        upstream = EmulatorControl(emulator_url)
        upstream.fault(op="stream", status=500, times=2)
        for _ in range(2):
            assert client.post("/api/workflows/tutor/stream", json={"topic": "refused"}).status_code == 502
        upstream.fault(op="stream", cut_after=1, times=2)
        for _ in range(2):  # plain text may not say so in-band: then the response breaks off too
            with contextlib.suppress(httpx.RemoteProtocolError):
                client.post("/api/workflows/tutor/stream", json={"topic": "cut"})
        assert len(upstream.requests("stream")) >= 4
        upstream.reset()
        # A stream's run ends (and lets go of its objects) just after its last byte went out.
        eventually(lambda: client.get("/api/usage").json()["streams"]["in_use"] == 0, "the runs to end")
    assert cyclic_garbage_of_proxy() == []
