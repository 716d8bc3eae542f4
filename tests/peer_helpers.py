"""Helpers for the peer tests: seeded stores, servers and hostile peers.

A *site* here is a trust root installed in each host's store (``trust_helpers.trusted_store``),
a signed manifest built from real bytes (``bundle_helpers.make_bundle``), and hosts that
are real stores served by real ``PeerServer``s on 127.0.0.1. ``seed`` writes a manifest's
models into a store through the store's own API, as an import does. Hostile peers are the
real app wrapped in ASGI middleware that lies, dies or stalls on chunk requests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bundle_helpers import Bundle
from trust_helpers import NOW

from appliance.peer import server as peer_server
from appliance.peer.client import ConnectPolicy, PeerClient, Timeouts
from appliance.peer.pull import PullOptions
from appliance.store import trust_state
from appliance.store.store import BundleOrigin, Store

INSECURE = ConnectPolicy(None, insecure=True)
FAST = PullOptions(per_peer=2, workers=8, max_failures=2, refresh=0.1, wait_for_chunks=2.0,
                   flush_bytes=1)
QUICK = Timeouts(connect=2.0, read=2.0, chunk_deadline=5.0)


def seed(store_dir: Path, bundle: Bundle, *, partial_chunks: int | None = None) -> None:
    """Write the bundle's models into the store the way an import does."""
    origin = BundleOrigin(
        manifest_hash=bundle.hash,
        channel=bundle.manifest.channel,
        sequence=bundle.manifest.sequence,
        manifest_bytes=bundle.body,
        signatures=tuple(s.to_bytes().decode("ascii").strip() for s in bundle.signatures),
        signers=tuple(s.key_id for s in bundle.signatures),
    )
    with Store(store_dir) as store:
        with store.transaction() as conn:
            store.add_manifest(origin, bundle.size, NOW)
            trust_state.record_channel(store_dir, origin.channel, origin.sequence,
                                       origin.manifest_hash, conn, now=NOW)
        written = 0
        for model in bundle.manifest.models:
            model_id = store.begin_model(model, bundle.hash, NOW)
            assert model_id is not None
            for sf in store.stage_files(model_id, NOW):
                data = bundle.contents[model.name][sf.path]
                for chunk in sf.pending():
                    if partial_chunks is not None and written >= partial_chunks:
                        break
                    sf.write_chunk(chunk.idx, data[chunk.offset:chunk.offset + chunk.length])
                    written += 1
                else:
                    sf.publish(NOW)
                sf.close()
        if partial_chunks is None:
            store.finish_import(bundle.hash, NOW)


def published_bytes(store_dir: Path, name: str, path: str, version: str = "1") -> bytes:
    from appliance.store.layout import published_path

    return published_path(store_dir, name, version, path).read_bytes()


def start_server(store_dir: Path, *, wrap: Callable[[Any], Any] | None = None,
                 tls_dir: Path | None = None, options: peer_server.ServerOptions | None = None,
                 **app_kwargs: Any) -> peer_server.PeerServer:
    source = peer_server.StoreSource(store_dir)
    app = peer_server.create_app(source, host_name=f"host-{store_dir.name}", **app_kwargs)
    if wrap is not None:
        app = wrap(app)
    return peer_server.PeerServer(app, tls_dir=tls_dir, insecure=tls_dir is None,
                                  options=options, on_stop=source.close).start()


def client(url: str, policy: ConnectPolicy = INSECURE, timeouts: Timeouts = QUICK,
           **kwargs: Any) -> PeerClient:
    return PeerClient(url, policy, timeouts=timeouts, **kwargs)


# --- hostile peers: the real app behind middleware that misbehaves on chunk requests -------


class ChunkTamper:
    """ASGI middleware: lets ``mode`` rewrite chunk responses after the first ``honest`` ones.

    Modes: "flip" (flip a byte of the body), "die" (send half, then drop the connection),
    "stall" (send half, then hang), "gate" (hold chunk ``digest`` until ``release`` is set),
    "refuse" (answer 404 for chunk ``digest``, which the have-map still lists).
    """

    def __init__(self, app: Any, mode: str, *, honest: int = 0, digest: str | None = None
                 ) -> None:
        self.app = app
        self.mode = mode
        self.honest = honest
        self.digest = digest
        self.release = threading.Event()
        self.served = 0
        self.tampered = 0
        self.lock = threading.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/chunks/"):
            await self.app(scope, receive, send)
            return
        if self.mode == "refuse":
            if not path.endswith(self.digest or "-"):
                await self.app(scope, receive, send)
                return
            with self.lock:
                self.tampered += 1
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if self.mode == "gate":
            if path.endswith(self.digest or "-"):
                while not self.release.is_set():
                    await asyncio.sleep(0.02)
            await self.app(scope, receive, send)
            return
        with self.lock:
            self.served += 1
            honest = self.served <= self.honest
            if not honest:
                self.tampered += 1
        if honest:
            await self.app(scope, receive, send)
            return
        body = bytearray()
        start: dict[str, Any] = {}

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                body.extend(message.get("body", b""))

        await self.app(scope, receive, capture)
        if start.get("status") != 200:
            await send(start)
            await send({"type": "http.response.body", "body": bytes(body)})
            return
        if self.mode == "flip":
            body[len(body) // 2] ^= 0xFF
            await send(start)
            await send({"type": "http.response.body", "body": bytes(body)})
            return
        await send(start)
        await send({"type": "http.response.body", "body": bytes(body[: len(body) // 2]),
                    "more_body": True})
        if self.mode == "die":
            raise ConnectionAbortedError("hostile peer dies mid-transfer")
        await asyncio.sleep(3600)  # stall


class RawTcpPeer:
    """A raw TCP server on loopback: every connection gets ``answer(conn)`` on its own thread
    (hostile peers that speak just enough HTTP to misbehave); ``close`` stops it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            self.answer(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def answer(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


class EndlessPeer(RawTcpPeer):
    """Answers every request with headers and then bytes forever."""

    def __init__(self) -> None:
        self.sent = 0
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                     b"connection: close\r\n\r\n")
        block = os.urandom(65536)
        while not self.stop.is_set():
            conn.sendall(block)
            self.sent += len(block)


def stop(proc: subprocess.Popen[str], timeout: float = 20) -> None:
    """SIGTERM a server this test started, then SIGKILL it if it has not gone in ``timeout``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
