"""Talking to one peer: bounded HTTP(S) requests whose answers are parsed as hostile.

``PeerClient`` wraps an ``httpx.Client`` for one peer URL. Every request has a connect and a
per-read timeout, and every body is read with a cap enforced while reading: a chunk is cut off
at its declared length (a peer that streams forever gets no further), a JSON answer at
``Limits.max_peer_json_bytes``, a manifest at ``Limits.max_manifest_bytes``. A chunk also has
a deadline (``Timeouts.chunk_deadline``), so a peer that trickles a byte per read timeout is
still given up on; the deadline grows with the chunk requests in flight to the peer (they share
its link), and a ``patient`` request (the swarm asks so of the only peer holding a chunk) has
none: a slow peer whose bytes still flow is not dropped, a stalled one still times out.
Bodies are read raw (``identity``), never decompressed.

CPU per byte is what bounds a pull over loopback or a fast LAN, so a body is read into one
buffer of its declared length, and the socket is drained of what has already arrived (up to
``GATHER_BYTES``) on every read: over TLS a read returns one 16 KiB record, and each read
costs a trip through httpcore and h11 in Python.

Errors a caller acts on (the swarm scheduler, ``appliance.peer.swarm``):

- ``IntegrityError``: the peer sent bytes that do not hash to the digest asked for (it lies);
- ``PeerProtocolError``: the answer breaks the protocol (too long, bad shape, bad status);
- ``PeerError``: unreachable, refused the TLS handshake, timed out, or died mid-answer.

``connect_policy`` decides plaintext vs mutual TLS once for a set of URLs: https needs a site
TLS directory, http needs an explicit ``insecure``.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpcore
import httpx

from appliance.chunks import check_chunk
from appliance.errors import PeerError, PeerProtocolError, UsageError
from appliance.format.signing import Signature
from appliance.limits import DEFAULT_LIMITS, Limits
from appliance.peer import protocol


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0
    # Longest wait for the next bytes of an answer: a stalled peer is given up after this.
    read: float = 15.0
    # A chunk must arrive within max(chunk_deadline, length * in_flight / min_rate) seconds,
    # ``in_flight`` the most chunk requests to the peer at once meanwhile (they share its link).
    chunk_deadline: float = 30.0
    min_rate: float = 256 * 1024


# Most bytes one socket read hands to httpcore: what has already arrived is taken in one go.
GATHER_BYTES = 1024 * 1024


class _GatheringStream(httpcore.NetworkStream):
    """httpcore's own stream, with each read draining what the socket already holds.

    The first ``recv`` waits as httpcore's does (the per-read timeout); the rest never wait.
    """

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        first = self._inner.read(max_bytes, timeout)
        sock = self._inner.get_extra_info("socket")
        if not first or not isinstance(sock, socket.socket):
            return first
        pieces, total = [first], len(first)
        try:
            sock.setblocking(False)  # httpcore sets the timeout again before each read
            while total < GATHER_BYTES:
                more = sock.recv(GATHER_BYTES - total)
                if not more:
                    break  # EOF: the next read reports it
                pieces.append(more)
                total += len(more)
        except OSError:
            # Nothing more has arrived yet (SSLWantReadError, BlockingIOError), or the
            # connection broke after what was read: the next read reports that, and only if
            # the answer still needs bytes (a complete one is not lost to a reset after it).
            pass
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _GatheringStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _GatheringBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: typing.Iterable[typing.Any] | None = None
                    ) -> httpcore.NetworkStream:
        return _GatheringStream(self._inner.connect_tcp(host, port, timeout, local_address,
                                                        socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _Transport(httpx.HTTPTransport):
    """httpx's own transport over a connection pool whose streams gather their reads."""

    def __init__(self, ssl_context: ssl.SSLContext | None, max_connections: int) -> None:
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections)
        super().__init__(verify=ssl_context if ssl_context is not None else False,
                         limits=limits, trust_env=False)
        # httpx builds the pool in __init__ and takes no network backend; the same pool,
        # with ours. Checked, so an httpx that renames it fails here rather than silently.
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):
            raise RuntimeError("httpx.HTTPTransport no longer keeps its pool in _pool")
        self._pool.close()
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context, max_connections=max_connections,
            max_keepalive_connections=max_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=_GatheringBackend())


class _ChunkClock:
    """When a chunk request gives up for slowness: ``length * in_flight / min_rate`` seconds
    after it began (at least ``chunk_deadline``), ``in_flight`` the most chunk requests the
    client had out to the peer at once meanwhile."""

    __slots__ = ("client", "length", "most", "start", "until")

    def __init__(self, client: PeerClient, length: int) -> None:
        self.client, self.length = client, length
        self.start = time.monotonic()
        self.most = 0
        self.until = self.start
        self._widen()

    def _widen(self) -> None:
        t = self.client.timeouts
        self.most = self.client.chunks_in_flight
        self.until = self.start + max(t.chunk_deadline, self.length * self.most / t.min_rate)

    def passed(self) -> bool:
        if time.monotonic() <= self.until:
            return False
        if self.client.chunks_in_flight > self.most:
            self._widen()
            return time.monotonic() > self.until
        return True


@dataclass(frozen=True)
class ConnectPolicy:
    """How this host talks to peers: mutual TLS with a site context, or explicit plaintext."""

    ssl_context: ssl.SSLContext | None
    insecure: bool

    def check(self, url: str) -> str:
        url = protocol.normalize_peer_url(url)
        if url.startswith("http://") and not self.insecure:
            raise UsageError(
                f"{url} is plaintext; peers talk mutual TLS (https) unless --insecure is given"
            )
        if url.startswith("https://") and self.ssl_context is None:
            raise UsageError(
                f"{url} needs a site certificate: pass --tls-dir DIR "
                "('appliance site enroll' makes one)"
            )
        return url


def connect_policy(tls_dir: Path | None, insecure: bool) -> ConnectPolicy:
    if tls_dir is None and not insecure:
        raise UsageError(
            "peers talk mutual TLS: pass --tls-dir DIR (made by 'appliance site enroll') "
            "or --insecure for plaintext"
        )
    context = None
    if tls_dir is not None:
        from appliance.peer import tls  # X.509 and its parsers: only for mutual TLS

        context = tls.client_context(tls_dir)
    return ConnectPolicy(context, insecure)


class PeerClient:
    """One peer. Thread-safe (httpx.Client is); close it when done."""

    # ``chunk`` returns only bytes ``check_chunk`` passed against the digest and length asked
    # for, so the swarm tells the ingest sink not to hash them again.
    checks_chunks = True

    def __init__(
        self,
        url: str,
        policy: ConnectPolicy,
        *,
        timeouts: Timeouts | None = None,
        limits: Limits = DEFAULT_LIMITS,
        max_connections: int = 4,
    ) -> None:
        self.url = policy.check(url)
        self.timeouts = timeouts or Timeouts()
        self.limits = limits
        t = self.timeouts
        self.chunks_in_flight = 0
        self._lock = threading.Lock()
        self.http = httpx.Client(
            base_url=self.url,
            transport=_Transport(policy.ssl_context, max_connections),
            timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.read, pool=t.read),
            headers={"accept-encoding": "identity"},
            follow_redirects=False,
            trust_env=False,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PeerClient({self.url})"

    def _get(self, path: str, cap: int, what: str, *, clock: _ChunkClock | None = None
             ) -> bytearray | None:
        """The body of a 200 answer (None for 404), read with ``cap`` enforced as it arrives."""
        try:
            with self.http.stream("GET", path) as response:
                status = response.status_code
                if status == 404:
                    return None
                if status == 503:
                    raise PeerError(f"{self.url} is busy ({what}); try again later")
                if status != 200:
                    raise PeerProtocolError(f"{self.url} answered {status} for {what}")
                declared = response.headers.get("content-length")
                if declared is not None:
                    if not declared.isdigit():
                        raise PeerProtocolError(f"{self.url}: bad Content-Length for {what}")
                    if int(declared) > cap:
                        raise PeerProtocolError(
                            f"{self.url} announces {declared} bytes for {what}, at most {cap} "
                            "are allowed"
                        )
                    return self._read_into(response, int(declared), what, clock)
                buf = bytearray()
                for piece in response.iter_raw():
                    buf += piece
                    if len(buf) > cap:
                        raise PeerProtocolError(
                            f"{self.url} sent more than the {cap} bytes allowed for {what}; "
                            "cut off"
                        )
                    if clock is not None and clock.passed():
                        raise PeerError(f"{self.url} is too slow sending {what}; gave up")
                return buf
        except httpx.TimeoutException as e:
            raise PeerError(f"{self.url} timed out ({what}): {type(e).__name__}") from e
        except httpx.ConnectError as e:
            if _is_tls_failure(e):
                raise _tls_failure(self.url, e) from e
            raise PeerError(f"cannot connect to {self.url}: {e}") from e
        except (httpx.HTTPError, ssl.SSLError, OSError) as e:
            if _is_tls_failure(e):
                raise _tls_failure(self.url, e) from e
            hint = ""
            if self.url.startswith("https://") and isinstance(e, httpx.RemoteProtocolError):
                # TLS 1.3 servers verify the client certificate after the handshake and just
                # hang up on a host that is not a member of their site.
                hint = " (a peer hangs up on hosts without a certificate of its site CA)"
            raise PeerError(
                f"{self.url} failed during {what}: {type(e).__name__}: {e}{hint}"
            ) from e

    def _read_into(self, response: httpx.Response, size: int, what: str,
                   clock: _ChunkClock | None) -> bytearray:
        """A body of declared ``size`` (at most the cap) into one buffer of that size: each
        piece is copied once, and the buffer is the answer (no copy out)."""
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        with view:
            for piece in response.iter_raw():
                end = got + len(piece)
                if end > size:  # h11 stops at Content-Length; this must not rely on it
                    raise PeerProtocolError(
                        f"{self.url} sent more than the {size} bytes it announced for {what}; "
                        "cut off"
                    )
                view[got:end] = piece
                got = end
                if clock is not None and got < size and clock.passed():  # done is done
                    raise PeerError(f"{self.url} is too slow sending {what}; gave up")
        if got != size:  # h11 raises first on a short body; kept as a guard
            raise PeerError(f"{self.url} sent {got} of the {size} bytes of {what}")
        return buf

    def _get_bytes(self, path: str, cap: int, what: str) -> bytes | None:
        body = self._get(path, cap, what)
        return None if body is None else bytes(body)  # small answers, kept immutable

    def _get_json(self, path: str, what: str) -> bytes:
        body = self._get_bytes(path, self.limits.max_peer_json_bytes, what)
        if body is None:
            raise PeerProtocolError(f"{self.url} has no {what} (404)")
        return body

    # -- the protocol ---------------------------------------------------------------------

    def info(self) -> protocol.PeerInfo:
        return protocol.parse_info(self._get_json(protocol.info_path(), "info"), self.limits)

    def manifests(self) -> list[protocol.ManifestSummary]:
        body = self._get_json(protocol.manifests_path(), "manifest list")
        return protocol.parse_manifests(body, self.limits)

    def manifest_bytes(self, manifest_hash: str) -> bytes | None:
        body = self._get_bytes(protocol.manifest_path(manifest_hash),
                               self.limits.max_manifest_bytes, f"manifest {manifest_hash}")
        if body is None:
            return None
        return protocol.check_manifest_body(body, manifest_hash, self.limits)

    def signatures(self, manifest_hash: str) -> tuple[Signature, ...]:
        body = self._get_bytes(protocol.signatures_path(manifest_hash),
                               protocol.signatures_cap(self.limits), "signatures")
        if body is None:
            raise PeerProtocolError(f"{self.url} has no signatures for {manifest_hash}")
        return protocol.parse_signatures(body, self.limits)

    def trust_versions(self) -> list[int]:
        return protocol.parse_trust(self._get_json(protocol.trust_path(), "trust list"),
                                    self.limits)

    def trust_root(self, version: int) -> bytes | None:
        return self._get_bytes(protocol.trust_root_path(version), self.limits.max_trust_root_bytes,
                               f"trust root v{version}")

    def have(self, manifest_hash: str, count: int) -> list[bool] | None:
        """The peer's have-map for the manifest, or None when it does not know the manifest."""
        body = self._get_bytes(protocol.have_path(manifest_hash), self.limits.max_peer_json_bytes,
                               "have-map")
        if body is None:
            return None
        return protocol.parse_have(body, manifest_hash, count, self.limits)

    def availability(self, manifest_hash: str, count: int) -> protocol.Availability | None:
        """The have-map and the chunks the peer's own pull announces it is fetching (none
        from a server that predates announcements); None when it does not know the manifest."""
        body = self._get_bytes(protocol.have_path(manifest_hash, fetching=True),
                               self.limits.max_peer_json_bytes, "have-map")
        if body is None:
            return None
        return protocol.parse_availability(body, manifest_hash, count, self.limits)

    def chunk(self, digest: str, length: int, *, patient: bool = False) -> bytes | None:
        """The chunk's bytes (a ``bytearray`` the caller owns), checked on arrival
        (IntegrityError); None if the peer lacks it. ``patient``: no deadline, only the
        per-read timeout (the swarm asks so when no other peer holds the chunk)."""
        with self._lock:
            self.chunks_in_flight += 1
        try:
            clock = None if patient else _ChunkClock(self, length)
            body = self._get(protocol.chunk_path(digest), length, f"chunk {digest[:16]}",
                             clock=clock)
        finally:
            with self._lock:
                self.chunks_in_flight -= 1
        if body is None:
            return None
        check_chunk(body, digest, length, peer=self.url)
        return body  # type: ignore[return-value]  # bytes-like: every reader takes a buffer


def _tls_failure(url: str, e: BaseException) -> PeerError:
    from appliance.peer import tls

    return tls.describe_tls_failure(url, e)


def _is_tls_failure(e: BaseException) -> bool:
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "SSL" in str(e) or "TLS" in str(e)


def open_clients(urls: Sequence[str], policy: ConnectPolicy, **kwargs: object
                 ) -> list[PeerClient]:
    """One client per distinct URL (normalised), in the order given."""
    seen: dict[str, PeerClient] = {}
    for url in urls:
        normal = policy.check(url)
        if normal not in seen:
            seen[normal] = PeerClient(normal, policy, **kwargs)  # type: ignore[arg-type]
    return list(seen.values())
