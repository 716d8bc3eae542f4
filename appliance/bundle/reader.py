"""Open bundle media, authenticate it against a trust root, read and verify chunks.

The order of trust (DESIGN.md): read small files with caps, walk the carried trust chain from
the host's root, count valid signatures over the exact manifest bytes, and only then parse
the manifest; then scope and expiry; then cross-check each volume's index against the signed
chunk list. Chunks are only ever returned after their BLAKE3 matched the manifest.

Public API (used by the importer, peers and the CLI):

- ``open_media(volume_dirs, limits) -> Media``: reads manifest, signatures and the head of
  each volume's index (``parse_index_head``), and lists the carried trust roots; no trust
  decision, no root body, no index entry and no chunk read yet. A directory may be a
  volume or a media directory holding ``vol-NNN`` volumes.
- ``Media.authenticate(trusted_root, now, *, allow_expired=False) -> AuthenticatedBundle``:
  ``appliance.authenticate.authenticate_manifest`` over what the volumes carry, then each
  volume's full index, read and parsed only now, against the signed chunk list
- ``Media.locations(digest) -> list[ChunkLocation]`` (``MissingVolumeError`` when the chunk
  lives only on volumes not given), ``Media.holder(digest)`` (the volume that stores it),
  ``Media.volumes_present`` / ``volumes_expected`` / ``volumes_missing``
- ``read_chunk(location, ref, limits, *, file=None) -> bytes``: bounded, decompressed,
  checked (``IntegrityError`` / ``TruncatedError`` / ``DecompressionError``);
  ``check_location`` is its first step, for readers that copy a raw chunk themselves
- ``check_pack_sizes(volume)``: every pack as long as its checked index says, before any
  chunk is read (``appliance.bundle.verify`` and the importer call it)

Verifying every byte of the volumes given is ``appliance.bundle.verify.verify_media``.

Work before authentication is bounded whatever the media holds: files are read with caps,
every file is refused unless it is a regular file (``SpecialFileError``: a FIFO cannot block,
/dev/zero cannot be read without end), a carried root's body is parsed only once a trusted
root's keys signed it (``walk_carried_roots``), and an index's entries, which may be millions,
are not read until the signatures met their threshold and the signed manifest says how many
to expect.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from appliance.authenticate import AuthenticatedBundle, authenticate_manifest
from appliance.bundle.media import (
    INDEX_NAME,
    MANIFEST_NAME,
    MAX_INDEX_HEAD_BYTES,
    PACKS_DIR,
    VolumeIndex,
    decompress_chunk,
    pack_name,
    parse_index,
    parse_index_head,
    read_stored,
    volume_name,
)
from appliance.bundle.volume_files import (
    list_chain,
    read_chain,
    read_signatures,
    refuse_special,
    walk_carried_roots,
)
from appliance.chunks import check_chunk
from appliance.errors import (
    FormatError,
    MediaError,
    MissingVolumeError,
    TruncatedError,
    UsageError,
)
from appliance.format.chunklist import DigestIndex
from appliance.format.manifest import (
    ChunkRef,
    Manifest,
    manifest_hash,
    parse_manifest,
)
from appliance.format.signing import Signature
from appliance.format.trust import (
    SignedRoot,
    TrustRoot,
)
from appliance.fsutil import open_regular, pread_exact, read_capped
from appliance.limits import DEFAULT_LIMITS, Limits


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    """Where a stored chunk sits: volume name, pack file, offset, stored bytes, compressed."""

    volume: str
    pack: Path
    offset: int
    stored_length: int
    compressed: bool


@dataclass(frozen=True)
class Volume:
    """One volume. Until ``Media.authenticate``, ``index`` is the head only (no entries), and
    the carried roots are only listed (``root_files``: version, path)."""

    path: Path
    index: VolumeIndex
    signatures: tuple[Signature, ...]
    root_files: tuple[tuple[int, Path], ...]
    limits: Limits = field(default=DEFAULT_LIMITS, compare=False)

    @functools.cached_property
    def chain(self) -> tuple[SignedRoot, ...]:
        """Every carried root, read and parsed (no trust implied): for showing what the
        media says and for use after authentication, which walks them lazily instead."""
        return read_chain(self.path, self.limits)

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
        # lexists, not is_file: a FIFO or a directory named manifest.yaml is a volume to
        # refuse (SpecialFileError when it is read), not a reason to look elsewhere.
        if os.path.lexists(path / MANIFEST_NAME):
            out.append(path)
            continue
        volumes = sorted(p for p in path.glob("vol-*")
                         if p.is_dir() and os.path.lexists(p / MANIFEST_NAME))
        if not volumes:
            raise MediaError(
                f"{path} holds no bundle: no {MANIFEST_NAME} in it or in any vol-NNN folder"
            )
        out.extend(volumes)
    return out


def _read_index_head(volume_dir: Path, limits: Limits) -> VolumeIndex:
    """The index's header and tables: at most ``MAX_INDEX_HEAD_BYTES`` read, whatever its size."""
    what = f"volume index of {volume_dir}"
    fd = open_regular(volume_dir / INDEX_NAME, what)
    try:
        size = os.fstat(fd).st_size
        head = pread_exact(fd, min(size, MAX_INDEX_HEAD_BYTES), 0)
    except OSError as e:
        raise MediaError(f"cannot read {what}: {e}") from e
    finally:
        os.close(fd)
    return parse_index_head(head, size, limits, where=what)


def _check_packs_are_files(volume: Volume) -> None:
    refuse_special((volume.pack_path(n) for n in range(1, len(volume.index.pack_sizes) + 1)),
                    f"{volume.name}: a pack")


def open_volume(volume_dir: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, Volume]:
    """Manifest bytes and the volume's signatures, chain and index head (structure checked)."""
    manifest = read_capped(volume_dir / MANIFEST_NAME, limits.max_manifest_bytes,
                           f"manifest of {volume_dir}")
    volume = Volume(path=volume_dir, index=_read_index_head(volume_dir, limits),
                    signatures=read_signatures(volume_dir, limits),
                    root_files=list_chain(volume_dir, limits), limits=limits)
    _check_packs_are_files(volume)
    return manifest, volume


def _read_index(volume: Volume, limits: Limits) -> VolumeIndex:
    """The full index, read after authentication; its head must be the one read before."""
    where = f"volume index of {volume.path}"
    data = read_capped(volume.path / INDEX_NAME, limits.max_volume_index_bytes, where)
    index = parse_index(data, limits, where=where)
    if dataclasses.replace(index, entries=()) != dataclasses.replace(volume.index, entries=()):
        raise FormatError(f"{where} changed while it was being read")
    return index


class Media:
    """The volumes given of one bundle. Build with ``open_media``."""

    def __init__(self, manifest_bytes: bytes, volumes: Sequence[Volume], limits: Limits) -> None:
        self.manifest_bytes = manifest_bytes
        self.manifest_hash = manifest_hash(manifest_bytes)
        self.volumes = tuple(sorted(volumes, key=lambda v: v.index.volume))
        self.limits = limits
        self.volume_count = self.volumes[0].index.volume_count
        # Filled by authenticate, from index entries read only then: each unique chunk's
        # ordinal by digest (packed, not a dict: a manifest may hold 200k chunks); its place
        # follows from the volume table and that volume's index, see ``locations``.
        self._ordinals: DigestIndex | None = None
        self._packs: dict[tuple[int, int], Path] = {}  # one Path per pack, not per chunk

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
        chain = walk_carried_roots((f for v in self.volumes for f in v.root_files),
                                   trusted_root, self.limits)
        bundle = authenticate_manifest(self.manifest_bytes, self.signatures, chain,
                                       trusted_root, now, allow_expired=allow_expired,
                                       limits=self.limits)
        self._check_indexes(bundle.manifest)
        return bundle

    def _check_indexes(self, manifest: Manifest) -> None:
        unique = manifest.unique_chunks()
        for head in self.volumes:
            # Checked only now, after the signatures: a changed manifest is a signature
            # failure first, not an index complaint. Both come from the head, so the entries
            # read next number at most what the signed manifest holds.
            if head.index.manifest_hash.hex() != self.manifest_hash:
                raise FormatError(f"{head.name}: the volume index belongs to another manifest")
            if head.index.total_chunks != len(unique):
                raise FormatError(
                    f"{head.name}: index counts {head.index.total_chunks} chunks, the manifest "
                    f"{len(unique)}"
                )
        volumes = []
        for head in self.volumes:
            volume = dataclasses.replace(head, index=_read_index(head, self.limits))
            index = volume.index
            volumes.append(volume)
            share = unique[index.chunk_range().start:index.chunk_range().stop]
            # Compared one at a time: no list of every digest (a manifest may hold 200k).
            if len(share) != len(index.entries) or any(
                bytes.fromhex(ref.digest) != entry.digest
                for ref, entry in zip(share, index.entries, strict=True)
            ):
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
        self.volumes = tuple(volumes)
        self._ordinals = DigestIndex(unique)
        self._packs = {}

    def ordinal(self, digest: str) -> int | None:
        """The chunk's place in ``Manifest.unique_chunks()`` (known once authenticated)."""
        if self._ordinals is None:
            return None
        try:
            return self._ordinals.get(bytes.fromhex(digest))
        except ValueError:  # not hex: no chunk of this bundle
            return None

    def holder(self, digest: str) -> str | None:
        """The volume that stores a chunk of the signed manifest (known once authenticated)."""
        ordinal = self.ordinal(digest)
        if ordinal is None:
            return None
        return volume_name(self.volumes[0].index.volume_of(ordinal))

    def locations(self, digest: str) -> list[ChunkLocation]:
        """Where the chunk is stored on the volumes given; ``MissingVolumeError`` if nowhere."""
        ordinal = self.ordinal(digest)
        if ordinal is not None:
            number = self.volumes[0].index.volume_of(ordinal)
            for volume in self.volumes:
                if volume.index.volume == number:
                    e = volume.index.entries[ordinal - volume.index.chunk_range().start]
                    pack = self._packs.get((number, e.pack))
                    if pack is None:
                        pack = self._packs[number, e.pack] = volume.pack_path(e.pack)
                    return [ChunkLocation(volume=volume.name, pack=pack, offset=e.offset,
                                          stored_length=e.stored_length,
                                          compressed=e.compressed)]
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
    check_location(location, ref, limits)
    stored = read_stored(location.pack, location.offset, location.stored_length,
                         chunk=ref.digest, volume=location.volume)
    plain = check_stored(stored, location, ref, file=file)
    assert isinstance(plain, bytes)  # bytes in, bytes out
    return plain


def check_location(location: ChunkLocation, ref: ChunkRef, limits: Limits = DEFAULT_LIMITS
                   ) -> None:
    """``FormatError`` unless the stored length fits the signed chunk and the caps: never
    more than its plain length, exactly that when stored raw."""
    if location.stored_length > min(ref.length, limits.max_chunk_bytes) or (
        not location.compressed and location.stored_length != ref.length
    ):
        raise FormatError(
            f"{location.volume}: stored length {location.stored_length} does not fit chunk "
            f"{ref.digest} of {ref.length} bytes"
        )


def check_stored(stored: bytes | memoryview, location: ChunkLocation, ref: ChunkRef, *,
                 file: str | None = None, one_core: bool = False) -> bytes | memoryview:
    """Decompress (if needed) and hash stored bytes already read from a pack
    (``one_core``: see ``check_chunk``)."""
    plain: bytes | memoryview = stored
    if location.compressed:
        plain = decompress_chunk(stored, ref.length, chunk=ref.digest, volume=location.volume,
                                 offset=location.offset, pack=location.pack.name)
    check_chunk(plain, ref.digest, ref.length, file=file, volume=location.volume,
                offset=location.offset, pack=location.pack.name, one_core=one_core)
    return plain


# ---------------------------------------------------------------------------------------------
def check_pack_sizes(volume: Volume) -> None:
    """Every pack has the size the (checked) index says, before any chunk is read: a shorter
    or missing pack is a ``TruncatedError``, a longer one (padded: not what was built) a
    ``FormatError``. ``verify_media`` and the importer both call this."""
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
