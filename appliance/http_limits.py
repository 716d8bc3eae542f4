"""Connections that never finish cost a bounded amount, under both HTTP servers.

``Gatekeeper`` is the accept loop ``appliance.http_server`` runs in place of uvicorn's;
``ServerOptions`` its limits, ``ConnectionStats`` what it did. uvicorn alone has no deadline
for a TLS handshake and none for a request header, and asyncio allocates 256 KiB per TLS
connection up front, so thousands of idle or slowloris connections would hold descriptors
and memory. Here a connection is *pending* from accept until the end of its first request
header; pending connections are accepted by our own loop and admitted to uvicorn only once
that header is complete, the way OpenSSH's ``MaxStartups`` treats unauthenticated ones:

- TLS starts only once the client has sent its first bytes: a silent connection costs a
  socket, no TLS state;
- the TLS handshake and the first header must both finish within ``header_timeout`` of the
  accept (nginx's ``client_header_timeout``); each later request's header within
  ``header_timeout`` of its first byte; a request body's bytes within ``body_timeout`` of each
  other (``client_body_timeout``); idle time between requests is uvicorn's keep-alive;
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
import gc
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.errors import UsageError

log = logging.getLogger("appliance.http")

TRIM_DELAY = 0.25  # seconds from a TLS connection's end to the trim that returns its memory
_HEADER_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                     b"content-length: 0\r\nconnection: close\r\n\r\n")


@dataclass(frozen=True)
class ServerOptions:
    """Connection limits and timeouts (see the module docstring for what each bounds)."""

    max_connections: int = 128
    max_pending: int = 256
    max_pending_per_address: int = 64
    max_handshakes: int = 32  # ~300 KiB each: asyncio's TLS buffers
    header_timeout: float = 10.0
    body_timeout: float = 30.0  # between two reads of a request body
    max_header_bytes: int = 16 * 1024  # h11's own default
    keep_alive: int = 5
    graceful_shutdown: float = 2.0

    def __post_init__(self) -> None:
        if min(self.max_connections, self.max_pending, self.max_pending_per_address,
               self.max_handshakes) < 1:
            raise UsageError("connection limits must be at least 1")
        if self.header_timeout <= 0 or self.body_timeout <= 0:
            raise UsageError("timeouts must be positive")


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
    the connection over and stays in the data path only to time later requests' headers and
    every request body."""

    def __init__(self, gatekeeper: Gatekeeper, pending: _Pending) -> None:
        self.gatekeeper = gatekeeper
        self.pending = pending
        self.buffer = bytearray()
        self.admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.inner: Any = None  # uvicorn's protocol, once admitted
        self.timer: asyncio.TimerHandle | None = None
        self.timed_cycle: Any = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.received = 0  # bytes from the client since admission: the body timer's progress
        self.body_mark = 0

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
        self.received += len(data)
        self.inner.data_received(data)
        cycle = self.inner.cycle
        self._watch_body()
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
        self._watch_body()

    def _watch_body(self) -> None:
        """While the client owes body bytes, each read must come within ``body_timeout`` of
        the last (nginx's ``client_body_timeout``)."""
        cycle = self.inner.cycle
        if self.body_timer is None and cycle is not None and cycle.more_body:
            self.body_mark = self.received
            self.body_timer = asyncio.get_running_loop().call_later(
                self.gatekeeper.options.body_timeout, self._body_late)

    def _body_late(self) -> None:
        self.body_timer = None
        cycle = self.inner.cycle
        if cycle is None or not cycle.more_body:
            return
        # Bytes the app has not taken yet mean the wait is the app's, not the client's.
        if self.received == self.body_mark and not (cycle.body and not cycle.response_complete):
            self.gatekeeper.stats.timed_out += 1
            assert self.transport is not None
            self.transport.abort()
            return
        self._watch_body()

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
        for timer in (self.timer, self.body_timer):
            if timer is not None:
                timer.cancel()
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


class Gatekeeper:
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
            except ConnectionAbortedError:
                continue  # reset by the client while it waited in the backlog
            except OSError as e:
                if listener.fileno() < 0:
                    return  # shutting down
                # Out of descriptors or memory (or anything else): never stop accepting for
                # good, pause and retry, as asyncio's own accept loop does.
                log.warning("cannot accept a connection (%s); pausing accepts for 0.1 s",
                            e.strerror or e)
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
        pending.task = task = asyncio.get_running_loop().create_task(self._admit(pending))
        self.tasks.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self.tasks.discard)

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
        except Exception:
            log.exception("admitting a connection from %s failed", pending.address)
            pending.close()
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
