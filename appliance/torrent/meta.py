"""What a model's torrent carries besides the bytes, and the match of its files to the manifest.

The info dict of every torrent ``appliance torrent make`` writes holds one extra key,
``appliance``: a bencoded dict ``{format, name, version, manifest, signatures, chain}`` with the
signed manifest's exact bytes, its detached signature lines, and the publisher's trust chain
(signed root files). It sits in the info dict, not beside it, so a magnet link brings it too
(peers send the info dict by ut_metadata) and the infohash commits to it; trust still comes only
from our signatures, checked by this host against its own root.

The torrent's files are the model's files exactly: ``<name>/<version>/<path>`` (the store's
layout under ``models/``, so a seeder points libtorrent at ``STORE/models``) with the signed
sizes, sorted. Anything else is refused before any file byte is requested. Pure: bytes in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libtorrent as lt

from appliance.errors import FormatError, IntegrityError, LimitExceededError
from appliance.format.manifest import FileEntry, ModelEntry
from appliance.format.signing import Signature
from appliance.format.trust import SignedRoot, parse_signed_root
from appliance.limits import DEFAULT_LIMITS, Limits
from appliance.store import layout

KEY = b"appliance"
FORMAT = 1
MAX_CHAIN = 64  # trust roots carried; a real chain has a handful
_FIELDS = {b"format", b"name", b"version", b"manifest", b"signatures", b"chain"}


@dataclass(frozen=True)
class Carried:
    """The signed material a torrent carries (not yet authenticated)."""

    name: str
    version: str
    manifest: bytes
    signatures: tuple[Signature, ...]
    chain: tuple[SignedRoot, ...]


def torrent_path(model: ModelEntry, entry: FileEntry) -> str:
    """Where a model file sits in its torrent: ``<name>/<version>/<path>``, the store's layout
    under ``models/`` (the same checks and "/" -> "~" as ``store.layout``)."""
    base = layout.model_dir(Path(), model.name, model.version).relative_to(layout.MODELS_DIR)
    return "/".join((*base.parts, *layout.relative_parts(entry.path)))


def torrent_files(model: ModelEntry) -> list[tuple[str, int]]:
    """The torrent's file list for ``model``: store-layout paths and signed sizes, sorted."""
    return sorted((torrent_path(model, f), f.size) for f in model.files)


def encode(name: str, version: str, manifest: bytes, signature_lines: Sequence[bytes],
           chain: Sequence[bytes]) -> dict[bytes, Any]:
    return {
        b"format": FORMAT,
        b"name": name.encode(),
        b"version": version.encode(),
        b"manifest": manifest,
        b"signatures": [line.strip() for line in signature_lines],
        b"chain": list(chain),
    }


def _bytes(value: object, what: str, cap: int) -> bytes:
    if not isinstance(value, bytes):
        raise FormatError(f"torrent: {what} is not a byte string")
    if len(value) > cap:
        raise LimitExceededError(f"torrent: {what} is {len(value)} bytes, over the cap of {cap}")
    return value


def _text(value: object, what: str) -> str:
    try:
        return _bytes(value, what, 1024).decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"torrent: {what} is not UTF-8") from e


def _list(value: object, what: str, cap: int) -> list[object]:
    if not isinstance(value, list):
        raise FormatError(f"torrent: {what} is not a list")
    if len(value) > cap:
        raise LimitExceededError(f"torrent: {len(value)} {what}, over the cap of {cap}")
    return value


def decode(info_section: bytes, limits: Limits = DEFAULT_LIMITS) -> Carried:
    """The ``appliance`` key of a torrent's info dict (FormatError when absent or malformed)."""
    info: Any = lt.bdecode(info_section)
    if not isinstance(info, dict):
        raise FormatError("torrent: the info dict does not decode")
    value: Any = info.get(KEY)
    if not isinstance(value, dict):
        raise FormatError("torrent carries no signed manifest (not made by 'appliance torrent "
                          "make'); refusing it")
    unknown = set(value) - _FIELDS
    missing = _FIELDS - set(value)
    if unknown or missing:
        raise FormatError(f"torrent: signed-manifest record has unknown {sorted(unknown)} or "
                          f"missing {sorted(missing)} fields")
    if value[b"format"] != FORMAT:
        raise FormatError(f"torrent: signed-manifest record format {value[b'format']!r}, "
                          f"want {FORMAT}")
    signatures = []
    for line in _list(value[b"signatures"], "signatures", limits.max_signatures):
        sig = Signature.from_bytes(_bytes(line, "signature", limits.max_signature_bytes), limits)
        if sig not in signatures:
            signatures.append(sig)
    chain = tuple(parse_signed_root(_bytes(raw, "trust root", limits.max_trust_root_bytes),
                                    limits)
                  for raw in _list(value[b"chain"], "trust roots", MAX_CHAIN))
    return Carried(
        name=_text(value[b"name"], "model name"),
        version=_text(value[b"version"], "model version"),
        manifest=_bytes(value[b"manifest"], "manifest", limits.max_manifest_bytes),
        signatures=tuple(signatures),
        chain=chain,
    )


def listed_files(ti: lt.torrent_info) -> list[tuple[str, int]]:
    """The torrent's real files (pad files left out), with sizes, sorted."""
    files = ti.layout()
    out = []
    for i in range(files.num_files()):
        if files.file_flags(i) & lt.file_storage.flag_pad_file:
            continue
        out.append((files.file_path(i).replace("\\", "/"), files.file_size(i)))
    return sorted(out)


def check_files(ti: lt.torrent_info, model: ModelEntry) -> None:
    """The torrent lists exactly the model's signed files and sizes (IntegrityError if not)."""
    want = torrent_files(model)
    have = listed_files(ti)
    if have == want:
        return
    extra = sorted(set(have) - set(want))
    lacking = sorted(set(want) - set(have))
    raise IntegrityError(
        f"the torrent's files do not match signed model {model.name}:{model.version}: "
        f"not in the manifest {extra[:5]}, missing or other size {lacking[:5]}"
    )


def find_model(models: Sequence[ModelEntry], carried: Carried) -> ModelEntry:
    for model in models:
        if model.name == carried.name and model.version == carried.version:
            return model
    raise IntegrityError(f"the torrent names model {carried.name}:{carried.version}, which "
                         "its signed manifest does not hold")


def infohash(ti: lt.torrent_info) -> str:
    """The v2 (SHA-256) infohash in hex; v1 only for a torrent that has no v2 one."""
    hashes = ti.info_hashes()
    return str(hashes.v2) if hashes.has_v2() else str(hashes.v1)
