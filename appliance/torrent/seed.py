"""``appliance torrent seed``: the store's published models to the swarm, read-only.

Each published model's torrent is made from its published files (``make``: the same bytes a
``torrent make`` on this store writes, hence the same infohash) and added with libtorrent's
``save_path`` at ``STORE/models``: the torrent's ``<name>/<version>/<path>`` is exactly the
published file. Torrents are added in seed mode (libtorrent trusts the files, and checks each
piece against the torrent's Merkle tree the first time a peer asks for it) and upload mode
(it never downloads, so it never writes into a published file, even when a piece fails that
check: the store's ``verify`` is what repairs a store). Models still importing are seeded from
their staged files by ``partial.StagedSeeds``, given their torrent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import libtorrent as lt

from appliance.errors import StoreError
from appliance.store import layout
from appliance.store.records import list_models
from appliance.torrent import make, meta
from appliance.torrent.certs import TorrentIdentity
from appliance.torrent.session import (
    SwarmOptions,
    add_flags,
    connect_peers,
    open_session,
    port,
    present_certificate,
)

Notify = Callable[[str], None]


@dataclass(frozen=True)
class Seeded:
    model: str  # name:version
    infohash: str
    torrent: bytes  # the .torrent a fetcher needs (or its infohash, as a magnet)

    @property
    def magnet(self) -> str:
        return f"magnet:?xt=urn:btmh:1220{self.infohash}"


class Seeder:
    """One libtorrent session seeding published models of ``store_dir``."""

    def __init__(self, store_dir: Path, options: SwarmOptions, *,
                 identity: TorrentIdentity | None, notify: Notify | None = None) -> None:
        self.store_dir = store_dir
        self.identity = identity
        self.say = notify or (lambda _message: None)
        self.session = open_session(options, secure=identity is not None)
        self.peers = options.peers
        self.seeded: list[Seeded] = []

    @property
    def port(self) -> int:
        return port(self.session, secure=self.identity is not None)

    def add_published(self, refs: Sequence[str] = ()) -> list[Seeded]:
        """Seed ``refs`` (NAME or NAME:VERSION), or every published model."""
        wanted = list(refs) or [m.ref for m in list_models(self.store_dir)
                                if m.state == "published"]
        root_cert = self.identity.ca_pem if self.identity else None
        added = []
        for ref in wanted:
            data, name = make.model_torrent(self.store_dir, ref, root_cert=root_cert)
            added.append(self.add(data, name, layout.models_dir(self.store_dir)))
        return added

    def add(self, data: bytes, model: str, save_path: Path) -> Seeded:
        """Seed torrent ``data`` from files laid out under ``save_path`` (tests, benchmarks)."""
        ti = lt.torrent_info(data)
        params = lt.add_torrent_params()
        params.ti = ti
        params.save_path = str(save_path)
        params.flags |= add_flags("seed_mode", "upload_mode")
        params.flags &= ~add_flags("auto_managed", "paused")
        handle = self.session.add_torrent(params)
        if self.identity is not None:
            present_certificate(handle, self.identity)
        # A host that fetched and now seeds knows the others still fetching: it goes to them
        # (they may have given up reconnecting to the address while it was starting).
        connect_peers(handle, self.peers)
        seeded = Seeded(model, meta.infohash(ti), data)
        self.seeded.append(seeded)
        return seeded

    def poll(self, timeout_ms: int = 1000) -> None:
        """Wait for libtorrent's news and report the errors (a published file gone)."""
        self.session.wait_for_alert(timeout_ms)
        for alert in self.session.pop_alerts():
            if isinstance(alert, lt.file_error_alert | lt.torrent_error_alert):
                self.say(f"seeding error: {alert.message()}")
            elif isinstance(alert, lt.hash_failed_alert):
                self.say(f"a published file failed libtorrent's check at piece "
                         f"{alert.piece_index}: run 'appliance store verify'")

    def set_upload_rate(self, bytes_per_second: int) -> None:
        self.session.apply_settings({"upload_rate_limit": bytes_per_second})

    def close(self) -> None:
        try:
            self.session.pause()
        except RuntimeError as e:
            raise StoreError(f"stopping libtorrent: {e}") from e

    def __enter__(self) -> Seeder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
