"""The peer client's per-chunk costs and deadlines, against real sockets on 127.0.0.1.

Each chunk is hashed once on its way into the store (by the client; the sink is told and checks
only the length), while a peer that does not say it checks is still hashed by the sink. The
slowness deadline grows with the requests in flight to a peer, and a patient request (the only
holder of a chunk) is never given up on while bytes flow, only when they stall.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import httpcore
import pytest
from bundle_helpers import CHUNK, Bundle, make_bundle, model_bytes
from httpcore._backends.sync import SyncStream  # httpcore's own plain stream
from peer_helpers import FAST, INSECURE, RawTcpPeer, client, seed
from trust_helpers import NOW, trusted_store

from appliance import chunks
from appliance.errors import PeerError
from appliance.peer import client as client_module
from appliance.peer import tls
from appliance.peer.client import PeerClient, Timeouts, connect_policy
from appliance.peer.pull import pull
from appliance.store import audit, ingest
from appliance.store.db import connect
from appliance.store.records import list_models

BODY = model_bytes(7, 64 * 1024)
DIGEST = blake3.blake3(BODY).hexdigest()


@pytest.fixture(scope="module")
def model() -> Bundle:
    return make_bundle({"tiny": {"model.gguf": model_bytes(3, 6 * CHUNK + 77)}})


def seeded(tmp_path: Path, bundle: Bundle) -> Path:
    store = trusted_store(tmp_path / "seed")
    seed(store, bundle)
    return store


class TricklePeer(RawTcpPeer):
    """A raw TCP peer answering every request with ``body`` (its Content-Length declared) in
    ``piece``-byte pieces ``gap`` seconds apart; with ``stall_after`` it stops sending after
    that many bytes and holds the connection open."""

    def __init__(self, body: bytes, *, piece: int, gap: float, stall_after: int | None = None
                 ) -> None:
        self.body, self.piece, self.gap, self.stall_after = body, piece, gap, stall_after
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n" % len(self.body))
        for start in range(0, len(self.body), self.piece):
            if self.stall_after is not None and start >= self.stall_after:
                self.stop.wait(30)
                return
            conn.sendall(self.body[start:start + self.piece])
            time.sleep(self.gap)


@pytest.fixture
def trickle() -> Iterator[Callable[..., TricklePeer]]:
    made: list[TricklePeer] = []

    def make(**kwargs: Any) -> TricklePeer:
        made.append(TricklePeer(BODY, **kwargs))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


# 64 KiB in 16 pieces 0.04 s apart: about 0.6 s of steady bytes, three times the deadline.
STEADY = {"piece": 4096, "gap": 0.04}
TIGHT = Timeouts(connect=2.0, read=1.0, chunk_deadline=0.2, min_rate=1e12)


def test_a_slow_but_steady_peer_misses_the_deadline_unless_asked_patiently(trickle) -> None:
    peer = trickle(**STEADY)
    with client(peer.url, timeouts=TIGHT) as c:
        with pytest.raises(PeerError, match="too slow sending chunk"):
            c.chunk(DIGEST, len(BODY))
        assert c.chunk(DIGEST, len(BODY), patient=True) == BODY
        assert c.chunks_in_flight == 0


def test_a_stalled_peer_times_out_even_when_asked_patiently(trickle) -> None:
    peer = trickle(**STEADY, stall_after=16 * 1024)
    start = time.monotonic()
    with client(peer.url, timeouts=TIGHT) as c, pytest.raises(PeerError, match="timed out"):
        c.chunk(DIGEST, len(BODY), patient=True)
    assert time.monotonic() - start < TIGHT.read + 2


def test_the_deadline_grows_with_the_requests_in_flight_to_the_peer(trickle) -> None:
    # Budget per request: length * in_flight / min_rate = 0.35 s alone (the body takes ~0.6 s),
    # 1.4 s with four in flight.
    peer = trickle(**STEADY)
    timeouts = Timeouts(connect=2.0, read=1.0, chunk_deadline=0.1, min_rate=len(BODY) / 0.35)
    with client(peer.url, timeouts=timeouts) as c:
        with pytest.raises(PeerError, match="too slow"):
            c.chunk(DIGEST, len(BODY))
        results: list[object] = []

        def fetch() -> None:
            try:
                results.append(c.chunk(DIGEST, len(BODY)))
            except PeerError as e:
                results.append(e)

        threads = [threading.Thread(target=fetch) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [BODY] * 4


class _Trickle:
    """ASGI middleware: chunk bodies in 4 pieces, 0.1 s apart (a slow, steady link)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/chunks/"):
            await self.app(scope, receive, send)
            return
        import asyncio

        async def slowly(message: dict[str, Any]) -> None:
            body = message.get("body", b"")
            if message["type"] != "http.response.body" or len(body) < 4:
                await send(message)
                return
            step = -(-len(body) // 4)
            for start in range(0, len(body), step):
                await send({"type": "http.response.body", "body": body[start:start + step],
                            "more_body": True})
                await asyncio.sleep(0.1)
            if not message.get("more_body"):
                await send({"type": "http.response.body", "body": b""})

        await self.app(scope, receive, slowly)


def test_the_only_peer_is_not_dropped_for_a_slow_steady_link(tmp_path: Path, model: Bundle,
                                                              servers) -> None:
    seed_server = servers(seeded(tmp_path, model), wrap=_Trickle)
    b = trusted_store(tmp_path / "b")
    # Every chunk takes ~0.3 s, past its 0.1 s deadline: only patience gets the model.
    with PeerClient(seed_server.url, INSECURE,
                    timeouts=Timeouts(connect=2, read=2, chunk_deadline=0.1, min_rate=1e12)) as c:
        [result] = pull(b, [c], ["tiny"], options=FAST, now=NOW)
    assert result.models == ["tiny:1"] and not result.dropped
    assert result.by_peer == {seed_server.url: model.size}


def test_the_real_clients_bytes_are_hashed_once(tmp_path: Path, model: Bundle, servers,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"client": 0, "sink": 0}

    def counting(where: str) -> Callable[..., None]:
        def check(*args: Any, **kwargs: Any) -> None:
            calls[where] += 1
            chunks.check_chunk(*args, **kwargs)
        return check

    monkeypatch.setattr(client_module, "check_chunk", counting("client"))
    monkeypatch.setattr(ingest, "check_chunk", counting("sink"))
    seed_server = servers(seeded(tmp_path, model))
    b = trusted_store(tmp_path / "b")
    with client(seed_server.url) as c:
        [result] = pull(b, [c], ["tiny"], options=FAST, now=NOW)
    unique = len({ch.digest for ch in model.manifest.models[0].files[0].chunks})
    assert result.bytes_fetched == model.size
    assert calls == {"client": unique, "sink": 0}


class UncheckedForger(PeerClient):
    """A peer client that flips a byte of what it got and does not say it checks (as any
    PeerLike other than the real client): the sink must hash and refuse it."""

    checks_chunks = False

    def chunk(self, digest: str, length: int, *, patient: bool = False) -> bytes | None:
        data = super().chunk(digest, length, patient=patient)
        if data is None:
            return None
        forged = bytearray(data)
        forged[len(forged) // 2] ^= 0xFF
        return bytes(forged)


def test_a_peer_not_claiming_to_check_is_checked_by_the_sink(tmp_path: Path, model: Bundle,
                                                             servers) -> None:
    seed_server = servers(seeded(tmp_path, model))
    b = trusted_store(tmp_path / "b")
    with UncheckedForger(seed_server.url, INSECURE, timeouts=TIGHT) as forger, \
            pytest.raises(PeerError, match="every peer was dropped") as raised:
        pull(b, [forger], ["tiny"], options=FAST, now=NOW)
    assert "IntegrityError" in str(raised.value)
    assert list_models(b) == []
    [refusal] = [r for r in audit.records(b) if r.kind == "refusal"]
    assert refusal.details["peer"] == seed_server.url
    db = connect(b)
    try:  # every chunk it sent was forged: none is marked done
        assert db.execute("SELECT count(*) FROM chunks WHERE done = 1").fetchone()[0] == 0
    finally:
        db.close()


def test_a_read_takes_everything_that_has_already_arrived() -> None:
    left, right = socket.socketpair()
    try:
        stream = client_module._GatheringStream(SyncStream(left))
        for _ in range(5):
            right.sendall(b"x" * 20_000)
        time.sleep(0.05)
        assert len(stream.read(16384, timeout=1.0)) == 100_000  # not the 16 KiB asked for
        with pytest.raises(httpcore.ReadTimeout):  # nothing there: the per-read timeout
            stream.read(65536, timeout=0.2)
        right.close()
        assert stream.read(65536, timeout=1.0) == b""  # EOF still reads as EOF
    finally:
        left.close()


def test_over_tls_a_read_gathers_more_than_one_record(tmp_path: Path, servers,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    big = make_bundle({"big": {"w.bin": model_bytes(5, 4 * 1024 * 1024)}}, chunk=1024 * 1024)
    tls.init_site(tmp_path / "ca")
    tls.enroll_host("seed", tmp_path / "ca", tmp_path / "seed-tls")
    tls.enroll_host("puller", tmp_path / "ca", tmp_path / "puller-tls")
    seed_server = servers(seeded(tmp_path, big), tls_dir=tmp_path / "seed-tls")
    sizes: list[int] = []
    real_read = client_module._GatheringStream.read

    def read(self: Any, max_bytes: int, timeout: float | None = None) -> bytes:
        data = real_read(self, max_bytes, timeout)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(client_module._GatheringStream, "read", read)
    policy = connect_policy(tmp_path / "puller-tls", insecure=False)
    with PeerClient(seed_server.url, policy) as c:
        for ref in big.manifest.models[0].files[0].chunks:
            assert c.chunk(ref.digest, ref.length) is not None
    assert max(sizes) > 16 * 1024  # one TLS record is at most 16 KiB
