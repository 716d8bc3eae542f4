"""Connections that never finish (``appliance.http_server``, under both ``peer serve`` and
``serve``): header deadlines, pending caps, stalled TLS handshakes, and what thousands of idle
connections cost a mutual-TLS peer server.

Clients are raw sockets on loopback: silent ones, slowloris ones that drip a header a byte at a
time, and TLS ones that stop inside the handshake. Several source addresses come from
127.0.0.0/8 (every 127.x.y.z is loopback on Linux). The memory test runs the server in a child
process and reads its VmRSS from /proc.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundle_helpers import CHUNK, Bundle, make_bundle, model_bytes
from peer_helpers import client, seed
from serve_helpers import running_server, wait_health
from trust_helpers import NOW, trusted_store

from appliance.errors import UsageError
from appliance.http_limits import ServerOptions
from appliance.http_server import parse_listen
from appliance.peer import tls
from appliance.peer.client import connect_policy
from appliance.peer.pull import pull
from appliance.peer.server import PeerServer, StoreSource, create_app

REPO = Path(__file__).resolve().parent.parent
STALLED_HELLO = b"\x16\x03\x01\x02\x00\x01"  # the start of a ClientHello, then nothing
REQUEST = b"GET /v1/info HTTP/1.1\r\nhost: test\r\nuser-agent: slow-client\r\n\r\n"


@pytest.fixture(scope="module")
def tiny_manifest() -> Bundle:
    return make_bundle({"tiny": {"model.gguf": model_bytes(31, 8 * CHUNK)}})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_manifest: Bundle) -> Path:
    s = trusted_store(tmp_path_factory.mktemp("limits") / "a")
    seed(s, tiny_manifest)
    return s


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("site")
    tls.init_site(base / "ca")
    for host in ("a", "b"):
        tls.enroll_host(f"host-{host}", base / "ca", base / host)
    return base


@contextlib.contextmanager
def serving(store: Path, tls_dir: Path | None = None, **limits: float) -> Iterator[PeerServer]:
    app = create_app(StoreSource(store), host_name="limits")
    server = PeerServer(app, tls_dir=tls_dir, insecure=tls_dir is None,
                        options=ServerOptions(**limits))  # type: ignore[arg-type]
    with server:
        yield server


def connect(server: PeerServer, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=10,
                                    source_address=(source, 0))
    return sock


def read_response(sock: socket.socket) -> bytes:
    """One whole response (headers and a Content-Length body) from ``sock``."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
    length = int(found.group(1)) if found else 0
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds (reading what comes)."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_a_header_sent_a_byte_a_second_is_cut_at_the_header_timeout(store: Path) -> None:
    with serving(store, header_timeout=2.0) as server, connect(server) as sock:
        start = time.monotonic()
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for byte in REQUEST:
                sock.sendall(bytes([byte]))
                sent += 1
                if closed_by_server(sock, 1.0):
                    break
        took = time.monotonic() - start
        assert sent < len(REQUEST)  # cut before the header was complete
        assert 2.0 <= took < 4.0
        assert server.stats.timed_out == 1
        assert server.stats.admitted == 0


def test_a_slow_second_request_on_a_kept_alive_connection_is_cut(store: Path) -> None:
    with serving(store, header_timeout=1.0, keep_alive=30) as server, connect(server) as sock:
        sock.sendall(REQUEST)
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        sock.sendall(REQUEST[:10])  # a second request begins, then nothing more comes
        assert closed_by_server(sock, 5.0)
        assert 1.0 <= time.monotonic() - start < 3.0
        assert server.stats.timed_out == 1


def test_a_body_that_stops_coming_is_cut_at_the_body_timeout(store: Path) -> None:
    with serving(store, body_timeout=1.0) as server, connect(server) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /v1/info HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n")
        for _ in range(3):  # progress, however slow, keeps it alive...
            time.sleep(0.5)
            sock.sendall(b"x")
        assert closed_by_server(sock, 5.0)  # ...until it stops for the body timeout
        assert 2.5 <= time.monotonic() - start < 4.5
        assert server.stats.timed_out == 1


def test_a_kept_alive_connection_may_idle_between_requests_until_keep_alive(
    store: Path,
) -> None:
    with serving(store, header_timeout=0.5, keep_alive=3) as server, connect(server) as sock:
        for _ in range(2):
            sock.sendall(REQUEST)
            assert read_response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(1.0)  # idle past the header timeout: not cut, no request is pending
        assert server.stats.timed_out == 0


def test_silent_connections_over_the_per_address_cap_are_closed_oldest_first(
    store: Path,
) -> None:
    with serving(store, max_pending=100, max_pending_per_address=4) as server:
        socks = [connect(server) for _ in range(10)]
        try:
            time.sleep(0.3)
            closed = [closed_by_server(s, 0.2) for s in socks]
            assert closed == [True] * 6 + [False] * 4
            assert server.stats.evicted == 6
            # A client that speaks gets in: the oldest silent one makes room.
            with client(server.url) as c:
                assert c.info().host == "limits"
            assert closed_by_server(socks[6], 0.5)
        finally:
            for s in socks:
                s.close()


def test_the_total_pending_cap_spans_addresses(store: Path) -> None:
    with serving(store, max_pending=6, max_pending_per_address=4) as server:
        socks = [connect(server, f"127.0.0.{2 + i // 3}") for i in range(9)]  # 3 addresses
        try:
            time.sleep(0.3)
            closed = [closed_by_server(s, 0.2) for s in socks]
            assert closed == [True] * 3 + [False] * 6
            with client(server.url) as c:
                assert c.info().host == "limits"
        finally:
            for s in socks:
                s.close()


def test_a_tls_handshake_that_stalls_is_cut(store: Path, site: Path) -> None:
    with serving(store, site / "a", header_timeout=1.0) as server, connect(server) as sock:
        start = time.monotonic()
        sock.sendall(STALLED_HELLO)
        assert closed_by_server(sock, 5.0)
        assert 1.0 <= time.monotonic() - start < 3.0
        assert server.stats.timed_out == 1
        policy = connect_policy(site / "b", insecure=False)
        with client(server.url, policy) as c:  # a member still gets through
            assert c.info().host == "limits"
        assert server.stats.admitted == 1


def test_stopping_closes_pending_connections_at_once(store: Path, site: Path) -> None:
    server = PeerServer(create_app(StoreSource(store), host_name="limits"), tls_dir=site / "a")
    server.start()
    socks = [connect(server) for _ in range(10)]
    for sock in socks[:5]:
        sock.sendall(STALLED_HELLO)
    try:
        time.sleep(0.3)
        start = time.monotonic()
        server.stop()
        assert time.monotonic() - start < 3.0  # not the 10 s header timeout
        assert all(closed_by_server(s, 1.0) for s in socks)
    finally:
        for sock in socks:
            sock.close()


def test_a_header_over_the_cap_is_refused(store: Path) -> None:
    with serving(store, max_header_bytes=4096) as server, connect(server) as sock:
        sock.sendall(b"GET /v1/info HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 8192 + b"\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 431")
        assert closed_by_server(sock, 2.0)
        assert server.stats.refused == 1 and server.stats.admitted == 0


def test_the_inference_server_cuts_a_slow_header_too(tiny_gguf: Path) -> None:
    with running_server({"tiny": tiny_gguf}, options=ServerOptions(header_timeout=1.0)) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            start = time.monotonic()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
            assert closed_by_server(sock, 5.0)
            assert 1.0 <= time.monotonic() - start < 4.0
        assert server.stats.timed_out == 1
        assert wait_health(server.url)["status"] == "ok"


def test_limits_are_checked() -> None:
    for bad in ({"max_pending": 0}, {"max_connections": 0}, {"header_timeout": 0},
                {"body_timeout": -1}, {"max_handshakes": 0}):
        with pytest.raises(UsageError):
            ServerOptions(**bad)  # type: ignore[arg-type]
    assert parse_listen(":8080", any_host="0.0.0.0") == ("0.0.0.0", 8080)
    with pytest.raises(UsageError):
        parse_listen(":8080")


# --- what idle connections cost a mutual-TLS server in its own process ---------------------

SERVER_CHILD = """
import sys
from pathlib import Path
from appliance.peer.server import serve_store
server = serve_store(Path(sys.argv[1]), host="127.0.0.1", port=0, tls_dir=Path(sys.argv[2]),
                     insecure=False, host_name="rss")
print(server.url, flush=True)
server.serve_forever()
"""


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert found is not None
    return int(found.group(1))


def settled_rss(pid: int, seconds: float = 1.0) -> int:
    """VmRSS once it has stopped moving for ``seconds`` (at most 10 s of waiting)."""
    deadline = time.monotonic() + 10
    last, since = rss_kib(pid), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < seconds:
        time.sleep(0.1)
        now = rss_kib(pid)
        if abs(now - last) > last // 100:
            last, since = now, time.monotonic()
    return last


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")


def idle_connections_cost(store: Path, site: Path, tmp_path: Path, count: int,
                          first_bytes: bytes = b"") -> dict[str, int]:
    """Open ``count`` TCP connections to a mutual-TLS server in a child process that send
    ``first_bytes`` and then nothing, pull a model meanwhile, close them; RSS (KiB) and
    descriptors of the server along the way."""
    raise_fd_limit(count + 256)
    proc = subprocess.Popen([sys.executable, "-c", SERVER_CHILD, str(store), str(site / "a")],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("https://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        policy = connect_policy(site / "b", insecure=False)

        def pull_once(name: str) -> None:
            with client(url, policy) as c:
                [result] = pull(trusted_store(tmp_path / name), [c], ["tiny"], now=NOW)
            assert result.bytes_fetched == result.bytes_total

        pull_once("warm")  # imports, caches and TLS state a real pull brings
        idle = settled_rss(proc.pid)
        fds_idle = len(os.listdir(f"/proc/{proc.pid}/fd"))
        socks = []
        for i in range(count):
            # Several source addresses, as a real flood from many hosts would come.
            sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                            source_address=(f"127.0.1.{1 + i % 50}", 0))
            if first_bytes:
                sock.sendall(first_bytes)
            socks.append(sock)
        time.sleep(0.5)
        loaded = settled_rss(proc.pid, 0.5)
        fds_loaded = len(os.listdir(f"/proc/{proc.pid}/fd"))
        pull_once("meanwhile")
        for s in socks:
            s.close()
        after = settled_rss(proc.pid)
        return {"idle": idle, "loaded": loaded, "after": after, "fds_idle": fds_idle,
                "fds_loaded": fds_loaded}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("count", [500, pytest.param(2000, marks=pytest.mark.slow)])
def test_idle_connections_to_a_mutual_tls_server_cost_bounded_memory(
    store: Path, site: Path, tmp_path: Path, count: int,
) -> None:
    cost = idle_connections_cost(store, site, tmp_path, count)
    print(f"\n{count} idle connections: {cost}")
    assert cost["loaded"] < 2 * cost["idle"]
    assert cost["after"] <= 1.2 * cost["idle"]
    defaults = ServerOptions()
    assert cost["fds_loaded"] <= cost["fds_idle"] + defaults.max_pending


@pytest.mark.parametrize("count", [500, pytest.param(2000, marks=pytest.mark.slow)])
def test_connections_stalled_in_the_tls_handshake_cost_bounded_memory(
    store: Path, site: Path, tmp_path: Path, count: int,
) -> None:
    cost = idle_connections_cost(store, site, tmp_path, count, STALLED_HELLO)
    print(f"\n{count} stalled handshakes: {cost}")
    assert cost["loaded"] < 2 * cost["idle"]
    assert cost["after"] <= 1.2 * cost["idle"]
