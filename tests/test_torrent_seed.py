"""A seed given static peers dials them (``Seeder`` with ``SwarmOptions.peers``): a host that
fetched a model and then seeds it reaches the hosts still fetching, which may have stopped
redialling its address while it was starting."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

from torrent_helpers import LOOPBACK, seeded_host, two_file_bundle

from appliance.torrent.seed import Seeder


def test_a_seed_dials_its_static_peers(tmp_path: Path) -> None:
    store = seeded_host(tmp_path / "seed", two_file_bundle())
    with socket.create_server(("127.0.0.1", 0)) as fetcher:
        fetcher.settimeout(10)
        options = replace(LOOPBACK, peers=(f"127.0.0.1:{fetcher.getsockname()[1]}",))
        with Seeder(store, options, identity=None) as seeder:
            seeder.add_published()
            conn, _ = fetcher.accept()  # TimeoutError (a failure) if it never dials
            with conn:
                conn.settimeout(10)
                assert conn.recv(68)  # a handshake (libtorrent may encrypt it: MSE)
