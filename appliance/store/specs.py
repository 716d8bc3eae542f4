"""Plain values the store takes and gives: the shapes of manifest entries it accepts
(duck-typed, so ``appliance.format.manifest`` dataclasses pass straight in), where a bundle
came from, where a local chunk copy lives, and what an import would do.

Also the file helpers that need no index connection (reader threads may call them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from appliance.chunks import check_chunk
from appliance.errors import IntegrityError
from appliance.format.fields import format_timestamp
from appliance.store import layout


class ChunkLike(Protocol):
    @property
    def digest(self) -> str: ...
    @property
    def length(self) -> int: ...
    @property
    def offset(self) -> int: ...


class FileLike(Protocol):
    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def merkle_root(self) -> str: ...
    @property
    def chunks(self) -> Sequence[ChunkLike]: ...


class ModelLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def license(self) -> str: ...
    @property
    def provenance(self) -> Any: ...
    @property
    def gguf(self) -> Any: ...
    @property
    def files(self) -> Sequence[FileLike]: ...


@dataclass(frozen=True)
class BundleOrigin:
    """The authenticated manifest a model came from (kept so peers can re-serve it)."""

    manifest_hash: str
    channel: str
    sequence: int
    manifest_bytes: bytes
    signatures: tuple[str, ...]  # detached signatures, one line each
    signers: tuple[str, ...]  # key ids that met the threshold


@dataclass(frozen=True)
class LocalChunk:
    digest: str
    path: Path
    offset: int
    length: int


@dataclass(frozen=True)
class ModelPlan:
    name: str
    version: str
    action: str  # present | resume | new
    size: int
    bytes_done: int  # chunks already durable in the store for this model
    bytes_to_allocate: int  # staged files still to be created


def jsonable(value: Any) -> Any:
    """Manifest facts (dataclasses, mappings, tuples) as plain JSON values."""
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return format_timestamp(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def read_local_copy(loc: LocalChunk) -> bytes | None:
    """One local copy's bytes if they still hash to the digest, else None.

    Needs no index connection, so importer threads can call it. FileNotFoundError passes
    through (a staged file renamed into place meanwhile: look the chunk up again).
    """
    try:
        with open(loc.path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), loc.length, loc.offset)
    except FileNotFoundError:
        raise
    except OSError:
        return None
    try:
        check_chunk(data, loc.digest, loc.length)
    except IntegrityError:
        return None
    return data


def remove_tree(path: Path) -> None:
    if path.exists():
        try:
            shutil.rmtree(path)
        except OSError as e:
            raise layout.os_error(e, f"cannot delete {path}") from e


def prune_empty_dirs(root: Path) -> None:
    """Remove empty directories under root (not root itself), deepest first."""
    if not root.exists():
        return
    for dirpath, _dirs, _files in sorted(os.walk(root), key=lambda t: -len(t[0])):
        p = Path(dirpath)
        if p != root:
            with contextlib.suppress(OSError):
                p.rmdir()
