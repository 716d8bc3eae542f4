"""Open bundle media, authenticate it against a trust root, read and verify chunks.

The order of trust (DESIGN.md): read small files with caps, walk the carried trust chain from
the host's root, count valid signatures over the exact manifest bytes, and only then parse
the manifest; then scope and expiry; then cross-check each volume's index against the signed
chunk list. Chunks are only ever returned after their BLAKE3 matched the manifest.

Public API (used by the importer, peers and the CLI):

- ``open_media(volume_dirs, limits) -> Media``: reads manifest, signatures, carried chain and
  index of each volume; no trust decision and no chunk read yet. A directory may be a volume
  or a media directory holding ``vol-NNN`` volumes.
- ``Media.authenticate(trusted_root, now, *, allow_expired=False) -> AuthenticatedBundle``:
  ``appliance.authenticate.authenticate_manifest`` over what the volumes carry, then the
  volume indexes against the signed chunk list
- ``Media.locations(digest) -> list[ChunkLocation]`` (``MissingVolumeError`` when the chunk
  lives only on volumes not given), ``Media.holder(digest)`` (the volume that stores it),
  ``Media.volumes_present`` / ``volumes_expected`` / ``volumes_missing``
- ``read_chunk(location, ref, limits, *, file=None) -> bytes``: bounded, decompressed,
  checked (``IntegrityError`` / ``TruncatedError`` / ``DecompressionError``)
- ``verify_media(volume_dirs, trusted_root, now, *, progress, workers, allow_expired)
  -> VerifyReport``: all of the above for every chunk of every volume given, streaming.
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

from appliance.authenticate import AuthenticatedBundle, authenticate_manifest
from appliance.bundle.media import (
    INDEX_NAME,
    MANIFEST_NAME,
    PACKS_DIR,
    SIGNATURE_SUFFIX,
    SIGNATURES_DIR,
    TRUST_DIR,
    MappedRange,
    VolumeIndex,
    check_chunk,
    decompress_chunk,
    pack_name,
    parse_index,
    read_capped,
    read_stored,
    volume_name,
)
from appliance.errors import (
    FormatError,
    LimitExceededError,
    MediaError,
    MissingVolumeError,
    SignatureError,
    TruncatedError,
    UsageError,
)
from appliance.format.manifest import (
    ChunkRef,
    Manifest,
    manifest_hash,
    parse_manifest,
)
from appliance.format.signing import Signature
from appliance.format.trust import SignedRoot, TrustRoot, parse_signed_root
from appliance.limits import DEFAULT_LIMITS, Limits


@dataclass(frozen=True)
class ChunkLocation:
    """Where a stored chunk sits: volume name, pack file, offset, stored bytes, compressed."""

    volume: str
    pack: Path
    offset: int
    stored_length: int
    compressed: bool


@dataclass(frozen=True)
class Volume:
    path: Path
    index: VolumeIndex
    signatures: tuple[Signature, ...]
    chain: tuple[SignedRoot, ...]

    @property
    def name(self) -> str:
        return self.index.name

    def pack_path(self, number: int) -> Path:
        return self.path / PACKS_DIR / pack_name(number)


def find_volume_dirs(paths: Sequence[Path]) -> list[Path]:
    """Expand each given path: a volume itself, or a media dir with ``vol-NNN`` volumes."""
    out: list[Path] = []
    for path in paths:
        if not path.exists():
            raise UsageError(f"{path} does not exist")
        if not path.is_dir():
            raise UsageError(f"{path} is not a directory")
        if (path / MANIFEST_NAME).is_file():
            out.append(path)
            continue
        volumes = sorted(p for p in path.glob("vol-*") if (p / MANIFEST_NAME).is_file())
        if not volumes:
            raise MediaError(
                f"{path} holds no bundle: no {MANIFEST_NAME} in it or in any vol-NNN folder"
            )
        out.extend(volumes)
    return out


def _read_signatures(volume_dir: Path, limits: Limits) -> tuple[Signature, ...]:
    sig_dir = volume_dir / SIGNATURES_DIR
    try:
        names = sorted(os.listdir(sig_dir))
    except FileNotFoundError:
        return ()
    except OSError as e:
        raise MediaError(f"cannot list {sig_dir}: {e}") from e
    names = [n for n in names if n.endswith(SIGNATURE_SUFFIX) and not n.startswith(".")]
    if len(names) > limits.max_signatures:
        raise LimitExceededError(f"{sig_dir} holds {len(names)} signatures, over the cap")
    signatures = []
    for name in names:
        data = read_capped(sig_dir / name, limits.max_signature_bytes, f"signature {name}")
        sig = Signature.from_bytes(data, limits)
        if name != sig.key_id + SIGNATURE_SUFFIX:
            raise SignatureError(f"signature file {name} holds a signature by {sig.key_id}")
        signatures.append(sig)
    return tuple(signatures)


def _read_chain(volume_dir: Path, limits: Limits) -> tuple[SignedRoot, ...]:
    trust_dir = volume_dir / TRUST_DIR
    try:
        names = [n for n in os.listdir(trust_dir) if n.endswith(".yaml") and n[0] != "."]
    except FileNotFoundError:
        return ()
    except OSError as e:
        raise MediaError(f"cannot list {trust_dir}: {e}") from e
    if len(names) > limits.max_trust_chain_length:
        raise LimitExceededError(f"{trust_dir} holds {len(names)} roots, over the cap")
    roots = []
    for name in names:
        data = read_capped(trust_dir / name, limits.max_trust_root_bytes, f"trust root {name}")
        signed = parse_signed_root(data, limits)
        if name != f"root-{signed.root.version}.yaml":
            raise FormatError(f"{trust_dir / name} holds trust root v{signed.root.version}")
        roots.append(signed)
    return tuple(sorted(roots, key=lambda r: r.root.version))


def open_volume(volume_dir: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, Volume]:
    """Manifest bytes and the volume's signatures, chain and index (structure checked)."""
    manifest = read_capped(volume_dir / MANIFEST_NAME, limits.max_manifest_bytes,
                           f"manifest of {volume_dir}")
    index_bytes = read_capped(volume_dir / INDEX_NAME, limits.max_volume_index_bytes,
                              f"volume index of {volume_dir}")
    index = parse_index(index_bytes, limits, where=f"volume index of {volume_dir}")
    volume = Volume(path=volume_dir, index=index, signatures=_read_signatures(volume_dir, limits),
                    chain=_read_chain(volume_dir, limits))
    return manifest, volume


class Media:
    """The volumes given of one bundle. Build with ``open_media``."""

    def __init__(self, manifest_bytes: bytes, volumes: Sequence[Volume], limits: Limits) -> None:
        self.manifest_bytes = manifest_bytes
        self.manifest_hash = manifest_hash(manifest_bytes)
        self.volumes = tuple(sorted(volumes, key=lambda v: v.index.volume))
        self.limits = limits
        self.volume_count = self.volumes[0].index.volume_count
        self._where: dict[bytes, list[ChunkLocation]] = {}
        for volume in self.volumes:
            for e in volume.index.entries:
                self._where.setdefault(e.digest, []).append(ChunkLocation(
                    volume=volume.name, pack=volume.pack_path(e.pack), offset=e.offset,
                    stored_length=e.stored_length, compressed=e.compressed))
        self._ordinals: dict[str, int] | None = None

    @property
    def volumes_expected(self) -> list[str]:
        return [volume_name(n) for n in range(1, self.volume_count + 1)]

    @property
    def volumes_present(self) -> list[str]:
        return [v.name for v in self.volumes]

    @property
    def volumes_missing(self) -> list[str]:
        present = set(self.volumes_present)
        return [n for n in self.volumes_expected if n not in present]

    @property
    def signatures(self) -> tuple[Signature, ...]:
        """Every distinct signature found on any volume (co-signatures may differ per volume)."""
        seen: dict[Signature, None] = {}
        for volume in self.volumes:
            for sig in volume.signatures:
                seen.setdefault(sig, None)
        return tuple(seen)

    @property
    def chain(self) -> tuple[SignedRoot, ...]:
        """The carried trust roots of all volumes, one per version, ascending."""
        by_version: dict[int, SignedRoot] = {}
        for volume in self.volumes:
            for signed in volume.chain:
                other = by_version.setdefault(signed.root.version, signed)
                if other.body != signed.body:
                    raise FormatError(
                        f"volumes carry two different trust roots v{signed.root.version}"
                    )
        return tuple(by_version[v] for v in sorted(by_version))

    def parse_unverified(self) -> Manifest:
        """The manifest parsed WITHOUT any signature check: for ``bundle inspect`` only."""
        return parse_manifest(self.manifest_bytes, self.limits)

    def authenticate(self, trusted_root: TrustRoot, now: datetime, *,
                     allow_expired: bool = False) -> AuthenticatedBundle:
        """``authenticate_manifest`` over what the volumes carry, then every volume index.

        Raises RotationError, ExpiredError, ThresholdError, ScopeError, FormatError (also
        when a volume's index disagrees with the signed chunk list).
        """
        bundle = authenticate_manifest(self.manifest_bytes, self.signatures, self.chain,
                                       trusted_root, now, allow_expired=allow_expired,
                                       limits=self.limits)
        self._check_indexes(bundle.manifest)
        return bundle

    def _check_indexes(self, manifest: Manifest) -> None:
        unique = manifest.unique_chunks()
        self._ordinals = {c.digest: i for i, c in enumerate(unique)}
        for volume in self.volumes:
            index = volume.index
            # Checked only now, after the signatures: a changed manifest is a signature
            # failure first, not an index complaint.
            if index.manifest_hash.hex() != self.manifest_hash:
                raise FormatError(f"{volume.name}: the volume index belongs to another manifest")
            if index.total_chunks != len(unique):
                raise FormatError(
                    f"{volume.name}: index counts {index.total_chunks} chunks, the manifest "
                    f"{len(unique)}"
                )
            share = unique[index.chunk_range().start:index.chunk_range().stop]
            if [bytes.fromhex(c.digest) for c in share] != [e.digest for e in index.entries]:
                raise FormatError(
                    f"{volume.name}: index does not list this volume's chunks of the manifest"
                )
            for ref, entry in zip(share, index.entries, strict=True):
                if (entry.stored_length > ref.length
                        or (not entry.compressed and entry.stored_length != ref.length)):
                    raise FormatError(
                        f"{volume.name}: index gives chunk {ref.digest} a stored length of "
                        f"{entry.stored_length} for a {ref.length}-byte chunk"
                    )

    def holder(self, digest: str) -> str | None:
        """The volume that stores a chunk of the signed manifest (known once authenticated)."""
        if self._ordinals is None or digest not in self._ordinals:
            return None
        return volume_name(self.volumes[0].index.volume_of(self._ordinals[digest]))

    def locations(self, digest: str) -> list[ChunkLocation]:
        """Where the chunk is stored on the volumes given; ``MissingVolumeError`` if nowhere."""
        found = self._where.get(bytes.fromhex(digest))
        if found:
            return list(found)
        missing = self.volumes_missing
        holder = self.holder(digest)
        if holder is not None:
            raise MissingVolumeError(
                f"chunk {digest} is on {holder}, which was not given "
                f"(present: {', '.join(self.volumes_present)})"
            )
        if missing:
            raise MissingVolumeError(
                f"chunk {digest} is not on the volumes given; missing: {', '.join(missing)}"
            )
        raise FormatError(f"chunk {digest} is on no volume of this bundle")


def open_media(volume_dirs: Sequence[Path], limits: Limits = DEFAULT_LIMITS) -> Media:
    """Open every volume given (or found under a media dir). All must carry the byte-identical
    manifest and agree on the volume count; a volume given twice is a ``UsageError``."""
    dirs = find_volume_dirs(volume_dirs)
    if not dirs:
        raise UsageError("no media directory given")
    manifest: bytes | None = None
    volumes: dict[int, Volume] = {}
    for path in dirs:
        data, volume = open_volume(path, limits)
        if manifest is None:
            manifest = data
        elif data != manifest:
            raise FormatError(f"{path} carries a different manifest than {dirs[0]}")
        number = volume.index.volume
        if number in volumes:
            if volumes[number].path.resolve() == path.resolve():
                continue
            raise UsageError(
                f"{volume.name} given twice: {volumes[number].path} and {path}"
            )
        if volumes and volume.index.volume_count != next(iter(volumes.values())).index.volume_count:
            raise FormatError(f"{path} disagrees with the other volumes on the volume count")
        volumes[number] = volume
    assert manifest is not None
    return Media(manifest, list(volumes.values()), limits)


def read_chunk(location: ChunkLocation, ref: ChunkRef, limits: Limits = DEFAULT_LIMITS, *,
               file: str | None = None) -> bytes:
    """The plain bytes of one chunk, checked against the manifest's digest and length.

    Reads at most ``ref.length`` bytes from the pack (a compressed chunk is always shorter
    than its plain length), decompresses to at most ``ref.length`` bytes, then hashes.
    """
    if location.stored_length > min(ref.length, limits.max_chunk_bytes) or (
        not location.compressed and location.stored_length != ref.length
    ):
        raise FormatError(
            f"{location.volume}: stored length {location.stored_length} does not fit chunk "
            f"{ref.digest} of {ref.length} bytes"
        )
    stored = read_stored(location.pack, location.offset, location.stored_length,
                         chunk=ref.digest, volume=location.volume)
    plain = check_stored(stored, location, ref, file=file)
    assert isinstance(plain, bytes)  # bytes in, bytes out
    return plain


def check_stored(stored: bytes | memoryview, location: ChunkLocation, ref: ChunkRef, *,
                 file: str | None = None) -> bytes | memoryview:
    """Decompress (if needed) and hash stored bytes already read from a pack."""
    plain: bytes | memoryview = stored
    if location.compressed:
        plain = decompress_chunk(stored, ref.length, chunk=ref.digest, volume=location.volume,
                                 offset=location.offset, pack=location.pack.name)
    check_chunk(plain, ref.digest, file=file, volume=location.volume, offset=location.offset,
                pack=location.pack.name)
    return plain


# ---------------------------------------------------------------------------------------------
# Verifying every byte of the volumes given


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

    @property
    def complete(self) -> bool:
        return not self.volumes_missing


def _check_pack_sizes(volume: Volume) -> None:
    for number, size in enumerate(volume.index.pack_sizes, start=1):
        path = volume.pack_path(number)
        try:
            actual = path.stat().st_size
        except FileNotFoundError as e:
            raise TruncatedError(f"{pack_name(number)} is missing", volume=volume.name) from e
        except OSError as e:
            raise MediaError(f"cannot stat {path}: {e}") from e
        if actual < size:
            raise TruncatedError(
                f"{pack_name(number)} is {actual} bytes, the index says {size}",
                volume=volume.name, offset=actual,
            )
        if actual > size:
            raise FormatError(
                f"{volume.name}: {pack_name(number)} is {actual} bytes, the index says {size}"
            )


def _open_pack(volume: Volume, number: int) -> BinaryIO:
    path = volume.pack_path(number)
    try:
        return path.open("rb")
    except FileNotFoundError as e:
        raise TruncatedError(f"{pack_name(number)} is missing", volume=volume.name) from e
    except OSError as e:
        raise MediaError(f"cannot open {path}: {e}") from e


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
        _check_pack_sizes(volume)
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
