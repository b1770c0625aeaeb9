"""A real OpenID Provider for the tests: panva's oidc-provider (tests/node/oidc-idp.mjs) on loopback.

Its issuer is `http://localhost:<port>` while the BFF listens on 127.0.0.1, so the two are different
*sites* and the browser's SameSite rules apply as in production. The script prints one JSON line per
event; every token it issues is kept in `SEEN_IDP_TOKENS` for the leak scan (tests/test_zz_secrets.py).
`sign_in_at_idp` walks the provider's own login and consent pages with plain HTTP, as a browser would.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html import unescape
from typing import Any
from urllib.parse import urljoin

import httpx

from tests.servers import free_port, stop_process

CLIENT_ID = "workflow-bff"
CLIENT_SECRET = "test-oidc-client-secret-5a1d0c6e9f2b47d3a8e1"
START_TIMEOUT = 20.0

# Every token any test provider issued in this pytest run (their values), for the leak scan.
SEEN_IDP_TOKENS: list[str] = []

FORM = re.compile(r'<form[^>]*action="([^"]+)"[^>]*>(.*?)</form>', re.S)
HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)"')


@dataclass
class Idp:
    process: subprocess.Popen[str]
    issuer: str
    lines: list[dict[str, Any]] = field(default_factory=list)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("event") == "token":
                SEEN_IDP_TOKENS.append(str(line["value"]))
            self.lines.append(line)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in list(self.lines) if line.get("event") == name]

    def tokens(self, kind: str) -> list[str]:
        return [str(line["value"]) for line in self.events("token") if line.get("kind") == kind]

    def control(self, action: str, **params: str) -> httpx.Response:
        """The script's test-only routes: tamper, disable?sub=, backchannel?sub=."""
        return httpx.post(f"{self.issuer}/_test/{action}", params=params, timeout=10.0)

    def stop(self) -> None:
        stop_process(self.process)


@contextmanager
def running_idp(node: str, node_dir: str, bff_url: str, port: int, **config: Any) -> Iterator[Idp]:
    """The provider on `port`, with the BFF at `bff_url` registered as its client."""
    settings = {"bff": bff_url, "secret": CLIENT_SECRET, "clientId": CLIENT_ID, "host": "localhost", "port": port}
    process = subprocess.Popen(
        [node, "oidc-idp.mjs", json.dumps({**settings, **config})],
        cwd=node_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # 8.x warns about its throwaway development keys there
        text=True,
    )
    assert process.stdout is not None
    first = process.stdout.readline()  # {"issuer": ...} once listening
    try:
        issuer = str(json.loads(first)["issuer"])
    except (ValueError, KeyError):
        process.kill()
        raise RuntimeError(f"oidc-idp.mjs did not start: {first!r}") from None
    idp = Idp(process, issuer)
    threading.Thread(target=idp._read, daemon=True).start()
    try:
        yield idp
    finally:
        idp.stop()


def idp_port() -> int:
    return free_port()


def sign_in_at_idp(idp_browser: httpx.Client, url: str, bff_url: str, *, login: str = "alice") -> str:
    """Follow the provider from `url` (the BFF's redirect to it) through its login and consent pages;
    returns the URL the provider finally sends the browser to on the BFF (the callback)."""
    for _ in range(20):
        if url.startswith(bff_url):
            return url
        page = idp_browser.get(url)
        if page.is_redirect:
            url = urljoin(url, page.headers["location"])
            continue
        found = FORM.search(page.text)
        assert found is not None, f"no form on {url}: {page.status_code} {page.text[:300]}"
        action, form = found.groups()
        data = {name: unescape(value) for name, value in HIDDEN.findall(form)}
        if 'name="login"' in form:
            data |= {"login": login, "password": "any"}
        answer = idp_browser.post(urljoin(url, unescape(action)), data=data)
        assert answer.is_redirect, f"{action}: {answer.status_code} {answer.text[:300]}"
        url = urljoin(url, answer.headers["location"])
    raise AssertionError("the provider never sent the browser back")
