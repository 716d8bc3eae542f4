"""OCI image-layout directories (image-spec ``image-layout.md``) read and written.

A layout is ``oci-layout`` (``{"imageLayoutVersion": "1.0.0"}``), ``index.json`` (the entry
points; a tag is the ``org.opencontainers.image.ref.name`` annotation, as skopeo and oras
read it) and ``blobs/sha256/<hex>``. Blobs are written to a temporary name while hashed and
renamed once their digest matched, so a killed push leaves no blob under a wrong name;
``index.json`` is replaced atomically. ``OciLayout`` implements
``appliance.oci.targets.Target``; referrers are found by scanning ``index.json`` for
manifests whose ``subject`` is the digest (the tag-schema index is written too, for copies
by tools that follow tags only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from appliance import fsutil
from appliance.errors import FormatError, IntegrityError, MediaError, UsageError
from appliance.oci import mapping
from appliance.oci.mapping import Descriptor

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
REF_NAME = "org.opencontainers.image.ref.name"
_PIECE = 1 << 20


class OciLayout:
    """An OCI image layout at ``path`` (created when ``create``)."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = path
        self.name = f"oci-layout:{path}"
        marker = path / LAYOUT_FILE
        if create:
            (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            if not marker.exists():
                fsutil.write_atomic(marker, mapping.canonical_json(
                    {"imageLayoutVersion": "1.0.0"}))
            if not (path / INDEX_FILE).exists():
                self._write_index([])
        elif not marker.is_file():
            raise UsageError(f"{path} is not an OCI image layout (no {LAYOUT_FILE})")

    def close(self) -> None:
        pass

    # -- index.json -------------------------------------------------------------------------

    def _index(self) -> list[dict[str, Any]]:
        data = fsutil.read_capped(self.path / INDEX_FILE, mapping.MAX_OCI_JSON_BYTES,
                                  f"{self.path}/{INDEX_FILE}")
        doc = mapping.parse_json(data, f"{self.path}/{INDEX_FILE}")
        mapping.parse_index(data, f"{self.path}/{INDEX_FILE}")  # every entry well formed
        return list(doc["manifests"])

    def _write_index(self, manifests: list[dict[str, Any]]) -> None:
        doc = {"schemaVersion": 2, "mediaType": mapping.OCI_INDEX, "manifests": manifests}
        fsutil.write_atomic(self.path / INDEX_FILE, json.dumps(doc, indent=2).encode())

    # -- blobs ------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        hexdigest = mapping.check_digest(digest, "blob").removeprefix("sha256:")
        return self.path / "blobs" / "sha256" / hexdigest

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def put_blob(self, digest: str, size: int, body: Callable[[], Iterable[bytes]]) -> None:
        final = self.blob_path(digest)
        if final.is_file() and final.stat().st_size == size:
            return
        tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
        hasher = hashlib.sha256()
        written = 0
        try:
            with tmp.open("wb") as f:
                for piece in body():
                    hasher.update(piece)
                    f.write(piece)
                    written += len(piece)
                f.flush()
                os.fsync(f.fileno())
            got = "sha256:" + hasher.hexdigest()
            if got != digest or written != size:
                raise IntegrityError(f"blob for {digest} changed while it was written "
                                     f"({written} bytes hashing to {got})")
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsutil.fsync_dir(final.parent, strict=False)

    def get_blob(self, digest: str, cap: int) -> bytes:
        data = fsutil.read_capped(self.blob_path(digest), cap, f"blob {digest}")
        if mapping.sha256_digest(data) != digest:
            raise IntegrityError(f"{self.name}: blob {digest} holds other bytes")
        return data

    @contextlib.contextmanager
    def read_range(self, digest: str, start: int, end: int) -> Iterator[Iterator[bytes]]:
        path = self.blob_path(digest)
        try:
            f = path.open("rb")
        except OSError as e:
            raise MediaError(f"{self.name}: cannot open blob {digest}: {e}") from e
        with f:
            f.seek(start)

            def pieces() -> Iterator[bytes]:
                left = end - start
                while left > 0:
                    piece = f.read(min(left, _PIECE))
                    if not piece:
                        return
                    left -= len(piece)
                    yield piece

            yield pieces()

    # -- manifests --------------------------------------------------------------------------

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> bool:
        digest = mapping.sha256_digest(data)
        self.put_blob(digest, len(data), lambda: [data])
        entry: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(data)}
        doc = mapping.parse_json(data, "manifest")
        if isinstance(doc.get("artifactType"), str):
            entry["artifactType"] = doc["artifactType"]
        tag = None if reference.startswith("sha256:") else reference
        if tag:
            entry["annotations"] = {REF_NAME: tag}
        kept = [m for m in self._index()
                if not (tag and m.get("annotations", {}).get(REF_NAME) == tag)
                and not (not tag and m.get("digest") == digest)]
        self._write_index([*kept, entry])
        return False  # tools that follow tags only (skopeo) need the referrers tag too

    def get_manifest(self, reference: str) -> tuple[bytes, str] | None:
        if reference.startswith("sha256:"):
            digest = reference
        else:
            found = [m for m in self._index()
                     if m.get("annotations", {}).get(REF_NAME) == reference]
            if not found:
                return None
            digest = found[-1]["digest"]
        if not self.has_blob(digest):
            return None
        return self.get_blob(digest, mapping.MAX_OCI_JSON_BYTES), digest

    def referrers(self, digest: str, artifact_type: str) -> list[Descriptor] | None:
        out = []
        for entry in mapping.parse_index(mapping.canonical_json(
                {"schemaVersion": 2, "manifests": self._index()})):
            if entry.artifact_type != artifact_type or entry.media_type != mapping.OCI_MANIFEST:
                continue
            try:
                artifact = mapping.parse_manifest(
                    self.get_blob(entry.digest, mapping.MAX_OCI_JSON_BYTES))
            except (FormatError, MediaError, IntegrityError):
                continue  # a broken entry is not a referrer; the tag schema may still be
            if artifact.subject is not None and artifact.subject.digest == digest:
                out.append(entry)
        return out
