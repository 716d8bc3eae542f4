"""Helpers for the torrent tests: a site's stores, a seeder on loopback, a fetch to it.

Hosts are real stores with the site's trust root (``new_host``), seeded the way an
import does (``peer_helpers.seed``); swarms are real libtorrent sessions on 127.0.0.1 with LSD
and DHT off (a test contacts no other address), peers given as a static list.
"""

from __future__ import annotations

from pathlib import Path

from peer_helpers import Bundle, make_bundle, model_bytes, seed
from trust_helpers import NOW, make_root

from appliance.peer import tls
from appliance.store import trust_state
from appliance.torrent.certs import TorrentIdentity, enroll_torrent, load_torrent_identity
from appliance.torrent.fetch import FetchOptions, FetchResult, fetch
from appliance.torrent.seed import Seeder
from appliance.torrent.session import SwarmOptions

LOOPBACK = SwarmOptions(listen="127.0.0.1:0", lsd=False, dht=False)
MODEL = "org/tiny"


def tiny_bundle(size: int = 300_000, *, seed_value: int = 1) -> Bundle:
    """One model, two files (one spans several pieces and chunks, one is small)."""
    return make_bundle({MODEL: {"weights.bin": model_bytes(seed_value, size),
                                "notes/readme.txt": b"tiny model for torrent tests\n" * 40}})


def new_host(store_dir: Path) -> Path:
    """A store trusting the site's root (``make_root()``), installed at ``NOW``."""
    signed = make_root()
    trust_state.install_first_root(store_dir, signed.to_bytes(), signed.root.fingerprint, NOW)
    return store_dir


def seeded_host(base: Path, bundle: Bundle) -> Path:
    store = new_host(base)
    seed(store, bundle)
    return store


def member(base: Path, ca_dir: Path, host: str) -> TorrentIdentity:
    tls_dir = base / f"tls-{host}"
    tls.enroll_host(host, ca_dir, tls_dir)
    enroll_torrent(ca_dir, tls_dir)
    return load_torrent_identity(tls_dir)


def fetch_from(store: Path, torrent: bytes | str, seeders: list[Seeder], *,
               identity: TorrentIdentity | None = None, wait: float = 8.0,
               **swarm: object) -> FetchResult:
    peers = tuple(f"127.0.0.1:{s.port}" for s in seeders)
    options = FetchOptions(swarm=SwarmOptions(listen="127.0.0.1:0", lsd=False, peers=peers,
                                              **swarm),  # type: ignore[arg-type]
                           identity=identity, wait_for_pieces=wait, metadata_timeout=wait,
                           flush_bytes=1)
    return fetch(store, torrent, options=options, now=NOW)
