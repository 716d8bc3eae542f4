"""Verify every byte of the bundle on the volumes given, streaming, in flat memory.

``verify_media(volume_dirs, trusted_root, now, *, progress, workers, allow_expired)
-> VerifyReport``: open and authenticate the media (``appliance.bundle.reader``), check every
pack's size, then read and check every chunk of every volume given against the signed
manifest. Missing volumes are not an error here: the report lists them.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from appliance.authenticate import AuthenticatedBundle
from appliance.bundle.media import MappedRange, pack_name
from appliance.bundle.reader import (
    ChunkLocation,
    Volume,
    check_pack_sizes,
    check_stored,
    open_media,
)
from appliance.errors import TruncatedError
from appliance.format.manifest import ChunkRef
from appliance.format.trust import TrustRoot
from appliance.fsutil import open_regular
from appliance.limits import DEFAULT_LIMITS, Limits


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify_media`` checked. ``complete`` is False when volumes are missing."""

    bundle: AuthenticatedBundle
    volumes_present: tuple[str, ...]
    volumes_missing: tuple[str, ...]
    chunks_verified: int
    plain_bytes: int  # bytes of chunk content verified
    stored_bytes: int  # bytes read from packs
    seconds: float
    rebuilt: tuple[str, ...] = ()  # volumes rebuilt from parity (bundle.parity)

    @property
    def complete(self) -> bool:
        return not self.volumes_missing



def _open_pack(volume: Volume, number: int) -> BinaryIO:
    path = volume.pack_path(number)
    try:
        fd = open_regular(path, pack_name(number), missing=TruncatedError)
    except TruncatedError as e:
        raise TruncatedError(f"{pack_name(number)} is missing", volume=volume.name) from e
    return os.fdopen(fd, "rb")


def _check_mapped(mapped: MappedRange, location: ChunkLocation, ref: ChunkRef, file: str
                  ) -> int:
    try:
        check_stored(mapped.view, location, ref, file=file)
    finally:
        mapped.close()
    return ref.length


def verify_media(
    volume_dirs: Sequence[Path],
    trusted_root: TrustRoot,
    now: datetime,
    *,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 2,
    allow_expired: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> VerifyReport:
    """Authenticate the bundle, then read and check every chunk of every volume given.

    This thread maps each chunk of each pack in order (``MappedRange``: no copy) while
    ``workers`` threads decompress and hash (both release the GIL); at most
    ``2 * workers`` chunks are mapped at a time, so memory stays flat. The first
    bad chunk stops the run with an ``IntegrityError`` naming chunk, file, volume and pack
    offset. Missing volumes are not an error here: the report lists them.
    ``progress(done, total)`` counts bytes read from packs.
    """
    started = time.perf_counter()
    media = open_media(volume_dirs, limits)
    bundle = media.authenticate(trusted_root, now, allow_expired=allow_expired)
    unique = bundle.manifest.unique_chunks()
    files: dict[str, str] = {}
    for model, file, chunk in bundle.manifest.iter_chunks():
        files.setdefault(chunk.digest, f"{model.name}/{file.path}")
    for volume in media.volumes:
        check_pack_sizes(volume)
    total = sum(sum(v.index.pack_sizes) for v in media.volumes)
    done = chunks = plain = 0
    pending: deque[Future[int]] = deque()

    def settle(future: Future[int]) -> None:
        nonlocal chunks, plain
        plain += future.result()
        chunks += 1

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bundle-verify") as pool:
        try:
            for volume in media.volumes:
                refs = unique[volume.index.chunk_range().start:volume.index.chunk_range().stop]
                handle = None
                current = 0
                try:
                    for ref, entry in zip(refs, volume.index.entries, strict=True):
                        if entry.pack != current:
                            if handle is not None:
                                handle.close()
                            current = entry.pack
                            handle = _open_pack(volume, current)
                        assert handle is not None
                        location = ChunkLocation(volume.name, volume.pack_path(entry.pack),
                                                 entry.offset, entry.stored_length,
                                                 entry.compressed)
                        try:
                            mapped = MappedRange(handle.fileno(), entry.offset,
                                                 entry.stored_length)
                        except TruncatedError as e:
                            raise TruncatedError(
                                f"{pack_name(entry.pack)} ends before this chunk",
                                chunk=ref.digest, volume=volume.name, offset=entry.offset,
                            ) from e
                        pending.append(pool.submit(_check_mapped, mapped, location, ref,
                                                   files[ref.digest]))
                        done += entry.stored_length
                        while len(pending) > 2 * workers:
                            settle(pending.popleft())
                        if progress is not None:
                            progress(done, total)
                finally:
                    if handle is not None:
                        handle.close()
            while pending:
                settle(pending.popleft())
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return VerifyReport(
        bundle=bundle, volumes_present=tuple(media.volumes_present),
        volumes_missing=tuple(media.volumes_missing), chunks_verified=chunks,
        plain_bytes=plain, stored_bytes=done, seconds=time.perf_counter() - started,
    )
