"""Where libtorrent reads and writes a model's files: links into the store, not a copy.

libtorrent maps a torrent's files (``<name>/<version>/<path>``) under a save path. Instead of a
scratch copy, ``link_tree`` makes that save path a tree of symbolic links to the store's own
files of the model: the staged file (``staging/<id>.part``, preallocated to its size by the
ingest session) while the model is imported, the published file once it is. A fetch then
has libtorrent write pieces straight into the staging layout (the model is on disk once, not
twice), and a seeder serves a model that is still importing from its staged files.

``held_pieces`` is what libtorrent may say it has: pieces every byte of which lies in chunks
the index marks done (checked against the signed BLAKE3 and fsynced before they were
marked) or in a published file. libtorrent gets them as ``have_pieces`` with
``no_verify_files``, so it neither re-hashes the staged files at start nor offers a byte the
store has not verified; a piece whose bytes are there but whose chunks are not marked yet
is simply fetched again.

``Guard`` covers the one hazard of writing into staging: libtorrent writes a piece's blocks
as they arrive and checks the piece after, so a peer sending bad data can overwrite, for a
moment, the part of a piece that belongs to a chunk already done (a piece shared by a done
chunk and a needed one). Before libtorrent may write such a piece the done chunk is copied,
checked, into ``<scratch>/guard/<digest>`` (fsynced), and written back over every place it
has once libtorrent is stopped: at the end of each run and, after a kill, at the start of
the next fetch, before anything else reads the staged files.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import libtorrent as lt

from appliance.chunks import check_chunk
from appliance.errors import IntegrityError, StoreError
from appliance.format.manifest import ModelEntry
from appliance.fsutil import fsync_dir
from appliance.store import layout
from appliance.store.catalog import StoreCatalog
from appliance.torrent import meta

GUARD_DIR = "guard"


@dataclass(frozen=True)
class StoredFile:
    """One file of the model as the store holds it now."""

    path: str  # in the manifest
    size: int
    location: Path  # the staged file, or the published one
    published: bool
    done: tuple[tuple[int, int], ...]  # (offset, length) of chunks marked done, by offset


def stored_files(catalog: StoreCatalog, name: str, version: str) -> dict[str, StoredFile]:
    """The model's files in the store by manifest path (empty when it holds none)."""
    out = {}
    for file_id, path, size, published, done in catalog.held_files(name, version):
        if published:
            location = layout.published_path(catalog.store_dir, name, version, path)
            spans: tuple[tuple[int, int], ...] = ((0, size),)
        else:
            location, spans = layout.staged_path(catalog.store_dir, file_id), tuple(done)
        out[path] = StoredFile(path, size, location, published, spans)
    return out


def link_tree(root: Path, model: ModelEntry, files: dict[str, StoredFile], *,
              missing_ok: bool = False) -> None:
    """``root/<name>/<version>/<path>`` -> the store's file, for every file of ``model``
    (``missing_ok``: a seeder leaves out files an import has not created yet; it holds no
    piece of them)."""
    for entry in model.files:
        stored = files.get(entry.path)
        if stored is None or not stored.location.exists():
            if missing_ok:
                continue
            raise StoreError(f"{model.name}:{model.version}/{entry.path} has no staged or "
                             "published file in the store yet")
        link = root.joinpath(*meta.torrent_path(model, entry).split("/"))
        try:
            link.parent.mkdir(parents=True, exist_ok=True)
            temporary = link.with_name(link.name + ".link")
            temporary.unlink(missing_ok=True)
            temporary.symlink_to(stored.location)
            os.replace(temporary, link)  # re-pointed in one step (a staged file published)
        except OSError as e:
            raise layout.os_error(e, f"cannot link {link} to {stored.location}") from e


def file_indexes(ti: lt.torrent_info) -> dict[str, int]:
    """The torrent's real files (no pad files): path -> file index."""
    files = ti.layout()
    return {files.file_path(i).replace("\\", "/"): i for i in range(files.num_files())
            if not files.file_flags(i) & lt.file_storage.flag_pad_file}


def held_pieces(ti: lt.torrent_info, model: ModelEntry,
                files: dict[str, StoredFile]) -> list[bool]:
    """Which pieces the store holds verified (``have_pieces`` for libtorrent)."""
    storage = ti.layout()
    piece_length = ti.piece_length()
    index = file_indexes(ti)
    have = [False] * ti.num_pieces()
    for entry in model.files:
        stored = files.get(entry.path)
        if stored is None or not entry.size:
            continue
        first = storage.file_offset(index[meta.torrent_path(model, entry)]) // piece_length
        covered = _Covered(stored.done)
        for k in range((entry.size + piece_length - 1) // piece_length):
            start = k * piece_length
            have[first + k] = covered.covers(start, min(start + piece_length, entry.size))
    return have


class _Covered:
    """Byte ranges (sorted, possibly touching) merged, for "is [lo, hi) all inside?"."""

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        for offset, length in ranges:
            if self.ends and offset <= self.ends[-1]:
                self.ends[-1] = max(self.ends[-1], offset + length)
            else:
                self.starts.append(offset)
                self.ends.append(offset + length)

    def covers(self, lo: int, hi: int) -> bool:
        i = bisect.bisect_right(self.starts, lo) - 1
        return i >= 0 and self.ends[i] >= hi


@dataclass(frozen=True)
class Place:
    """Where a chunk of the model lies: in the torrent's piece space and in the store."""

    digest: str
    length: int
    start: int  # byte offset in the torrent's piece space
    location: Path
    offset: int  # in the store's file


def places(ti: lt.torrent_info, model: ModelEntry,
           files: dict[str, StoredFile]) -> dict[str, list[Place]]:
    """Every place of every chunk in the model's staged files (published ones are never
    written), by digest."""
    storage = ti.layout()
    index = file_indexes(ti)
    out: dict[str, list[Place]] = {}
    for entry in model.files:
        stored = files.get(entry.path)
        if stored is None or stored.published:
            continue
        base = storage.file_offset(index[meta.torrent_path(model, entry)])
        for chunk in entry.chunks:
            out.setdefault(chunk.digest, []).append(
                Place(chunk.digest, chunk.length, base + chunk.offset, stored.location,
                      chunk.offset))
    return out


def overlaps(place: Place, pieces: list[int], piece_length: int) -> bool:
    """Does any of ``pieces`` (sorted) cover a byte of ``place``?"""
    first = place.start // piece_length
    last = (place.start + max(place.length, 1) - 1) // piece_length
    i = bisect.bisect_left(pieces, first)
    return i < len(pieces) and pieces[i] <= last


class Guard:
    """Checked copies of done chunks that libtorrent may overwrite with unverified bytes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def saved(self) -> list[str]:
        try:
            return sorted(p.name for p in self.directory.iterdir() if len(p.name) == 64)
        except FileNotFoundError:
            return []

    def save(self, digest: str, data: bytes) -> None:
        """Keep ``data`` (already checked against ``digest``) durably."""
        if (self.directory / digest).exists():
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            temporary = self.directory / f"{digest}.tmp"
            with open(temporary, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.directory / digest)
            fsync_dir(self.directory)
        except OSError as e:
            raise layout.os_error(e, f"cannot keep a copy of chunk {digest} in "
                                  f"{self.directory}", needed=len(data)) from e

    def restore(self, where: dict[str, list[Place]]) -> int:
        """Write every kept chunk back over each of its places, fsync, and drop the copies;
        the number of chunks written back."""
        restored = 0
        for digest in self.saved():
            path = self.directory / digest
            targets = where.get(digest, [])
            try:
                data = path.read_bytes()
            except OSError as e:
                raise layout.os_error(e, f"cannot read {path}") from e
            if targets:
                try:
                    check_chunk(data, digest, targets[0].length, file=str(path))
                except IntegrityError as e:
                    raise StoreError(f"the kept copy {path} is damaged ({e}); run 'appliance "
                                     "store verify' before fetching again") from e
                for place in targets:
                    _pwrite_durable(place.location, place.offset, data)
                restored += 1
            path.unlink()
        return restored


def _pwrite_durable(location: Path, offset: int, data: bytes) -> None:
    try:
        fd = os.open(location, os.O_WRONLY)
    except FileNotFoundError:
        return  # published meanwhile: every chunk of it was verified before the rename
    except OSError as e:
        raise layout.os_error(e, f"cannot open {location}") from e
    try:
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.pwrite(fd, view[written:], offset + written)
        os.fdatasync(fd)
    except OSError as e:
        raise layout.os_error(e, f"cannot write {location}", needed=len(data)) from e
    finally:
        os.close(fd)
