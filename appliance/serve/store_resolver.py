"""The ``ModelResolver`` the CLI serves with: only published, verified store models load.

``store.records.get_model`` already refuses a model that is still importing, quarantined,
or whose files changed size. On top of that, before every load:

- ``quick`` (default): every chunk of the GGUF header (metadata, architecture, chat template,
  tensor table: what makes the model *this* model, up to where tensor data starts) is
  re-hashed against its digest in the signed manifest, and the file must carry the whole-file
  BLAKE3 identity recorded at publish. Milliseconds (about 0.1 s for a 262k-token vocabulary).
  Where the header ends is read from the file itself; that is sound because the walk is
  sequential: a changed byte before the true end is read by the walk, so it lies inside the
  range checked. A header that no longer parses gets the full check, which names the chunk.
- ``full``: every chunk of every file of the model is re-hashed against the signed manifest
  and each file's whole BLAKE3 compared with its recorded identity. About disk speed.

A split GGUF (``appliance.gguf_split``) is served from its first shard; llama.cpp opens the
other shards by name from the same directory, so ``quick`` checks every shard's header and
identity, and a model whose signed file list lacks a shard is refused before any load.

Any failure is a ``RefusalError`` (``IntegrityError``/``TruncatedError`` naming the file, and
the chunk when one differs); the server refuses the model and audits the refusal.

The two other store decisions ``appliance serve`` and the TUI's Serve screen share live here
too: ``servable_names`` (which models a server starts with) and ``serve_audit`` (the sink the
server writes its serve-start and refusal records to, with the operating system user).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import blake3

from appliance.errors import (
    FormatError,
    IntegrityError,
    ModelNotFoundError,
    StoreError,
    UsageError,
)
from appliance.gguf_layout import gguf_boundaries, is_gguf
from appliance.gguf_split import find_split, split_identity
from appliance.serve.model import VERIFY_MODES, ModelFile, ModelResolver, ServableModel
from appliance.serve.supervisor import Audit
from appliance.store import trust_state
from appliance.store.audit_group import GroupedAudit
from appliance.store.records import (
    FileRecord,
    ModelRecord,
    file_chunks,
    find_model,
    get_model,
    list_models,
)
from appliance.store.staging import StoredChunk, verify_chunks


def store_resolver(store_dir: Path, *, verify: str = "quick") -> ModelResolver:
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}")

    def resolve(name: str) -> ServableModel:
        try:
            record = get_model(store_dir, name)
        except ModelNotFoundError:
            raise
        except StoreError as e:  # quarantined, or a file missing or resized: never load it
            raise IntegrityError(f"model {name} must not be loaded: {e}") from e
        loaded = _loaded_files(record)
        for f in record.files if verify == "full" else loaded:
            _check(record, f, file_chunks(store_dir, record, f.path), full=verify == "full")
        main = loaded[0]
        assert main.blake3 is not None
        if len(loaded) == 1:
            return ServableModel(name=name, path=main.location, size=main.size,
                                 identity=main.blake3)
        return ServableModel(
            name=name, path=main.location, size=sum(f.size for f in loaded),
            identity=split_identity([(f.path, f.blake3 or "") for f in loaded]),
            shards=tuple(ModelFile(f.location, f.size) for f in loaded),
        )

    return resolve


def servable_names(store_dir: Path, requested: Sequence[str] = ()) -> tuple[str, ...]:
    """The models a server starts with: ``requested`` (each must resolve to one stored model
    now, not later in the log), else every verified model, by name, or name:version when
    a name repeats. UsageError when there is none."""
    if requested:
        for ref in requested:
            find_model(store_dir, ref)
        return tuple(dict.fromkeys(requested))
    models = [m for m in list_models(store_dir) if m.verified]
    if not models:
        raise UsageError(f"no verified model in the store {store_dir}; import one first "
                         "(or name one with --model)")
    names = [m.name for m in models]
    return tuple(m.name if names.count(m.name) == 1 else m.ref for m in models)


def serve_audit(store_dir: Path, *, via: str) -> Audit:
    """The audit sink a server writes to: each record gets the operating system user (the
    same ``trust_state.who`` every other record names) and ``via`` (cli, tui). Answers audited
    at the same time (``--audit-requests``) share one commit (``audit_group``); each still
    returns only once its record is durable."""
    user = trust_state.who()
    grouped = GroupedAudit(store_dir)

    def record(kind: str, details: dict[str, Any]) -> None:
        grouped.append(kind, {**details, "user": user, "via": via})

    return record


def _loaded_files(record: ModelRecord) -> tuple[FileRecord, ...]:
    """The files llama.cpp opens: every shard of a split GGUF (the first one first), else the
    model's main file."""
    split = find_split([f.path for f in record.files])
    if split is None:
        return (_main_file(record),)
    if split.missing:
        raise IntegrityError(
            f"model {record.ref} is a split GGUF of {split.first.count} shards and its signed "
            f"file list lacks {', '.join(split.missing)}: llama.cpp could not load it",
            file=f"{record.ref}/{split.missing[0]}")
    by_path = {f.path: f for f in record.files}
    return tuple(by_path[path] for path in split.paths)


def _main_file(record: ModelRecord) -> FileRecord:
    for f in record.files:
        if f.location == record.path:
            return f
    raise StoreError(f"model {record.ref} has no file to load")


def _check(record: ModelRecord, f: FileRecord, chunks: list[StoredChunk], *, full: bool) -> None:
    label = f"{record.ref}/{f.path}"
    if not f.blake3:
        raise IntegrityError("no identity hash was recorded at publish", file=label)
    if not chunks:
        raise IntegrityError("no signed chunk list is recorded", file=label)
    if full:
        whole = verify_chunks(f.location, chunks, f.size, label)
        if whole != f.blake3:
            raise IntegrityError("the file's BLAKE3 differs from its recorded identity",
                                 file=label)
        return
    ordered = sorted(chunks, key=lambda c: c.offset)
    header_end = _header_end(f.location, ordered[0])
    if header_end is None:  # the header no longer parses: the full check names the chunk
        try:
            _check(record, f, chunks, full=True)
        except IntegrityError as e:
            raise IntegrityError("the GGUF header differs from the signed manifest (it no "
                                 "longer parses)", chunk=e.chunk, file=label,
                                 offset=e.offset) from e
        return
    try:
        with open(f.location, "rb", buffering=0) as handle:
            for chunk in ordered:
                if chunk.offset >= header_end:
                    break
                data = os.pread(handle.fileno(), chunk.length, chunk.offset)
                if len(data) != chunk.length or blake3.blake3(data).hexdigest() != chunk.digest:
                    raise IntegrityError("the GGUF header differs from the signed manifest",
                                         chunk=chunk.digest, file=label, offset=chunk.offset)
    except OSError as e:
        raise IntegrityError(f"cannot read the model file: {e.strerror}", file=label) from e


def _header_end(path: Path, first: StoredChunk) -> int | None:
    """Where the file's GGUF header ends (tensor data starts); the first chunk's end for a
    file that is not GGUF; None when a GGUF header does not parse."""
    try:
        if not is_gguf(path):
            return first.offset + first.length
        return gguf_boundaries(path).data_start
    except (FormatError, UsageError):
        return None
