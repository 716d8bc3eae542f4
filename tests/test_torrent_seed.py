"""A seed given static peers dials them (``Seeder`` with ``SwarmOptions.peers``): a host that
fetched a model and then seeds it reaches the hosts still fetching, which may have stopped
redialling its address while it was starting."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

from torrent_helpers import LOOPBACK, seeded_host, two_file_bundle

from appliance.torrent.seed import Seeder
from appliance.torrent.session import open_session


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


def test_sessions_ask_block_by_block_rarest_first() -> None:
    """The picker settings the fan-out bench measured (docs/TORRENT.md): no reserved runs of
    whole pieces (whole_pieces_threshold 0), no 4 MiB extents, a short request queue. With
    libtorrent's defaults the seed sent 1.33-1.40x the model at N = 8, 1.18-1.19x without."""
    session = open_session(LOOPBACK, secure=False)
    try:
        settings = session.get_settings()
        assert settings["whole_pieces_threshold"] == 0
        assert settings["piece_extent_affinity"] is False
        assert (settings["request_queue_time"], settings["max_out_request_queue"]) == (1, 32)
    finally:
        session.pause()
