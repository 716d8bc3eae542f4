"""Helpers for the torrent tests: a site's stores, a seeder on loopback, a fetch to it.

Hosts are real stores with the site's trust root (``trusted_store``), seeded the way an
import does (``peer_helpers.seed``); swarms are real libtorrent sessions on 127.0.0.1 with LSD
and DHT off (a test contacts no other address), peers given as a static list.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

import libtorrent as lt
from bundle_helpers import Bundle, make_bundle, model_bytes
from peer_helpers import seed
from trust_helpers import DAY, NOW, trusted_store

from appliance.peer import tls
from appliance.store.store import Store
from appliance.torrent.certs import TorrentIdentity, enroll_torrent, load_torrent_identity
from appliance.torrent.fetch import FetchOptions, FetchResult, fetch
from appliance.torrent.session import SwarmOptions

LOOPBACK = SwarmOptions(listen="127.0.0.1:0", lsd=False, dht=False)
MODEL = "org/tiny"


def two_file_bundle(size: int = 300_000, *, seed_value: int = 1, now: datetime = NOW) -> Bundle:
    """One model, two files (one spans several pieces and chunks, one is small), signed at
    ``now`` (the CLI's real clock when a test runs the CLI)."""
    return make_bundle({MODEL: {"weights.bin": model_bytes(seed_value, size),
                                "notes/readme.txt": b"tiny model for torrent tests\n" * 40}},
                       created=now - DAY, expires=now + 30 * DAY)


def seeded_host(base: Path, bundle: Bundle) -> Path:
    store = trusted_store(base)
    seed(store, bundle)
    return store


def member(base: Path, ca_dir: Path, host: str) -> TorrentIdentity:
    tls_dir = base / f"tls-{host}"
    tls.enroll_host(host, ca_dir, tls_dir)
    enroll_torrent(ca_dir, tls_dir)
    return load_torrent_identity(tls_dir)


class HasPort(Protocol):
    @property
    def port(self) -> int: ...


def fetch_from(store: Path, torrent: bytes | str, seeders: Sequence[HasPort], *,
               identity: TorrentIdentity | None = None, wait: float = 8.0,
               now: datetime = NOW, notes: list[str] | None = None,
               **swarm: object) -> FetchResult:
    peers = tuple(f"127.0.0.1:{s.port}" for s in seeders)
    options = FetchOptions(swarm=SwarmOptions(listen="127.0.0.1:0", lsd=False, peers=peers,
                                              **swarm),  # type: ignore[arg-type]
                           identity=identity, wait_for_pieces=wait, metadata_timeout=wait,
                           flush_bytes=1)
    return fetch(store, torrent, options=options, now=now,
                 notify=None if notes is None else notes.append)


def held(store: Path) -> int:
    """Chunks the store holds verified and durable (a running fetch's progress too)."""
    with Store(store) as opened:
        return len(opened.held_digests())


class LyingPeer:
    """A BitTorrent peer that claims every piece and answers each request with garbage.

    Just enough of BEP 3/52 on a raw socket: the handshake (v2-capable, the truncated v2
    infohash), a full bitfield, unchoke, and a ``piece`` message of flipped bytes for every
    ``request``. libtorrent must fail those pieces' hash checks and ban it.
    """

    def __init__(self, ti: lt.torrent_info) -> None:
        self.ti = ti
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.blocks_sent = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            part = conn.recv(n - len(data))
            if not part:
                raise ConnectionError("closed")
            data += part
        return data

    def _serve(self, conn: socket.socket) -> None:
        info_hash = bytes.fromhex(str(self.ti.info_hashes().get_best()))
        reserved = bytearray(8)
        reserved[7] |= 0x10  # BEP 52: this peer speaks v2
        try:
            with conn:
                conn.settimeout(10)
                if self._read(conn, 1) != b"\x13":
                    return  # an encrypted (MSE) handshake: libtorrent retries in plaintext
                self._read(conn, 67)
                conn.sendall(b"\x13BitTorrent protocol" + bytes(reserved) + info_hash
                             + b"-LY0001-" + os.urandom(12))
                pieces = self.ti.num_pieces()
                bits = bytearray((pieces + 7) // 8)
                for i in range(pieces):
                    bits[i // 8] |= 0x80 >> (i % 8)
                conn.sendall(struct.pack(">IB", 1 + len(bits), 5) + bytes(bits))
                conn.sendall(struct.pack(">IB", 1, 1))  # unchoke
                while not self._stop.is_set():
                    (length,) = struct.unpack(">I", self._read(conn, 4))
                    if length == 0:
                        continue  # keep-alive
                    body = self._read(conn, length)
                    if body[0] == 6:  # request: index, begin, length
                        index, begin, size = struct.unpack(">III", body[1:13])
                        garbage = bytes(b ^ 0x5A for b in os.urandom(size))
                        conn.sendall(struct.pack(">IBII", 9 + size, 7, index, begin) + garbage)
                        self.blocks_sent += 1
        except (OSError, ConnectionError, struct.error):
            return

    def close(self) -> None:
        self._stop.set()
        self.listener.close()

    def __enter__(self) -> LyingPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
