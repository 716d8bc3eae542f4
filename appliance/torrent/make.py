"""Deterministic BitTorrent v2 torrents of the store's published models.

``make_torrent(store_dir, ref, root_cert=...)`` hashes the model's published files with
libtorrent (BEP 52: a SHA-256 Merkle tree per file, v2 only, so no v1 SHA-1 pieces and no pad
files) and returns the ``.torrent`` bytes: the same model in the same store gives the same bytes
(files sorted, no creation date, no creator, no file times; the piece size is libtorrent's
choice for the total size, a pure function of it). The info dict carries the signed manifest,
its signatures and the installed trust chain (``meta``), and for an SSL torrent the site CA
certificate (``root_cert``: libtorrent's ``ssl-cert``), so only site members can join.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import libtorrent as lt

from appliance.errors import ModelNotFoundError, StoreError
from appliance.format.manifest import ModelEntry, parse_manifest
from appliance.store import layout, trust_state
from appliance.store.store import Store
from appliance.torrent import meta


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
        chain = [s.to_bytes() for s in trust_state.installed_chain(store_dir, store.conn)]
    carried = meta.encode(model.name, model.version, body,
                          [line.encode("ascii") for line in signature_lines], chain)
    data = build_torrent(layout.models_dir(store_dir), model, carried, root_cert=root_cert)
    return data, record.ref


def _entry(models: Sequence[ModelEntry], name: str, version: str) -> ModelEntry:
    for model in models:
        if model.name == name and model.version == version:
            return model
    raise StoreError(f"the stored manifest does not hold {name}:{version}")
