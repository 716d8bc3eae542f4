"""One way to run an ASGI app over HTTP(S) for both servers (``peer serve`` and ``serve``).

``parse_listen`` reads ``--listen``; ``bind`` makes the listening socket (port 0 works and is
known before serving); ``HTTPServer`` runs an app on it under uvicorn, in the foreground or in
a thread, with optional TLS (the peer server's mutual TLS context).

Connections are accepted by ``appliance.http_limits`` (pending-connection caps, header
deadlines, TLS only once a client speaks), which admits each to uvicorn's protocol once its
first request header is complete; ``ServerOptions`` holds those limits.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import uvicorn

from appliance.errors import ApplianceError, UsageError
from appliance.http_limits import ConnectionStats, Gatekeeper, ServerOptions

log = logging.getLogger("appliance.http")

LISTEN_BACKLOG = 512


def parse_listen(text: str, *, any_host: str | None = None) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT``; ``:PORT`` means ``any_host`` where one is given."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]") or (any_host or "")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"--listen {text!r} must be HOST:PORT")
    return host, int(port_text)


def bind(host: str, port: int, *, error: type[ApplianceError] = UsageError) -> socket.socket:
    """A listening TCP socket on ``host:port``; ``error`` is raised when that fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the
    # listening socket says TCP; and TCP_NODELAY here too (accepted sockets inherit it on
    # Linux). Without it Nagle holds a response body back until the client ACKs the headers:
    # ~40 ms per request on a kept-alive connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise error(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.set_inheritable(False)
    return sock


def address(sock: socket.socket) -> str:
    """``HOST:PORT`` (``[V6]:PORT``) a bound socket listens on."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Server(uvicorn.Server):
    """uvicorn with our accept loop (``Gatekeeper``) in place of ``loop.create_server``."""

    def __init__(self, config: uvicorn.Config, options: ServerOptions,
                 ssl_context: ssl.SSLContext | None) -> None:
        super().__init__(config)
        self.options = options
        self.ssl_context = ssl_context
        self.gatekeeper: Gatekeeper | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # lifespan and state, no listener of its own
        config = self.config

        def make_protocol() -> asyncio.Protocol:
            protocol: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state,
            )
            return protocol

        self.gatekeeper = Gatekeeper(self.options, self.ssl_context, make_protocol)
        self.gatekeeper.start(sockets or [])

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.gatekeeper is not None:
            self.gatekeeper.close()
            await asyncio.sleep(0)  # the accept loops let go of the sockets before they close
        await super().shutdown(sockets=sockets)


class HTTPServer:
    """An ASGI app under uvicorn on ``sock``, with the connection limits of ``options``."""

    def __init__(
        self,
        app: Any,
        sock: socket.socket,
        *,
        ssl_context: ssl.SSLContext | None = None,
        options: ServerOptions | None = None,
        lifespan: bool = False,
        log_level: str = "warning",
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.sock = sock
        self.ssl_context = ssl_context
        self.options = options or ServerOptions()
        self.on_stop = on_stop
        host, port = sock.getsockname()[:2]
        self.host, self.port = str(host), int(port)
        config = uvicorn.Config(
            app,
            http="h11",
            ws="none",
            loop="asyncio",
            lifespan="on" if lifespan else "off",
            log_config=None,
            log_level=log_level,
            access_log=False,
            limit_concurrency=self.options.max_connections,
            timeout_keep_alive=self.options.keep_alive,
            timeout_graceful_shutdown=max(1, round(self.options.graceful_shutdown)),
            h11_max_incomplete_event_size=self.options.max_header_bytes,
        )
        self.server = _Server(config, self.options, ssl_context)
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def stats(self) -> ConnectionStats:
        gatekeeper = self.server.gatekeeper
        return gatekeeper.stats if gatekeeper is not None else ConnectionStats()

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (uvicorn's handlers) or ``stop()``."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()
            if self.on_stop is not None:
                self.on_stop()

    def start(self, timeout: float | None = 10.0) -> Self:
        """Serve in a background thread (which installs no signal handlers); with a
        ``timeout``, return once it accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name=f"http-{self.port}",
                                        daemon=True)
        self._thread.start()
        if timeout is None:
            return self
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise self.start_error()
            time.sleep(0.01)
        return self

    def start_error(self) -> ApplianceError:
        return ApplianceError(f"the server on {self.url} did not start")

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.server.force_exit = True
                self._thread.join(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
