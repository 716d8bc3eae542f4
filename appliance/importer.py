"""Import a signed bundle from removable media into the local store, resumably.

``import_media(store_dir, volume_dirs, *, now, ...) -> ImportResult`` runs the one ingest
session (``appliance.store.ingest``) with the media as its chunk source. Holding the store's
writer lock, the session authenticates the bundle BEFORE any chunk is read (the volumes' small
files are opened with caps, the carried trust chain is walked from the installed root, the
signature threshold checked, then parse, publisher scopes, expiry and every volume index; an
``allow_expired`` override needs a ``reason`` and is audited), checks the channel's rollback
rule, and this module checks that every pack has the size its index says
(``bundle.reader.check_pack_sizes``). The session then plans, checks free space, accepts the
bundle, copies the chunks the store already holds, and asks ``MediaSource`` for the rest:
whichever given volume stores a chunk reads it, in volume/pack/offset order; each chunk is
checked against the signed digest before it is recorded, and every file whose chunks are all
there is published. A chunk stored raw (quantized weights mostly are) is copied from its pack
into the staged file in the kernel (``appliance.store.kernelcopy``) and checked where it
landed, so its bytes never pass through user space; a compressed one is read, decompressed
and checked before it is written.

Chunks on volumes not given are left for a later run: the result lists the volumes still
needed and the import resumes where it stopped (also after SIGKILL, see
``appliance.store.staging``). Refusals are audited as "refusal"; every run that got past
authentication leaves an "import" record. The media is only ever opened for reading.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.authenticate import AuthenticatedBundle
from appliance.bundle.reader import (
    ChunkLocation,
    Media,
    check_location,
    check_pack_sizes,
    open_media,
    read_chunk,
)
from appliance.chunks import check_chunk
from appliance.errors import (
    ApplianceError,
    IntegrityError,
    MediaError,
    MissingVolumeError,
    TruncatedError,
)
from appliance.format.manifest import ChunkRef
from appliance.format.trust import TrustRoot
from appliance.fsutil import open_regular
from appliance.limits import DEFAULT_LIMITS, Limits
from appliance.store import layout, trust_state
from appliance.store.ingest import IngestOutcome, IngestSession, ReadAhead
from appliance.store.kernelcopy import MIN_KERNEL_COPY, ChunkExtent, copy_range
from appliance.store.staging import DEFAULT_FLUSH_BYTES, DEFAULT_FLUSH_CHUNKS
from appliance.store.store import Store

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImportResult:
    manifest_hash: str
    channel: str
    sequence: int
    signers: tuple[str, ...]
    complete: bool  # every model of the bundle is published
    published: tuple[str, ...]  # name:version published by this run
    present: tuple[str, ...]  # already in the store before this run
    pending: tuple[str, ...]  # still incomplete: their chunks are on volumes not given
    volumes_used: tuple[str, ...]
    volumes_needed: tuple[str, ...]  # volumes to insert to finish the pending models
    total_bytes: int
    already_done_bytes: int  # durable in the store before this run
    media_bytes: int  # plain bytes read from the media by this run
    local_bytes: int  # plain bytes copied from chunks the store already held
    seconds: float
    expired_override: bool
    rebuilt: tuple[str, ...] = ()  # volumes rebuilt from parity (bundle.parity)


def import_media(
    store_dir: Path,
    volume_dirs: Sequence[Path],
    *,
    now: datetime,
    allow_expired: bool = False,
    reason: str | None = None,
    progress: Progress | None = None,
    limits: Limits = DEFAULT_LIMITS,
    flush_bytes: int = DEFAULT_FLUSH_BYTES,
    flush_chunks: int = DEFAULT_FLUSH_CHUNKS,
) -> ImportResult:
    """Authenticate the bundle on ``volume_dirs`` and import what they hold into the store."""
    media_names = [str(p) for p in volume_dirs]
    opened: list[Media] = []

    def authenticate(root: TrustRoot) -> AuthenticatedBundle:
        media = open_media(volume_dirs, limits)
        opened.append(media)
        return media.authenticate(root, now, allow_expired=allow_expired)

    def source(bundle: AuthenticatedBundle) -> ReadAhead:
        media = opened[0]
        for volume in media.volumes:
            check_pack_sizes(volume)  # a truncated or padded pack before any chunk is read
        return ReadAhead(MediaSource(media, bundle))

    with (
        layout.writer_lock(store_dir, "import"),
        Store(store_dir, flush_bytes=flush_bytes, flush_chunks=flush_chunks) as store,
    ):
        session = IngestSession(store, action="import", now=now, allow_expired=allow_expired,
                                reason=reason, progress=progress, limits=limits,
                                context={"media": media_names})
        outcome = session.run(
            authenticate, source,
            purpose=lambda b: f"importing {b.manifest.channel} #{b.manifest.sequence}",
            summary=lambda o: _audit_details(_result(o, opened[0])),
        )
        return _result(outcome, opened[0])


class MediaSource:
    """``ChunkReader`` over the volumes given: chunks in volume/pack/offset order."""

    # read_chunk runs check_chunk itself, naming the volume, pack and offset of a bad chunk.
    runs_check_chunk = True

    def __init__(self, media: Media, bundle: AuthenticatedBundle) -> None:
        self.media = media
        # The first file holding each chunk, for errors. Unique chunks are numbered in order of
        # first appearance, file by file, so each file's new chunks are one run of ordinals:
        # a list of run starts, not a map of every digest (a manifest may hold 200k chunks).
        self._label_starts: list[int] = []
        self._labels: list[str] = []
        seen: set[bytes] = set()
        for model in bundle.manifest.models:
            for file in model.files:
                start = len(seen)
                seen.update(bytes.fromhex(chunk.digest) for chunk in file.chunks)
                if len(seen) > start:
                    self._label_starts.append(start)
                    self._labels.append(f"{model.name}:{model.version}/{file.path}")
        self.volume_paths = {v.name: v.path for v in media.volumes}

    def label(self, digest: str) -> str | None:
        """The first file of the manifest that holds this chunk."""
        ordinal = self.media.ordinal(digest)
        if ordinal is None:
            return None
        return self._labels[bisect.bisect_right(self._label_starts, ordinal) - 1]

    def plan(self, needed: Mapping[str, int]) -> list[str]:
        # Volume, pack and offset order is the order of the unique chunks' ordinals (volumes
        # hold consecutive runs of them, their packs tile those runs in order), so one int a
        # chunk sorts them; the chunks on a volume not given are left for a later run.
        given = {v.index.volume for v in self.media.volumes}
        table = self.media.volumes[0].index
        ordinals: dict[str, int] = {}
        for digest in needed:
            ordinal = self.media.ordinal(digest)
            if ordinal is not None and table.volume_of(ordinal) in given:
                ordinals[digest] = ordinal
        return sorted(ordinals, key=ordinals.__getitem__)

    def read(self, digest: str, length: int) -> bytes | ChunkExtent | None:
        location = self.media.locations(digest)[0]
        # read_chunk checks the digest and the length, which the session gives from the
        # signed manifest; a unique chunk's offset (in its first file) plays no part.
        ref = ChunkRef(digest=digest, length=length, offset=0)
        if not location.compressed and length >= MIN_KERNEL_COPY:
            check_location(location, ref, self.media.limits)
            return _PackChunk(self, location, ref)
        return self.read_checked(location, ref)

    def read_checked(self, location: ChunkLocation, ref: ChunkRef) -> bytes:
        """``read_chunk``: pread, decompress if need be, check."""
        try:
            return read_chunk(location, ref, self.media.limits, file=self.label(ref.digest))
        except (IntegrityError, MediaError) as e:
            self._went_away(location, e)
            raise

    def _went_away(self, location: ChunkLocation, e: ApplianceError) -> None:
        """MissingVolumeError when the volume was pulled out mid-import (the read failing is
        then no sign of bad media)."""
        volume_dir = self.volume_paths.get(location.volume)
        if volume_dir is not None and not (volume_dir / "manifest.yaml").exists():
            raise MissingVolumeError(
                f"{location.volume} ({volume_dir}) went away during the import; what was "
                "written so far is kept: put it back and run the same import again"
            ) from e


class _PackChunk(ChunkExtent):
    """A chunk stored raw in a pack: copied into the staged file in the kernel, then checked
    there (``IntegrityError`` naming the chunk, file, volume, pack and offset)."""

    def __init__(self, source: MediaSource, location: ChunkLocation, ref: ChunkRef) -> None:
        self.source = source
        self.location = location
        self.ref = ref
        self.length = ref.length

    def copy_into(self, dst_fd: int, dst_offset: int) -> bool:
        location = self.location
        try:
            fd = open_regular(location.pack, "pack file", missing=TruncatedError)
        except ApplianceError:
            return False  # read() names what is wrong with the pack
        try:
            return copy_range(fd, dst_fd, self.length, location.offset, dst_offset) \
                == self.length
        finally:
            os.close(fd)

    def check(self, data: bytes | memoryview) -> None:
        location = self.location
        try:
            check_chunk(data, self.ref.digest, self.length, file=self.source.label(self.ref.digest),
                        volume=location.volume, offset=location.offset, pack=location.pack.name)
        except IntegrityError as e:
            self.source._went_away(location, e)
            raise

    def read(self) -> bytes:
        return self.source.read_checked(self.location, self.ref)


def _result(outcome: IngestOutcome, media: Media) -> ImportResult:
    bundle = outcome.bundle
    manifest = bundle.manifest
    return ImportResult(
        manifest_hash=bundle.manifest_hash,
        channel=manifest.channel,
        sequence=manifest.sequence,
        signers=tuple(sorted(bundle.signers)),
        complete=outcome.complete,
        published=tuple(outcome.published),
        present=tuple(outcome.present),
        pending=tuple(outcome.pending),
        volumes_used=tuple(v.name for v in media.volumes),
        volumes_needed=tuple(sorted({media.holder(d) or "?" for d in outcome.missing})),
        total_bytes=outcome.total_bytes,
        already_done_bytes=outcome.already_done_bytes,
        media_bytes=outcome.source_bytes,
        local_bytes=outcome.local_bytes + outcome.duplicate_bytes,
        seconds=outcome.seconds,
        expired_override=bundle.expired_override,
    )


def _audit_details(result: ImportResult) -> dict[str, Any]:
    return {
        "manifest": result.manifest_hash,
        "channel": result.channel,
        "sequence": result.sequence,
        "status": "complete" if result.complete else "partial",
        "published": list(result.published),
        "pending": list(result.pending),
        "volumes": list(result.volumes_used),
        "volumes_needed": list(result.volumes_needed),
        "media_bytes": result.media_bytes,
        "local_bytes": result.local_bytes,
        "user": trust_state.who(),
    }
