"""The peer server: serves this host's signed manifests, its have-maps and chunks by digest.

``StoreSource`` reads the store (it never writes): the signed manifests the store recorded at
import or pull time, the installed trust chain, and every chunk the store holds verified and
durable, in published files and in the staged files of imports and pulls still running, so a
host re-serves chunks while its own pull goes on (swarm); asked ``?fetching=1``, the have-map
also carries the chunks that pull announces it is fetching (``appliance.peer.announce``).
Each chunk is re-hashed before it is sent; a store that rotted since never passes bad bytes
on: the request gets 404, and the file holding the bad copy is quarantined as ``store
verify`` would (``scrub.quarantine_damaged``: audited, dropped from the have-map, its
manifest no longer offered as complete).

``create_app`` builds the Starlette app (protocol in ``appliance.peer.protocol``);
``PeerServer`` runs it with ``appliance.http_server`` on a socket it binds itself (port 0
works), in a thread or in the foreground, with mutual TLS from ``appliance.peer.tls`` unless
told it is insecure.

Limits: connections still in their TLS handshake or first header are capped in all and per
address and must finish within a deadline; requests past ``max_connections`` get 503
(``appliance.http_server.ServerOptions``); at most ``max_chunk_streams`` chunk bodies are in
flight (each holds one chunk in memory); a reader that does not take a piece of a body within
``send_timeout`` seconds is disconnected, so a slow or stalled reader cannot pin a slot; an
optional ``rate_limit`` (bytes/s) caps the total upload rate.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from appliance.errors import ApplianceError, PeerError, UsageError
from appliance.format.manifest import Manifest, parse_manifest
from appliance.http_server import HTTPServer, ServerOptions, bind
from appliance.limits import DEFAULT_LIMITS, Limits
from appliance.peer import announce, protocol, tls
from appliance.store import scrub, trust_state
from appliance.store.store import Store

log = logging.getLogger("appliance.peer")

# Body pieces: small enough for a smooth rate cap and a prompt stall check, large enough that
# the per-send overhead stays small at loopback speeds.
PIECE_BYTES = 1024 * 1024
LIMITED_PIECE_BYTES = 64 * 1024
DEFAULT_SEND_TIMEOUT = 30.0
DEFAULT_MAX_CHUNK_STREAMS = 32
_MANIFEST_CACHE = 16
DEFAULT_READERS = 4
T = TypeVar("T")


class StoreSource:
    """What a host offers its peers, read from its store (thread-safe: one Store per thread)."""

    def __init__(self, store_dir: Path, limits: Limits = DEFAULT_LIMITS, *,
                 readers: int = DEFAULT_READERS) -> None:
        self.store_dir = store_dir
        self.limits = limits
        self._local = threading.local()
        self._lock = threading.Lock()
        self._quarantining = threading.Lock()
        self._parsed: OrderedDict[str, Manifest] = OrderedDict()
        # Store reads run on a few long-lived threads: a bounded number of index
        # connections (descriptors) and of disk reads at once, whatever the load.
        self._pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="peer-store")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _store(self) -> Store:
        store: Store | None = getattr(self._local, "store", None)
        if store is None:
            store = Store(self.store_dir)
            self._local.store = store
        return store

    def _parsed_manifest(self, manifest_hash: str, body: bytes) -> Manifest:
        with self._lock:
            cached = self._parsed.get(manifest_hash)
            if cached is not None:
                self._parsed.move_to_end(manifest_hash)
                return cached
        manifest = parse_manifest(body, self.limits)
        with self._lock:
            self._parsed[manifest_hash] = manifest
            while len(self._parsed) > _MANIFEST_CACHE:
                self._parsed.popitem(last=False)
        return manifest

    def summaries(self) -> list[protocol.ManifestSummary]:
        """Manifests of models this host holds or is importing, newest sequence first."""
        rows = self._store().offered_manifests()
        out = []
        for manifest_hash, channel, sequence, complete in rows:
            signed = self._store().manifest(manifest_hash)
            if signed is None:
                continue
            try:
                manifest = self._parsed_manifest(manifest_hash, signed[0])
            except ApplianceError:
                continue  # the store authenticated it once; if it no longer parses, skip it
            models = tuple(protocol.ModelName(m.name, m.version) for m in manifest.models)
            out.append(protocol.ManifestSummary(manifest_hash, channel, sequence, complete,
                                                models))
        return out

    def manifest(self, manifest_hash: str) -> tuple[bytes, tuple[str, ...]] | None:
        return self._store().manifest(manifest_hash)

    def trust_versions(self) -> list[int]:
        return [s.root.version for s in trust_state.installed_chain(self.store_dir,
                                                                    self._store().conn)]

    def trust_root(self, version: int) -> bytes | None:
        for signed in trust_state.installed_chain(self.store_dir, self._store().conn):
            if signed.root.version == version:
                return signed.to_bytes()
        return None

    def have(self, manifest_hash: str) -> list[bool] | None:
        signed = self._store().manifest(manifest_hash)
        if signed is None:
            return None
        manifest = self._parsed_manifest(manifest_hash, signed[0])
        held = self._store().held_digests()
        return [c.digest in held for c in manifest.unique_chunks()]

    def fetching(self, manifest_hash: str, count: int) -> list[bool]:
        """The chunks this host's running pull announces (``appliance.peer.announce``)."""
        return announce.read_fetching(self.store_dir, manifest_hash, count)

    def chunk(self, digest: str) -> bytes | None:
        store = self._store()
        data = store.read_local_chunk(digest)
        if data is None and store.find_chunk(digest):
            self._quarantine(digest)  # held, yet no copy passes its hash
        return data

    def _quarantine(self, digest: str) -> None:
        # One at a time: many pullers asking for the same rotten chunk quarantine it once
        # (the scrub re-checks every copy, so a later call finds nothing left to do).
        with self._quarantining:
            try:
                damaged = scrub.quarantine_damaged(self.store_dir, digest)
            except ApplianceError as e:
                log.error("chunk %s failed its check here, and quarantining its file failed: "
                          "%s", digest, e)
                return
        for f in damaged:
            log.error("chunk %s of %s:%s/%s is damaged in this store (%s); %s", digest,
                      f.model, f.version, f.path, f.reason,
                      f"file quarantined to {f.quarantined_to}" if f.quarantined_to
                      else "it will be fetched again")


class RateLimiter:
    """A token bucket shared by every response (bytes per second, one second of burst)."""

    def __init__(self, bytes_per_second: float) -> None:
        if bytes_per_second <= 0:
            raise UsageError("the rate limit must be positive")
        self.rate = float(bytes_per_second)
        self.tokens = self.rate
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self.lock:
            now = time.monotonic()
            self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= n
            deficit = -self.tokens
        if deficit > 0:
            await asyncio.sleep(deficit / self.rate)


class ChunkResponse:
    """Sends a body in pieces; each send must finish within ``send_timeout`` or the
    connection is dropped, so a stalled reader frees its slot."""

    def __init__(
        self,
        data: bytes,
        *,
        send_timeout: float,
        limiter: RateLimiter | None,
        release: Callable[[], None],
    ) -> None:
        self.data = data
        self.send_timeout = send_timeout
        self.limiter = limiter
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        view = memoryview(self.data)
        try:
            await asyncio.wait_for(send({
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/octet-stream"),
                    (b"content-length", str(len(self.data)).encode("ascii")),
                ],
            }), self.send_timeout)
            step = PIECE_BYTES if self.limiter is None else LIMITED_PIECE_BYTES
            for start in range(0, max(len(view), 1), step):
                piece = view[start:start + step]
                if self.limiter is not None:
                    await self.limiter.take(len(piece))
                more = start + step < len(view)
                await asyncio.wait_for(
                    send({"type": "http.response.body", "body": bytes(piece), "more_body": more}),
                    self.send_timeout,
                )
        except TimeoutError as e:
            # Raising makes uvicorn drop the connection, which is the point.
            raise PeerError(
                f"a reader took no data for {self.send_timeout:.0f} s; connection dropped"
            ) from e
        finally:
            self.release()


def _error(status: int, message: str) -> Response:
    return Response(
        protocol.encode_json({"error": message}), status_code=status,
        media_type="application/json",
    )


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


def create_app(
    source: StoreSource,
    *,
    host_name: str,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    max_chunk_streams: int = DEFAULT_MAX_CHUNK_STREAMS,
    rate_limit: float | None = None,
    stream_wait: float = 10.0,
) -> Starlette:
    """The peer protocol as a Starlette app over ``source``."""
    limiter = RateLimiter(rate_limit) if rate_limit else None
    # An asyncio semaphore: a request waiting for a slot must not hold a worker thread, or
    # the waiters starve the holders of the threads they read the store with.
    streams = asyncio.Semaphore(max_chunk_streams)

    async def info(request: Request) -> Response:
        return _json(protocol.info_response(host_name))

    async def manifests(request: Request) -> Response:
        summaries = await source.call(source.summaries)
        return _json(protocol.manifests_response(summaries))

    def _digest(request: Request, key: str) -> str | None:
        value = str(request.path_params[key])
        return value if protocol.is_digest(value) else None

    async def manifest(request: Request) -> Response:
        digest = _digest(request, "hash")
        found = await source.call(source.manifest, digest) if digest else None
        if found is None:
            return _error(404, "no such manifest")
        return Response(found[0], media_type="application/yaml")

    async def signatures(request: Request) -> Response:
        digest = _digest(request, "hash")
        found = await source.call(source.manifest, digest) if digest else None
        if found is None:
            return _error(404, "no such manifest")
        return Response(protocol.encode_signatures(found[1]), media_type="text/plain")

    async def trust(request: Request) -> Response:
        return _json(protocol.trust_response(await source.call(source.trust_versions)))

    async def trust_root(request: Request) -> Response:
        body = await source.call(source.trust_root, int(request.path_params["version"]))
        if body is None:
            return _error(404, "no such trust root version")
        return Response(body, media_type="application/yaml")

    async def have(request: Request) -> Response:
        digest = _digest(request, "hash")
        flags = await source.call(source.have, digest) if digest else None
        if flags is None or digest is None:
            return _error(404, "no such manifest")
        fetching = None
        if request.query_params.get(protocol.FETCHING_QUERY) == "1":
            fetching = await source.call(source.fetching, digest, len(flags))
        return _json(protocol.have_response(digest, flags, fetching))

    async def chunk(request: Request) -> Any:
        digest = _digest(request, "digest")
        if digest is None:
            return _error(400, "not a chunk digest")
        try:
            await asyncio.wait_for(streams.acquire(), stream_wait)
        except TimeoutError:
            return _error(503, "too many chunk transfers in flight; retry")
        try:
            data = await source.call(source.chunk, digest)
        except BaseException:
            streams.release()
            raise
        if data is None:
            streams.release()
            return _error(404, "no verified copy of this chunk here")
        return ChunkResponse(data, send_timeout=send_timeout, limiter=limiter,
                             release=streams.release)

    return Starlette(routes=[
        Route(protocol.info_path(), info),
        Route(protocol.manifests_path(), manifests),
        Route("/v1/manifests/{hash}", manifest),
        Route("/v1/manifests/{hash}/signatures", signatures),
        Route(protocol.trust_path(), trust),
        Route("/v1/trust/{version:int}", trust_root),
        Route("/v1/have/{hash}", have),
        Route("/v1/chunks/{digest}", chunk),
    ])


class PeerServer(HTTPServer):
    """The peer app on a socket bound here, with mutual TLS from ``tls_dir`` (or, only when
    ``insecure``, plaintext); ``url`` is known after bind."""

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_dir: Path | None = None,
        insecure: bool = False,
        options: ServerOptions | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        if tls_dir is None and not insecure:
            raise UsageError("a peer server needs --tls-dir DIR (site certificate) or --insecure")
        ssl_context = tls.server_context(tls_dir) if tls_dir is not None else None
        sock = bind(host, port, error=PeerError)
        super().__init__(app, sock, ssl_context=ssl_context, options=options, on_stop=on_stop)
        self.host = host

    def start_error(self) -> ApplianceError:
        return PeerError(f"the peer server on {self.url} did not start")


def serve_store(
    store_dir: Path,
    *,
    host: str,
    port: int,
    tls_dir: Path | None,
    insecure: bool,
    host_name: str | None = None,
    rate_limit: float | None = None,
    limits: Limits = DEFAULT_LIMITS,
    options: ServerOptions | None = None,
) -> PeerServer:
    """A PeerServer over this host's store (not started)."""
    name = host_name or socket.gethostname()
    source = StoreSource(store_dir, limits)
    app = create_app(source, host_name=name, rate_limit=rate_limit)
    return PeerServer(app, host=host, port=port, tls_dir=tls_dir, insecure=insecure,
                      options=options, on_stop=source.close)
