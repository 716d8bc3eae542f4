"""The inference API's server: ``appliance.http_server`` with the serve defaults.

The app's lifespan runs (workers load at start, stop at shutdown); ``--listen :PORT`` means
all interfaces. ``run`` serves in the foreground (the CLI); ``ServerThread`` in a background
thread (the TUI, tests, the benchmark).
"""

from __future__ import annotations

import socket

from starlette.types import ASGIApp

from appliance import http_server
from appliance.http_server import HTTPServer, ServerOptions, parse_listen

ANY_HOST = "0.0.0.0"
# More room than the peer server's: each connection here waits on a model, not a disk; the
# bounded request queue (429) is what limits the work.
SERVE_OPTIONS = ServerOptions(max_connections=512, graceful_shutdown=5.0)


def bind(listen: str) -> socket.socket:
    """The listening socket for ``--listen`` (``UsageError`` when it cannot be had)."""
    host, port = parse_listen(listen, any_host=ANY_HOST)
    return http_server.bind(host, port)


def run(app: ASGIApp, sock: socket.socket, *, log_level: str = "warning") -> None:
    """Serve until SIGINT/SIGTERM (blocking)."""
    HTTPServer(app, sock, options=SERVE_OPTIONS, lifespan=True,
               log_level=log_level).serve_forever()


class ServerThread(HTTPServer):
    """The app in a background thread (which installs no signal handlers)."""

    def __init__(self, app: ASGIApp, listen: str = "127.0.0.1:0",
                 options: ServerOptions = SERVE_OPTIONS) -> None:
        super().__init__(app, bind(listen), options=options, lifespan=True)

    def __enter__(self) -> ServerThread:
        # Not waiting for startup: callers poll /health, which says "loading" meanwhile.
        return self.start(timeout=None)

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
