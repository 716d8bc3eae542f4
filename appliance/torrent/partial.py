"""Seeding a model this store is still importing: the verified pieces of its staged files.

``torrent seed --torrent FILE`` gives the torrent of a model (``torrent make`` on another
host, or ``torrent make --media`` on this one before the import): a torrent needs every
piece hash, which a host with half a model cannot compute, so it is given, not made. It is
accepted only when it carries exactly the manifest this store recorded for the model, lists
exactly its signed files (``meta.check_files``) and, as for a fetch, is an SSL torrent of this
site's CA (or plaintext with ``--insecure``). A published model is then seeded as
``Seeder.add_published`` does; a model still importing (a media import, a peer pull or a
torrent fetch in progress, or stopped) is added with libtorrent's save path at a tree of
links to its staged files (``storage.link_tree``, under ``STORE/torrent-scratch/seed-<ih>``,
held while it is seeded: ``scratch.held``, so ``store gc`` leaves it alone)
and ``have_pieces`` = the pieces every byte of which is in chunks the index marks done
(``storage.held_pieces``): nothing is re-hashed at start, and no byte the store has not
verified is offered. Upload mode, as for published models: libtorrent never writes.

libtorrent has no call to say "you have this piece now" without writing it, so ``refresh``
(called every poll of the seeding loop) asks the index, at most every ``refresh_s``, whether
anything was committed since its last look (``StoreCatalog.data_version``: SQLite's
``PRAGMA data_version`` on the seeder's own connection, one call that reads no table); only
then does it re-read the staged files' done chunks and, when more pieces are held, add the
torrent again with the new set, at most every ``reoffer_s`` (default 5 looks: connected peers
reconnect, so an import verifying chunks all the time does not drop them every second); a
model published
meanwhile is moved to its published files at once.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import libtorrent as lt

from appliance.errors import IntegrityError, StoreError
from appliance.format.manifest import ModelEntry, parse_manifest
from appliance.store import layout
from appliance.store.catalog import StoreCatalog
from appliance.store.records import find_model
from appliance.store.store import Store
from appliance.torrent import meta, storage
from appliance.torrent.fetch import check_membership, parse_torrent
from appliance.torrent.scratch import held, scratch_root
from appliance.torrent.seed import Seeded, Seeder
from appliance.torrent.session import add_flags, connect_peers, present_certificate

REFRESH_S = 1.0  # how often the index is asked whether anything changed (one pragma)
REOFFER_LOOKS = 5  # re-add one torrent at most every this many looks (its peers reconnect)


@dataclass
class _Staged:
    seeded: Seeded
    ti: lt.torrent_info
    model: ModelEntry
    handle: lt.torrent_handle
    held: int  # pieces offered
    added: float  # time.monotonic() of the last add


class StagedSeeds:
    """Torrents given for models of ``seeder``'s store, published or still importing."""

    def __init__(self, seeder: Seeder, *, refresh_s: float = REFRESH_S,
                 reoffer_s: float | None = None) -> None:
        self.seeder = seeder
        self.refresh_s = refresh_s
        self.reoffer_s = REOFFER_LOOKS * refresh_s if reoffer_s is None else reoffer_s
        self.staged: list[_Staged] = []
        self.reads = 0  # looks at the staged files' chunks (tests: none when nothing changed)
        self._due = time.monotonic() + refresh_s
        self._catalog: StoreCatalog | None = None
        self._version: int | None = None
        self._holds = contextlib.ExitStack()

    @property
    def store_dir(self) -> Path:
        return self.seeder.store_dir

    def add(self, data: bytes) -> Seeded:
        """Seed torrent ``data``; ``IntegrityError`` when it is not this store's model."""
        ti = parse_torrent(data)
        check_membership(ti, self.seeder.identity)
        for already in self.seeder.seeded:
            if already.infohash == meta.infohash(ti):
                return already
        carried = meta.decode(ti.info_section())
        ref = f"{carried.name}:{carried.version}"
        with Store(self.store_dir) as store:
            record = find_model(self.store_dir, ref, include_importing=True, conn=store.conn)
            signed = store.manifest(record.manifest_hash)
            if signed is None:
                raise StoreError(f"the store has no manifest {record.manifest_hash} for {ref}")
            if signed[0] != carried.manifest:
                raise IntegrityError(f"the torrent carries another manifest than the one this "
                                     f"store holds {ref} from")
            model = meta.find_model(parse_manifest(signed[0]).models, carried)
            meta.check_files(ti, model)
            if record.state == "published":
                return self.seeder.add(data, ref, layout.models_dir(self.store_dir))
        seeded = Seeded(ref, meta.infohash(ti), data)
        catalog = self._open()
        if not self.staged:  # the first: the index as read below (else the next look reads)
            self._version = catalog.data_version()
        self._holds.enter_context(held(self._links(seeded.infohash)))
        handle, offered = self._add(ti, model, storage.stored_files(
            catalog, model.name, model.version))
        self.staged.append(_Staged(seeded, ti, model, handle, offered, time.monotonic()))
        self.seeder.seeded.append(seeded)
        return seeded

    def _open(self) -> StoreCatalog:
        if self._catalog is None:
            self._catalog = StoreCatalog(self.store_dir)
        return self._catalog

    def close(self) -> None:
        """Let go of the index and of the link trees (``store gc`` may remove them now)."""
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None
        self._holds.close()

    def _links(self, infohash: str) -> Path:
        return scratch_root(self.store_dir) / f"seed-{infohash}"

    def _add(self, ti: lt.torrent_info, model: ModelEntry,
             files: dict[str, storage.StoredFile]) -> tuple[lt.torrent_handle, int]:
        save_path = self._links(meta.infohash(ti))
        storage.link_tree(save_path, model, files, missing_ok=True)
        have = storage.held_pieces(ti, model, files)
        params = lt.add_torrent_params()
        params.ti = ti
        params.save_path = str(save_path)
        params.have_pieces = have
        params.flags |= add_flags("upload_mode", "no_verify_files")
        params.flags &= ~add_flags("auto_managed", "paused", "seed_mode")
        handle = self.seeder.session.add_torrent(params)
        if self.seeder.identity is not None:
            present_certificate(handle, self.seeder.identity)
        connect_peers(handle, self.seeder.peers)  # as Seeder.add does: fetchers it knows of
        return handle, sum(have)

    def refresh(self, *, force: bool = False) -> None:
        """Offer the pieces verified since the last look: at most every ``refresh_s``, and
        reading the staged files' chunks only when the index changed (or ``force``)."""
        now = time.monotonic()
        if not self.staged or (not force and now < self._due):
            return
        self._due = now + self.refresh_s
        catalog = self._open()
        version = catalog.data_version()
        if not force and version == self._version:
            return  # nothing committed since the last look: nothing new to offer
        self._version = version
        for entry in list(self.staged):
            model = entry.model
            files = storage.stored_files(catalog, model.name, model.version)
            self.reads += 1
            published = len(files) == len(model.files) and all(
                f.published for f in files.values())
            if published:  # imported meanwhile: its staged files were renamed into place
                self.seeder.session.remove_torrent(entry.handle)
                self.staged.remove(entry)
                self.seeder.seeded.remove(entry.seeded)
                self.seeder.add(entry.seeded.torrent, entry.seeded.model,
                                layout.models_dir(self.store_dir))
                shutil.rmtree(self._links(entry.seeded.infohash), ignore_errors=True)
                continue
            held_now = sum(storage.held_pieces(entry.ti, model, files))
            if held_now <= entry.held:
                continue
            if not force and now - entry.added < self.reoffer_s:
                self._version = None  # look again next time: this growth is not offered yet
                continue
            self.seeder.session.remove_torrent(entry.handle)
            entry.handle, entry.held = self._add(entry.ti, model, files)
            entry.added = time.monotonic()
