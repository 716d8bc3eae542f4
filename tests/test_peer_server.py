"""The peer server under load and abuse: many pullers, stalled readers, limits, bad requests."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import httpx
import pytest
from bundle_helpers import CHUNK, Bundle, make_bundle, model_bytes
from peer_helpers import client, seed, start_server
from trust_helpers import NOW, trusted_store

from appliance.errors import PeerError, UsageError
from appliance.http_server import parse_listen
from appliance.peer.pull import pull
from appliance.peer.server import (
    DEFAULT_READERS,
    PeerServer,
    RateLimiter,
    ServerOptions,
)
from appliance.store import audit, layout, trust_state
from appliance.store.records import list_models

BIG = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def tiny_and_big() -> Bundle:
    return make_bundle({
        "tiny": {"model.gguf": model_bytes(11, 12 * CHUNK)},
        "big": {"big.bin": model_bytes(12, 2 * BIG)},
    })


@pytest.fixture
def store(tmp_path: Path, tiny_and_big: Bundle) -> Path:
    s = trusted_store(tmp_path / "a")
    seed(s, tiny_and_big)
    return s


@pytest.fixture
def big_chunk_bundle() -> Bundle:
    return make_bundle({"big": {"big.bin": model_bytes(13, 2 * BIG)}}, chunk=BIG)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def stalled_reader(url: str, path: str) -> socket.socket:
    """A client that asks for a body and then never reads it (tiny receive window)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
    return sock


def drain(sock: socket.socket, timeout: float) -> tuple[int, bool]:
    """Read what is there; (bytes read, whether the server closed the connection)."""
    sock.settimeout(timeout)
    total = 0
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return total, True
            total += len(data)
    except (TimeoutError, ConnectionResetError):
        return total, False


@pytest.fixture
def big_server(tmp_path: Path, big_chunk_bundle: Bundle) -> Iterator[tuple[PeerServer, Bundle]]:
    s = trusted_store(tmp_path / "big")
    seed(s, big_chunk_bundle)
    server = start_server(s, send_timeout=1.0, max_chunk_streams=4)
    yield server, big_chunk_bundle
    server.stop()


@pytest.mark.slow
def test_50_concurrent_pullers_and_stalled_readers(big_server, tmp_path: Path, store: Path,
                                                   tiny_and_big: Bundle) -> None:
    server, big = big_server
    big_ref = big.manifest.models[0].files[0].chunks[0]
    baseline = open_fds()
    stalled = [stalled_reader(server.url, f"/v1/chunks/{big_ref.digest}") for _ in range(12)]
    refs = [c for _, _, c in big.manifest.iter_chunks()]

    def one_puller(i: int) -> int:
        with client(server.url, timeouts=httpx_timeouts()) as c:
            assert c.manifests()
            assert c.have(big.hash, len(refs)) == [True] * len(refs)
            if i % 5:
                return 0
            ref = refs[i % len(refs)]  # every fifth also takes a 4 MiB chunk
            data = c.chunk(ref.digest, ref.length)
            assert data is not None and blake3.blake3(data).hexdigest() == ref.digest
            return len(data)

    with ThreadPoolExecutor(max_workers=50) as pool:
        sizes = list(pool.map(one_puller, range(50)))
    assert sizes == [0 if i % 5 else refs[i % len(refs)].length for i in range(50)]
    # The stalled readers were cut off after send_timeout; they got less than a chunk.
    for sock in stalled:
        got, closed = drain(sock, 5.0)
        assert closed and got < big_ref.length
        sock.close()
    after_first = settled_fds()
    # A second round of 50 leaves no more descriptors behind than the first: nothing leaks.
    with ThreadPoolExecutor(max_workers=50) as pool:
        list(pool.map(one_puller, range(50)))
    assert settled_fds() <= after_first
    # Bounded: a few index connections of the store reader threads, nothing per client.
    assert after_first <= baseline + 3 * DEFAULT_READERS + 2
    with client(server.url) as c:
        assert c.info().host


def settled_fds() -> int:
    """Open descriptors once closing connections have settled (unchanged for 0.5 s)."""
    deadline = time.monotonic() + 10
    last, since = open_fds(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < 0.5:
        time.sleep(0.05)
        now = open_fds()
        if now != last:
            last, since = now, time.monotonic()
    return last


def httpx_timeouts():
    from appliance.peer.client import Timeouts

    return Timeouts(connect=10, read=20, chunk_deadline=60)


def test_a_stalled_reader_frees_its_slot(big_server) -> None:
    server, big = big_server
    ref = big.manifest.models[0].files[0].chunks[0]
    # Every chunk slot taken by a reader that never reads...
    stalled = [stalled_reader(server.url, f"/v1/chunks/{ref.digest}") for _ in range(4)]
    try:
        start = time.monotonic()
        with client(server.url, timeouts=httpx_timeouts()) as c:
            assert c.chunk(ref.digest, ref.length) is not None  # ...yet this one gets through
        assert time.monotonic() - start < 10
    finally:
        for sock in stalled:
            sock.close()


def test_rate_limit_caps_the_upload(tmp_path: Path, store: Path, tiny_and_big: Bundle) -> None:
    refs = list(tiny_and_big.manifest.models[0].files[0].chunks)
    nbytes = sum(r.length for r in refs)  # 196 KB
    rate = nbytes / 4  # one second of burst, then three more seconds at the cap

    def fetch_all(server: PeerServer) -> float:
        with client(server.url) as c:
            start = time.monotonic()
            for r in refs:
                assert c.chunk(r.digest, r.length) is not None
            return time.monotonic() - start

    capped = start_server(store, rate_limit=rate)
    free = start_server(store)
    try:
        assert fetch_all(capped) >= 2.5
        assert fetch_all(free) < 2.0
    finally:
        capped.stop()
        free.stop()
    with pytest.raises(UsageError):
        RateLimiter(0)


def test_connections_beyond_the_limit_get_busy(store: Path) -> None:
    # uvicorn counts the connection asking too: with N open, the Nth request is refused.
    server = start_server(store, options=ServerOptions(max_connections=3))
    try:
        held = [httpx.Client(base_url=server.url) for _ in range(2)]
        for h in held:
            assert h.get("/v1/info").status_code == 200  # keep-alive: connection stays open
        with client(server.url) as c, pytest.raises(PeerError, match="busy"):
            c.manifests()
        for h in held:
            h.close()
        time.sleep(0.2)
        with client(server.url) as c:
            assert c.info()
    finally:
        server.stop()


def test_bad_and_unknown_requests(store: Path, tiny_and_big: Bundle) -> None:
    server = start_server(store)
    try:
        raw = httpx.get(f"{server.url}/v1/chunks/not-a-digest")
        assert raw.status_code == 400
        assert httpx.get(f"{server.url}/v1/manifests/..%2F..%2Fetc").status_code == 404
        with client(server.url) as c:
            assert c.chunk("0" * 64, 10) is None
            assert c.manifest_bytes("0" * 64) is None
            assert c.have("0" * 64, 1) is None
            assert c.manifest_bytes(tiny_and_big.hash) == tiny_and_big.body
            assert c.signatures(tiny_and_big.hash) == tiny_and_big.signatures
            assert c.trust_versions() == [1]
            root = c.trust_root(1)
            assert root is not None
            assert root == trust_state.installed_chain(store)[0].to_bytes()
            assert c.trust_root(2) is None
    finally:
        server.stop()


def test_a_seed_that_finds_its_copy_rotten_quarantines_the_file(
    store: Path, tiny_and_big: Bundle,
) -> None:
    tiny, big = tiny_and_big.manifest.models
    ref = tiny.files[0].chunks[3]
    path = layout.published_path(store, "tiny", "1", "model.gguf")
    server = start_server(store)
    try:
        with client(server.url) as c:
            count = len(tiny_and_big.manifest.unique_chunks())
            assert c.have(tiny_and_big.hash, count) == [True] * count
            [summary] = c.manifests()
            assert summary.complete
            os.chmod(path, 0o644)  # the disk rots under the running server
            with open(path, "r+b") as f:
                f.seek(ref.offset + 5)
                byte = f.read(1)
                f.seek(ref.offset + 5)
                f.write(bytes([byte[0] ^ 1]))
            assert c.chunk(ref.digest, ref.length) is None  # a refusal, never the bad bytes
            # The file is quarantined: none of its chunks is offered any more, the other
            # model's still are, and the manifest is no longer offered as complete.
            tiny_digests = {chunk.digest for chunk in tiny.files[0].chunks}
            assert c.have(tiny_and_big.hash, count) == [
                chunk.digest not in tiny_digests for chunk in tiny_and_big.manifest.unique_chunks()
            ]
            other = tiny.files[0].chunks[4]
            assert c.chunk(other.digest, other.length) is None
            kept = big.files[0].chunks[0]
            assert c.chunk(kept.digest, kept.length) is not None
            [summary] = c.manifests()
            assert not summary.complete
    finally:
        server.stop()
    assert not path.exists()
    [moved] = list(layout.quarantine_dir(store).iterdir())
    assert moved.read_bytes()[ref.offset + 5] == byte[0] ^ 1
    [record] = [r for r in audit.records(store) if r.kind == "quarantine"]
    assert record.details["chunk"] == ref.digest and record.details["model"] == "tiny"
    assert audit.verify(store) >= 1
    [model] = [m for m in list_models(store) if m.name == "tiny"]
    assert not model.verified


def test_server_needs_tls_or_insecure_and_a_valid_listen(store: Path) -> None:
    from appliance.peer.server import StoreSource, create_app

    app = create_app(StoreSource(store), host_name="x")
    with pytest.raises(UsageError, match="insecure"):
        PeerServer(app)
    for bad in ("nohost", "host:port", ":80", "h:70000"):
        with pytest.raises(UsageError):
            parse_listen(bad)
    assert parse_listen("[::1]:8765") == ("::1", 8765)
    with PeerServer(app, insecure=True) as first, pytest.raises(PeerError, match="cannot listen"):
        PeerServer(app, port=first.port, insecure=True, host="127.0.0.1").sock.close()


def test_pull_over_ipv6_loopback(tmp_path: Path, store: Path) -> None:
    from appliance.peer.server import StoreSource, create_app

    app = create_app(StoreSource(store), host_name="v6")
    try:
        server = PeerServer(app, host="::1", insecure=True).start()
    except PeerError:
        pytest.skip("no IPv6 loopback here")
    try:
        b = trusted_store(tmp_path / "b")
        with client(server.url) as c:
            [result] = pull(b, [c], ["tiny"], now=NOW)
        assert result.bytes_fetched == result.bytes_total
    finally:
        server.stop()
