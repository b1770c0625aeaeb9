"""`python -m tests.app_server --static DIR`: workflow-bff, configured like `serve`, that also serves a
built frontend at `/`, so the example app and the API share one origin as they would behind one host.
"""

from __future__ import annotations

import argparse

from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from proxy.app import create_app
from proxy.cli import bind, checked_settings, run_server
from proxy.logging import configure_logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.app_server")
    parser.add_argument("--static", required=True, help="the built app (vite build's outDir)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    settings = checked_settings()
    configure_logging(settings.secret_values())
    frontend = Mount("/", app=StaticFiles(directory=args.static, html=True))
    run_server(create_app(settings, extra_routes=[frontend]), [bind(args.host, args.port)], "workflow-bff + app")


if __name__ == "__main__":
    main()
