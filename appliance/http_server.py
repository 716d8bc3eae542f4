"""One way to run an ASGI app over HTTP(S) for both servers (``peer serve`` and ``serve``).

``parse_listen`` reads ``--listen``; ``bind`` makes the listening socket (port 0 works and is
known before serving); ``HTTPServer`` runs an app on it under uvicorn, in the foreground or in
a thread, with optional TLS (the peer server's mutual TLS context).

Connections that never finish cost a bounded amount. uvicorn alone has no deadline for a TLS
handshake it has not started and none for a request header, and asyncio allocates 256 KiB per
TLS connection up front, so thousands of idle or slowloris connections would hold descriptors
and memory. Here a connection is *pending* from accept until the end of its first request
header; pending connections are accepted by our own loop and admitted to uvicorn only once
that header is complete, the way OpenSSH's ``MaxStartups`` treats unauthenticated ones:

- TLS starts only once the client has sent its first bytes: a silent connection costs a
  socket, no TLS state;
- the TLS handshake and the first header must both finish within ``header_timeout`` of the
  accept (nginx's ``client_header_timeout``); each later request's header within
  ``header_timeout`` of its first byte; idle time between requests is uvicorn's keep-alive;
- at most ``max_pending`` pending connections in all and ``max_pending_per_address`` from one
  address: over a cap, the oldest pending one is closed, a silent one first (a real client
  speaks at once, so it is the cheapest to drop and the likeliest attacker); of those, at most
  ``max_handshakes`` hold TLS state (the oldest goes first); a newcomer is never the one
  dropped, it has had no time to speak;
- past its first header a connection counts toward ``max_connections`` (uvicorn's
  ``limit_concurrency``: a request beyond it gets 503 and the connection is closed).

So descriptors stay under ``max_pending + max_connections`` (plus the listening socket).
What a closed connection held is freed and handed back to the system: shortly after TLS
connections end, a collection frees their buffers (asyncio's TLS protocol and transport form a
cycle) and glibc's ``malloc_trim`` returns the free pages, which glibc would otherwise keep
(without both, a burst of stalled handshakes left RSS ~80 MB up for good).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import gc
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import uvicorn

from appliance.errors import ApplianceError, UsageError

log = logging.getLogger("appliance.http")

LISTEN_BACKLOG = 512
TRIM_DELAY = 0.25  # seconds from a TLS connection's end to the trim that returns its memory
# accept() fails with these when the process or host runs out; back off instead of spinning.
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_HEADER_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                     b"content-length: 0\r\nconnection: close\r\n\r\n")


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


@dataclass(frozen=True)
class ServerOptions:
    """Connection limits and timeouts (see the module docstring for what each bounds)."""

    max_connections: int = 128
    max_pending: int = 256
    max_pending_per_address: int = 64
    max_handshakes: int = 32  # ~300 KiB each: asyncio's TLS buffers
    header_timeout: float = 10.0
    max_header_bytes: int = 16 * 1024  # h11's own default
    keep_alive: int = 5
    graceful_shutdown: float = 2.0

    def __post_init__(self) -> None:
        if min(self.max_connections, self.max_pending, self.max_pending_per_address,
               self.max_handshakes) < 1:
            raise UsageError("connection limits must be at least 1")
        if self.header_timeout <= 0:
            raise UsageError("the header timeout must be positive")


@dataclass
class ConnectionStats:
    """What the gate did, for tests, benchmarks and the log."""

    accepted: int = 0
    admitted: int = 0  # reached the end of their first header
    evicted: int = 0  # closed to make room under a pending cap
    timed_out: int = 0  # handshake or header not done in time
    refused: int = 0  # a first header over max_header_bytes (431)


class _Pending:
    """One connection between accept and the end of its first request header."""

    __slots__ = ("address", "closed", "silent", "sock", "task", "transport")

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.silent = True  # has sent nothing yet: we watch its descriptor, no transport
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def close(self) -> None:
        """Drop it now where that is safe; during a TLS handshake asyncio owns the socket,
        so cancelling the task makes asyncio close it."""
        if self.closed:
            return
        self.closed = True
        if self.silent:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.sock)
            self.sock.close()
        elif self.transport is not None:
            self.transport.abort()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


class _Gate(asyncio.Protocol):
    """Holds a connection's first header back from uvicorn until it is complete, then hands
    the connection over and stays in the data path only to time later requests' headers."""

    def __init__(self, gatekeeper: _Gatekeeper, pending: _Pending) -> None:
        self.gatekeeper = gatekeeper
        self.pending = pending
        self.buffer = bytearray()
        self.admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.inner: Any = None  # uvicorn's protocol, once admitted
        self.timer: asyncio.TimerHandle | None = None
        self.timed_cycle: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = self.pending.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            start = max(0, len(self.buffer) - 3)
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n", start)
            limit = self.gatekeeper.options.max_header_bytes
            if (end < 0 and len(self.buffer) > limit) or end + 4 > limit:
                self._refuse_large_header()
            elif end >= 0:
                self._admit()
            return
        before = self.inner.cycle
        idle = before is None or before.response_complete
        self.inner.data_received(data)
        cycle = self.inner.cycle
        if self.timer is not None and cycle is not self.timed_cycle:
            self.timer.cancel()  # that request's header is complete
            self.timer = None
        if self.timer is None and idle and cycle is before:
            # The first bytes of a new request, its header not complete yet.
            self.timed_cycle = cycle
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.gatekeeper.options.header_timeout,
                                         self._header_late)

    def _admit(self) -> None:
        assert self.transport is not None
        self.gatekeeper.forget(self.pending)  # from now on uvicorn's, never evicted
        self.inner = self.gatekeeper.make_protocol()
        self.inner.connection_made(self.transport)
        data, self.buffer = bytes(self.buffer), bytearray()
        if not self.admitted.done():
            self.admitted.set_result(None)
        self.inner.data_received(data)

    def _refuse_large_header(self) -> None:
        assert self.transport is not None
        self.gatekeeper.stats.refused += 1
        self.transport.write(_HEADER_TOO_LARGE)
        self.transport.close()
        self.buffer = bytearray()

    def _header_late(self) -> None:
        self.timer = None
        cycle = self.inner.cycle
        if cycle is self.timed_cycle and (cycle is None or cycle.response_complete):
            self.gatekeeper.stats.timed_out += 1
            assert self.transport is not None
            self.transport.abort()

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return bool(self.inner.eof_received())
        return None  # a half-closed pending connection is closed

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.gatekeeper.ssl_context is not None:
            self.gatekeeper.tls_ended()
        if not self.admitted.done():
            self.admitted.set_exception(ConnectionResetError("closed before its first header"))
            self.admitted.exception()  # retrieved: the admitting task may be gone already
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


class _Gatekeeper:
    """Accepts connections itself, enforces the pending caps and deadlines, and admits each
    connection to uvicorn's protocol once its first header is complete."""

    def __init__(self, options: ServerOptions, ssl_context: ssl.SSLContext | None,
                 make_protocol: Callable[[], asyncio.Protocol]) -> None:
        self.options = options
        self.ssl_context = ssl_context
        self.make_protocol = make_protocol
        self.stats = ConnectionStats()
        self.pending: dict[_Pending, None] = {}  # insertion order = age
        self.by_address: dict[str, dict[_Pending, None]] = {}
        self.in_tls: dict[_Pending, None] = {}  # pending ones holding TLS state, by age
        self.tasks: set[asyncio.Task[None]] = set()
        self._trim: asyncio.TimerHandle | None = None

    def start(self, sockets: Sequence[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock in sockets:
            sock.setblocking(False)
            task = loop.create_task(self._accept(sock))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def close(self) -> None:
        if self._trim is not None:
            self._trim.cancel()
        for task in list(self.tasks):
            task.cancel()
        for pending in list(self.pending):
            self.forget(pending)
            pending.close()

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as e:
                if e.errno not in _RESOURCE_ERRORS:
                    raise
                log.warning("cannot accept a connection (%s); pausing accepts for 0.1 s",
                            e.strerror)
                await asyncio.sleep(0.1)
                continue
            self.stats.accepted += 1
            self._track(sock, str(peer[0]) if isinstance(peer, tuple) else "")
            # Let closed connections go before taking the next: during a burst of accepts
            # the descriptors held stay near the caps.
            await asyncio.sleep(0)

    def _track(self, sock: socket.socket, peer: str) -> None:
        sock.setblocking(False)
        pending = _Pending(sock, peer)
        # Room is made among the connections already waiting, never by dropping the newcomer:
        # it has had no time to speak yet.
        same = self.by_address.setdefault(peer, {})
        if len(same) >= self.options.max_pending_per_address:
            self._evict(same)
        if len(self.pending) >= self.options.max_pending:
            self._evict(self.pending)
        self.by_address.setdefault(peer, {})[pending] = None
        self.pending[pending] = None
        pending.task = asyncio.get_running_loop().create_task(self._admit(pending))

    def _evict(self, among: dict[_Pending, None]) -> None:
        victim = next((p for p in among if p.silent), None) or next(iter(among))
        self.stats.evicted += 1
        if victim in self.in_tls:
            self.tls_ended()
        self.forget(victim)
        victim.close()

    def forget(self, pending: _Pending) -> None:
        self.pending.pop(pending, None)
        self.in_tls.pop(pending, None)
        same = self.by_address.get(pending.address)
        if same is not None:
            same.pop(pending, None)
            if not same:
                del self.by_address[pending.address]

    def tls_ended(self) -> None:
        """A TLS connection is gone: give its buffers back to the system soon. One trim
        covers a burst, and a flood costs at most four full collections a second."""
        if self._trim is None:
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._trim_now)

    def _trim_now(self) -> None:
        self._trim = None
        # asyncio's TLS protocol and transport refer to each other: only the cycle collector
        # frees a closed connection's buffers, and it may not run for a long while.
        gc.collect()
        if _malloc_trim is not None:
            _malloc_trim(0)

    def _worth_a_handshake(self, sock: socket.socket) -> bool:
        """Peek at the first byte: a client that left (EOF), or one that does not start a TLS
        handshake record (0x16) on a TLS port, costs no TLS state; it is just closed."""
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        return bool(first) and (self.ssl_context is None or first == b"\x16")

    async def _admit(self, pending: _Pending) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.options.header_timeout):
                readable: asyncio.Future[None] = loop.create_future()
                loop.add_reader(pending.sock, _resolve, readable)
                try:
                    await readable
                finally:
                    if not pending.closed:
                        loop.remove_reader(pending.sock)
                pending.silent = False
                if not self._worth_a_handshake(pending.sock):
                    pending.close()
                    return
                if self.ssl_context is not None:
                    if len(self.in_tls) >= self.options.max_handshakes:
                        self._evict(self.in_tls)
                    self.in_tls[pending] = None
                gate = _Gate(self, pending)
                await loop.connect_accepted_socket(
                    lambda: gate, pending.sock, ssl=self.ssl_context,
                    ssl_handshake_timeout=self.options.header_timeout
                    if self.ssl_context is not None else None,
                )
                await gate.admitted
            self.stats.admitted += 1
        except TimeoutError:
            self.stats.timed_out += 1
            pending.close()
        except (OSError, ssl.SSLError, ConnectionError):
            pending.close()  # a failed handshake or a client gone: nothing to tell anyone
        except asyncio.CancelledError:
            pending.close()
            raise
        finally:
            if pending in self.in_tls and pending.closed:
                self.tls_ended()
            self.forget(pending)


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere: other allocators give memory back themselves
    or offer no such call)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_malloc_trim = _find_malloc_trim()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Server(uvicorn.Server):
    """uvicorn with our accept loop (``_Gatekeeper``) in place of ``loop.create_server``."""

    def __init__(self, config: uvicorn.Config, options: ServerOptions,
                 ssl_context: ssl.SSLContext | None) -> None:
        super().__init__(config)
        self.options = options
        self.ssl_context = ssl_context
        self.gatekeeper: _Gatekeeper | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # lifespan and state, no listener of its own
        config = self.config

        def make_protocol() -> asyncio.Protocol:
            protocol: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state,
            )
            return protocol

        self.gatekeeper = _Gatekeeper(self.options, self.ssl_context, make_protocol)
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
