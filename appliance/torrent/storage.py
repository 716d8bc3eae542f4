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
checked, into ``<scratch>/guard/<digest>`` (fsynced) and its places there are marked NOT done
in the index (``Store.mark_staged_chunks``): while libtorrent may write them the store does not
claim them, so a peer server on this host does not offer them and, if the fetch is killed,
whatever finishes the model (another fetch, an import, a peer pull) takes them again. Once
libtorrent is stopped the copy is written back over every place of the chunk, fsynced, the
places are marked done again and the copy removed: at the end of each run and, after a kill,
at the start of the next fetch of that torrent. A copy a killed fetch left is only a saving
(no re-fetch); ``store gc`` removes those no running fetch holds.
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
from appliance.store.store import Store
from appliance.torrent import meta
from appliance.torrent.scratch import GUARD_DIR

__all__ = ["GUARD_DIR", "Guard", "Place", "StoredFile", "held_pieces", "link_tree", "places",
           "stored_files"]


@dataclass(frozen=True)
class StoredFile:
    """One file of the model as the store holds it now."""

    file_id: int
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
        out[path] = StoredFile(file_id, path, size, location, published, spans)
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
    file_id: int
    idx: int  # the chunk's index in its file

    @property
    def key(self) -> tuple[int, int]:
        """(file id, idx): the chunk's row in the index."""
        return self.file_id, self.idx


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
        for idx, chunk in enumerate(entry.chunks):
            out.setdefault(chunk.digest, []).append(
                Place(chunk.digest, chunk.length, base + chunk.offset, stored.location,
                      chunk.offset, stored.file_id, idx))
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

    def restore(self, where: dict[str, list[Place]], store: Store, *,
                unmarked: set[tuple[int, int]] | None = None) -> int:
        """Write every kept chunk back over each of its places, fsync, mark done again the
        places ``unmarked`` for it (every place of it: a copy a killed fetch left), and drop
        the copies; the number of chunks written back."""
        restored = 0
        marks: list[tuple[int, int]] = []
        spoilt: list[tuple[int, int]] = []
        saved = self.saved()
        for digest in saved:
            targets = where.get(digest, [])
            if not targets:
                continue  # no staged place left (published meanwhile): nothing to put back
            path = self.directory / digest
            try:
                data = path.read_bytes()
                check_chunk(data, digest, targets[0].length, file=str(path))
            except OSError as e:
                raise layout.os_error(e, f"cannot read {path}") from e
            except IntegrityError:
                # The copy itself went bad: its places are taken again, not trusted.
                spoilt += [p.key for p in targets]
                continue
            for place in targets:
                _pwrite_durable(place.location, place.offset, data)
            marks += [p.key for p in targets if unmarked is None or p.key in unmarked]
            restored += 1
        if spoilt:
            store.mark_staged_chunks(spoilt, done=False)
        if marks:  # written back and fsynced: the signed bytes are there again
            store.mark_staged_chunks(marks, done=True)
        for digest in saved:
            (self.directory / digest).unlink(missing_ok=True)
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
