"""Deterministic BitTorrent v2 torrents of a model, from the store or from bundle media.

``model_torrent(store_dir, ref, root_cert=...)`` hashes a published model's files with
libtorrent (BEP 52: a SHA-256 Merkle tree per file, v2 only, so no v1 SHA-1 pieces and no pad
files) and returns the ``.torrent`` bytes: the same model gives the same bytes (files sorted,
no creation date, no creator, no file times; the piece size is libtorrent's choice for the
total size, a pure function of it). The info dict carries the signed manifest, its signatures
and the trust chain (``meta``), and for an SSL torrent the site CA certificate (``root_cert``:
libtorrent's ``ssl-cert``), so only site members can join.

``media_torrent(store_dir, volume_dirs, ref, ...)`` makes the very same torrent from a bundle on
media before it is imported: the media is authenticated against the store's trust root, the
model's files are written, from chunks ``bundle.reader.read_chunk`` decompressed and checked
against the signed manifest, into a temporary directory under ``STORE/torrent-scratch`` (the
media's packs hold zstd frames, and libtorrent 2.1's Python bindings can only hash files:
``set_hash2`` is not exposed), hashed there while it is held (``scratch.held``: ``store gc``
leaves it alone), and removed. The chain carried is the one the
store will hold once the bundle is imported (its installed roots plus the newer roots the
media carries), so an import followed by ``model_torrent`` gives the same bytes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import libtorrent as lt

from appliance.bundle.reader import Media, check_pack_sizes, open_media, read_chunk
from appliance.errors import ModelNotFoundError, StoreError
from appliance.format.manifest import ModelEntry, parse_manifest
from appliance.format.trust import SignedRoot
from appliance.limits import DEFAULT_LIMITS, Limits
from appliance.store import layout, trust_state
from appliance.store.records import parse_ref
from appliance.store.store import Store
from appliance.torrent import meta
from appliance.torrent.scratch import SCRATCH_DIR, held

__all__ = ["SCRATCH_DIR", "build_torrent", "media_torrent", "model_torrent"]


def build_torrent(files_root: Path, model: ModelEntry, carried: dict[bytes, object], *,
                  root_cert: str | None, piece_size: int = 0) -> bytes:
    """The torrent of ``model`` whose files lie under ``files_root`` in ``meta``'s layout."""
    entries = [lt.create_file_entry(path, size) for path, size in meta.torrent_files(model)]
    try:
        creator = lt.create_torrent(entries, piece_size, lt.create_torrent.v2_only)
        if root_cert is not None:
            creator.set_root_cert(root_cert)
        lt.set_piece_hashes(creator, str(files_root))
        torrent = creator.generate()
    except RuntimeError as e:
        raise StoreError(f"cannot hash {model.name}:{model.version} under {files_root}: {e}") from e
    for volatile in (b"creation date", b"created by"):  # the same model, the same bytes
        torrent.pop(volatile, None)
    torrent[b"info"][meta.KEY] = carried
    return bytes(lt.bencode(torrent))


def _carried(model: ModelEntry, body: bytes, signature_lines: Sequence[str],
             chain: Sequence[SignedRoot]) -> dict[bytes, object]:
    return meta.encode(model.name, model.version, body,
                       [line.encode("ascii") for line in signature_lines],
                       [s.to_bytes() for s in chain])


def model_torrent(store_dir: Path, ref: str, *, root_cert: str | None) -> tuple[bytes, str]:
    """The torrent of published model ``ref`` (NAME or NAME:VERSION) and its name:version."""
    with Store(store_dir) as store:
        record = store.find_model(ref)
        if record.state != "published":
            raise ModelNotFoundError(f"{record.ref} is {record.state}, not published")
        signed = store.manifest(record.manifest_hash)
        if signed is None:
            raise StoreError(f"the store has no manifest {record.manifest_hash} for {record.ref}")
        body, signature_lines = signed
        model = _entry(parse_manifest(body).models, record.name, record.version)
        chain = trust_state.installed_chain(store_dir, store.conn)
    carried = _carried(model, body, signature_lines, chain)
    data = build_torrent(layout.models_dir(store_dir), model, carried, root_cert=root_cert)
    return data, record.ref


def media_torrent(store_dir: Path, volume_dirs: Sequence[Path], ref: str, *,
                  root_cert: str | None, now: datetime, scratch: Path | None = None,
                  limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, str]:
    """The torrent of model ``ref`` of the bundle on ``volume_dirs``, authenticated against
    this store's trust root: byte for byte what ``model_torrent`` gives once it is imported.

    Needs the volumes that hold the model's chunks (``MissingVolumeError`` otherwise) and the
    model's size free under ``scratch`` (default ``STORE/torrent-scratch``) while it hashes.
    """
    root = trust_state.require_root(store_dir)
    media = open_media(volume_dirs, limits)
    bundle = media.authenticate(root, now)
    model = _pick(bundle.manifest.models, ref)
    for volume in media.volumes:
        check_pack_sizes(volume)
    chain = trust_state.installed_chain(store_dir)
    chain += [s for s in bundle.chain if s.root.version > chain[-1].root.version]
    lines = [s.to_bytes().decode("ascii") for s in bundle.signatures]
    carried = _carried(model, bundle.manifest_bytes, lines, chain)
    base = scratch or store_dir / SCRATCH_DIR
    try:
        base.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="make-", dir=base))
    except OSError as e:
        raise layout.os_error(e, f"cannot create a directory under {base}") from e
    try:
        with held(work):  # store gc leaves it alone while it is hashed
            layout.check_free_space(work, sum(f.size for f in model.files),
                                    f"making the torrent of {model.name}:{model.version}")
            _write_plain_files(media, model, work)
            data = build_torrent(work, model, carried, root_cert=root_cert)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return data, f"{model.name}:{model.version}"


def _write_plain_files(media: Media, model: ModelEntry, work: Path) -> None:
    """The model's files under ``work`` in the torrent's layout, from checked media chunks."""
    for entry in model.files:
        target = work.joinpath(*meta.torrent_path(model, entry).split("/"))
        label = f"{model.name}:{model.version}/{entry.path}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise layout.os_error(e, f"cannot create {target}", needed=entry.size) from e
        try:
            for chunk in entry.chunks:
                data = read_chunk(media.locations(chunk.digest)[0], chunk, media.limits,
                                  file=label)
                view = memoryview(data)
                while view:
                    view = view[os.pwrite(fd, view, chunk.offset + len(data) - len(view)):]
            os.ftruncate(fd, entry.size)  # a file of no chunks (empty) still exists
        except OSError as e:
            raise layout.os_error(e, f"cannot write {target}", needed=entry.size) from e
        finally:
            os.close(fd)


def _pick(models: Sequence[ModelEntry], ref: str) -> ModelEntry:
    name, version = parse_ref(ref)
    found = [m for m in models if m.name == name and version in (None, m.version)]
    if len(found) != 1:
        held = ", ".join(f"{m.name}:{m.version}" for m in models)
        what = "no model" if not found else "several versions"
        raise ModelNotFoundError(f"the bundle holds {what} {ref!r} (it holds: {held})")
    return found[0]


def _entry(models: Sequence[ModelEntry], name: str, version: str) -> ModelEntry:
    for model in models:
        if model.name == name and model.version == version:
            return model
    raise StoreError(f"the stored manifest does not hold {name}:{version}")
