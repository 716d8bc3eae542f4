"""Media layout: volume names, the binary volume index, and pack files of stored chunks.

A volume is a directory holding::

    manifest.yaml              the signed manifest (byte-identical on every volume)
    signatures/<key_id>.sig    detached signatures over the manifest
    trust/root-<N>.yaml        the trust-root chain needed to reach the signers
    index.bin                  this volume's index (format below)
    packs/pack-0001.zst ...    stored chunks, concatenated

A pack is the plain concatenation of stored chunks: each is either the chunk's bytes (raw) or
exactly one zstd frame whose content-size field equals the chunk length. The volume index is
not signed; it only says where to look. Every chunk read through it is checked against the
signed manifest (BLAKE3 of the plain bytes), and the index itself is checked for structure
(a BLAKE3 trailer, exact tiling of every pack, counts that agree with the file length), so a
lying index is a ``FormatError`` and a lying pack an ``IntegrityError``.

Before the manifest's signatures are checked only the index's header and tables are read
(``parse_index_head``: a small fixed amount whatever the file's size); the entries are
parsed afterwards, when their count is bounded by the signed manifest.

This module holds the pure index codec (``encode_index``, ``parse_index_head``,
``parse_index``), zstd with caps
(``compress_chunk``, ``decompress_chunk``), bounded pack reads (``read_stored``) and the pack
writer used by the builder. The exact byte layout is in docs/FORMAT.md, section
"Media layout, volume index and packs".
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import mmap
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import blake3
import zstandard

from appliance import fsutil
from appliance.errors import (
    DecompressionError,
    FormatError,
    LimitExceededError,
    MediaError,
    TruncatedError,
)
from appliance.limits import DEFAULT_LIMITS, MIN_COMPRESSION_SAVING, Limits

MANIFEST_NAME = "manifest.yaml"
SIGNATURES_DIR = "signatures"
SIGNATURE_SUFFIX = ".sig"
TRUST_DIR = "trust"
INDEX_NAME = "index.bin"
PACKS_DIR = "packs"

INDEX_MAGIC = b"APPLVIX\x00"
INDEX_VERSION = 1
MAX_VOLUMES = 9999
MAX_PACKS_PER_VOLUME = 9999
# Level 1: on quantized GGUF weights level 3 saves 0.25% more bytes (gemma3-270m Q4_K_M:
# 238.4 MB vs 239.0 MB stored of 253.1 MB) at about half the speed.
COMPRESSION_LEVEL = 1

# magic, version, volume number, volume count, pack count, entry count, total unique chunks,
# manifest hash
_HEADER = struct.Struct("<8sIIIIQQ32s")
# digest, pack number (1-based), offset in pack, stored length, flags
_ENTRY = struct.Struct("<32sIQIB")
_U64 = struct.Struct("<Q")
_TRAILER_BYTES = 32
FLAG_COMPRESSED = 0x01


def volume_name(number: int) -> str:
    """``vol-001`` for volume 1: the directory name the builder uses with --volume-size."""
    return f"vol-{number:03d}"


def pack_name(number: int) -> str:
    return f"pack-{number:04d}.zst"


def root_file_name(version: int) -> str:
    return f"root-{version}.yaml"


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """Where one chunk is stored in this volume."""

    digest: bytes  # 32-byte BLAKE3 of the plain chunk
    pack: int  # 1-based pack number in this volume
    offset: int  # byte offset in the pack
    stored_length: int  # bytes in the pack (compressed or raw)
    compressed: bool


class IndexEntries(Sequence[IndexEntry]):
    """A parsed index's entries kept as the index's own packed bytes (49 a chunk instead of
    an ``IndexEntry`` with its digest and ints, about 190): an index may list hundreds of
    thousands of tiny chunks and is held for the whole import. Each ``IndexEntry`` is made
    when asked for; compares equal to a tuple of the same entries."""

    __slots__ = ("_packed",)

    def __init__(self, packed: bytes) -> None:
        if len(packed) % _ENTRY.size:
            raise ValueError("packed index entries of a partial length")
        self._packed = packed

    def __len__(self) -> int:
        return len(self._packed) // _ENTRY.size

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(len(self))[index])
        i = range(len(self))[index]  # IndexError, negative indexes
        digest, pack, offset, stored, flags = _ENTRY.unpack_from(self._packed, i * _ENTRY.size)
        return IndexEntry(digest, pack, offset, stored, bool(flags))

    def __iter__(self) -> Iterator[IndexEntry]:
        for digest, pack, offset, stored, flags in _ENTRY.iter_unpack(self._packed):
            yield IndexEntry(digest, pack, offset, stored, bool(flags))

    def digest(self, index: int) -> bytes:
        """The digest of entry ``index`` alone."""
        start = range(len(self))[index] * _ENTRY.size
        return self._packed[start:start + 32]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, IndexEntries):
            return self._packed == other._packed
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other,
                                                                          strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))  # consistent with tuple equality

    def __repr__(self) -> str:
        return f"IndexEntries({len(self)} entries)"


@dataclass(frozen=True)
class VolumeIndex:
    """One volume's index.

    ``volume_starts[k]`` is the ordinal (in ``Manifest.unique_chunks()`` order) of the first
    chunk stored on volume k+1, so any reader can tell which volume holds any chunk, and the
    last volume ends at ``total_chunks``.
    """

    volume: int
    volume_count: int
    total_chunks: int
    manifest_hash: bytes
    volume_starts: tuple[int, ...]
    pack_sizes: tuple[int, ...]
    entries: Sequence[IndexEntry]  # IndexEntries when parsed; the builder's tuple
    # How many entries the index holds; ``entries`` is empty until they are read (a head
    # parsed before authentication, ``parse_index_head``). -1: len(entries).
    entry_count: int = -1

    def __post_init__(self) -> None:
        if self.entry_count < 0:
            object.__setattr__(self, "entry_count", len(self.entries))

    @property
    def name(self) -> str:
        return volume_name(self.volume)

    def chunk_range(self) -> range:
        """Ordinals of the unique chunks this volume stores."""
        start = self.volume_starts[self.volume - 1]
        end = (self.volume_starts[self.volume] if self.volume < self.volume_count
               else self.total_chunks)
        return range(start, end)

    def volume_of(self, ordinal: int) -> int:
        """The volume number holding the unique chunk with this ordinal."""
        return max(1, bisect.bisect_right(self.volume_starts, ordinal))


def encode_index(index: VolumeIndex) -> bytes:
    parts = [
        _HEADER.pack(
            INDEX_MAGIC, INDEX_VERSION, index.volume, index.volume_count, len(index.pack_sizes),
            len(index.entries), index.total_chunks, index.manifest_hash,
        )
    ]
    parts.extend(_U64.pack(s) for s in index.volume_starts)
    parts.extend(_U64.pack(s) for s in index.pack_sizes)
    parts.extend(
        _ENTRY.pack(e.digest, e.pack, e.offset, e.stored_length,
                    FLAG_COMPRESSED if e.compressed else 0)
        for e in index.entries
    )
    body = b"".join(parts)
    return body + blake3.blake3(body).digest()


# The most bytes a header and its two tables can take: what is read before authentication.
MAX_INDEX_HEAD_BYTES = _HEADER.size + _U64.size * (MAX_VOLUMES + MAX_PACKS_PER_VOLUME)


def parse_index_head(head: bytes, size: int, limits: Limits = DEFAULT_LIMITS, *,
                     where: str = "volume index") -> VolumeIndex:
    """The header and tables of an index of ``size`` bytes whose first bytes are ``head``.

    Reads no entry and builds nothing in proportion to the file: this is all of the index
    that is looked at before the manifest's signatures are checked. The result has no
    ``entries``; ``entry_count`` says how many the full index holds, and ``size`` must be
    exactly what the counts need, so the full read after authentication is bounded by the
    signed manifest's chunk count. ``LimitExceededError`` for caps, else ``FormatError``.
    """
    if size > limits.max_volume_index_bytes:
        raise LimitExceededError(
            f"{where} is {size} bytes, over the cap of {limits.max_volume_index_bytes}"
        )
    if size < _HEADER.size + _TRAILER_BYTES or len(head) < _HEADER.size:
        raise FormatError(f"{where} is too short ({size} bytes)")
    if head[:8] != INDEX_MAGIC:
        raise FormatError(f"{where} does not start with the index magic")
    (_, version, volume, volume_count, pack_count, entry_count, total_chunks,
     manifest_hash) = _HEADER.unpack_from(head, 0)
    if version != INDEX_VERSION:
        raise FormatError(f"{where}: unsupported index version {version}")
    if not 1 <= volume_count <= MAX_VOLUMES or not 1 <= volume <= volume_count:
        raise FormatError(f"{where}: volume {volume} of {volume_count} is impossible")
    if not 1 <= pack_count <= MAX_PACKS_PER_VOLUME:
        raise FormatError(f"{where}: {pack_count} packs")
    expected = (_HEADER.size + _U64.size * (volume_count + pack_count)
                + _ENTRY.size * entry_count)
    if expected + _TRAILER_BYTES != size:
        raise FormatError(
            f"{where}: declared counts need {expected} bytes, found {size - _TRAILER_BYTES}"
        )
    pos = _HEADER.size
    tables_end = pos + _U64.size * (volume_count + pack_count)
    if len(head) < tables_end:
        raise FormatError(f"{where} is too short for its tables")
    starts = tuple(v for (v,) in _U64.iter_unpack(head[pos:pos + _U64.size * volume_count]))
    pos += _U64.size * volume_count
    packs = tuple(v for (v,) in _U64.iter_unpack(head[pos:tables_end]))
    if starts[0] != 0 or any(b <= a for a, b in itertools.pairwise(starts)):
        raise FormatError(f"{where}: volume start ordinals do not increase from 0")
    if starts[-1] >= total_chunks:
        raise FormatError(f"{where}: the last volume starts past the last chunk")
    index = VolumeIndex(volume=volume, volume_count=volume_count, total_chunks=total_chunks,
                        manifest_hash=manifest_hash, volume_starts=starts, pack_sizes=packs,
                        entries=(), entry_count=entry_count)
    if len(index.chunk_range()) != entry_count:
        raise FormatError(
            f"{where}: {entry_count} entries, but the volume table gives this volume "
            f"{len(index.chunk_range())} chunks"
        )
    for pack_size in packs:
        if not 1 <= pack_size <= limits.max_pack_bytes:
            raise LimitExceededError(f"{where}: a pack of {pack_size} bytes is outside the caps")
    return index


def parse_index(data: bytes, limits: Limits = DEFAULT_LIMITS, *, where: str = "volume index"
                ) -> VolumeIndex:
    """Parse untrusted index bytes: size cap, checksum, magic and version, then every field.

    Raises ``LimitExceededError`` for caps and ``FormatError`` for everything else: a bad
    checksum (a flipped byte), counts that disagree with the length, entries that overlap,
    leave gaps or overrun their pack, duplicate chunks, unknown flags.
    """
    # A view, not a copy: an index of 200k entries is 10 MB.
    body, trailer = memoryview(data)[:-_TRAILER_BYTES], data[-_TRAILER_BYTES:]
    if _HEADER.size + _TRAILER_BYTES <= len(data) <= limits.max_volume_index_bytes and (
        blake3.blake3(body).digest() != trailer
    ):
        # Checked first: a flipped byte is "damaged" whichever field it lands in.
        raise FormatError(f"{where} checksum mismatch: the index is damaged")
    head = parse_index_head(data[:MAX_INDEX_HEAD_BYTES], len(data), limits, where=where)
    packs = head.pack_sizes
    pack_count = len(packs)
    pos = _HEADER.size + _U64.size * (head.volume_count + pack_count)
    seen: set[bytes] = set()
    pack, end = 1, 0
    for digest, pack_no, offset, stored, flags in _ENTRY.iter_unpack(body[pos:]):
        if flags & ~FLAG_COMPRESSED:
            raise FormatError(f"{where}: unknown flags {flags:#x} for chunk {digest.hex()}")
        if not 1 <= stored <= limits.max_chunk_bytes:
            raise LimitExceededError(f"{where}: stored length {stored} of chunk {digest.hex()}")
        if digest in seen:
            raise FormatError(f"{where}: chunk {digest.hex()} listed twice")
        seen.add(digest)
        if pack_no == pack + 1 and end == packs[pack - 1]:
            pack, end = pack_no, 0
        # Packs are tiled exactly: in order, no gap, no overlap, nothing past the end.
        if pack_no != pack or offset != end or offset + stored > packs[pack - 1]:
            raise FormatError(
                f"{where}: chunk {digest.hex()} at pack {pack_no} offset {offset} breaks the "
                f"pack tiling (expected pack {pack} offset {end})"
            )
        end = offset + stored
    if pack != pack_count or end != packs[-1]:
        raise FormatError(f"{where}: the entries do not fill every pack exactly")
    del seen
    return dataclasses.replace(head, entries=IndexEntries(bytes(body[pos:])))


# ---------------------------------------------------------------------------------------------
# zstd with caps. Contexts are not thread-safe, so each thread keeps its own.

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("cctx", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                                write_checksum=False)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def compress_chunk(data: bytes | memoryview, level: int = COMPRESSION_LEVEL
                   ) -> tuple[bytes | memoryview, bool]:
    """The bytes to store for a chunk and whether they are compressed.

    Raw when zstd saves less than ``MIN_COMPRESSION_SAVING``; so a compressed chunk is always
    shorter than its plain length, which lets readers cap every read at the chunk length.
    """
    packed = _compressor(level).compress(data)
    if len(packed) <= len(data) * (1 - MIN_COMPRESSION_SAVING):
        return packed, True
    return data, False


def decompress_chunk(stored: bytes | memoryview, length: int, *, chunk: str | None = None,
                     volume: str | None = None, offset: int | None = None,
                     pack: str | None = None) -> bytes:
    """One zstd frame -> exactly ``length`` bytes, never more (a bomb is an error, not an OOM).

    The frame must declare its content size, equal to ``length``, and hold nothing after it.
    Decompression goes into a buffer of exactly ``length`` bytes, so a frame whose blocks
    produce more than it declares fails in libzstd instead of growing memory.
    """
    def bad(message: str) -> DecompressionError:
        return DecompressionError(message, chunk=chunk, volume=volume, offset=offset)

    in_pack = f" in {pack}" if pack else ""
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as e:
        raise bad(f"not a zstd frame{in_pack}: {e}") from e
    if declared != length:
        raise bad(f"zstd frame{in_pack} declares {declared} bytes, the manifest says {length}")
    try:
        plain = _decompressor().decompress(stored, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise bad(f"invalid zstd frame{in_pack}: {e}") from e
    if len(plain) != length:
        raise bad(f"zstd frame{in_pack} gave {len(plain)} bytes, declared {length}")
    return plain


# ---------------------------------------------------------------------------------------------
# Packs


def read_stored(pack: BinaryIO | Path, offset: int, stored_length: int, *,
                chunk: str | None = None, volume: str | None = None) -> bytes:
    """Exactly ``stored_length`` bytes at ``offset`` of a pack, or ``TruncatedError``."""
    try:
        if isinstance(pack, Path):
            fd = fsutil.open_regular(pack, "pack file", missing=TruncatedError)
            try:
                data = fsutil.pread_exact(fd, stored_length, offset)
            finally:
                os.close(fd)
        else:
            pack.seek(offset)
            data = pack.read(stored_length)
    except TruncatedError as e:
        raise TruncatedError(f"pack file {pack} is missing", chunk=chunk, volume=volume,
                             offset=offset) from e
    except OSError as e:
        raise MediaError(f"cannot read pack {pack} at offset {offset}: {e}") from e
    if len(data) != stored_length:
        raise TruncatedError(
            f"pack {getattr(pack, 'name', pack)} ends after {len(data)} of {stored_length} "
            "bytes", chunk=chunk,
            volume=volume, offset=offset,
        )
    return data


class MappedRange:
    """A read-only memory map of ``length`` bytes at ``offset`` of an open file.

    Hashing and decompressing straight from the page cache avoids a copy per chunk (on the
    machines measured, 2-3x faster than ``read`` into a buffer). The map covers one chunk and
    is closed right after, so mapped pages never accumulate in the process's memory. The
    caller checks the file is long enough first (a map past the end is a ``TruncatedError``);
    a file cut short *while* mapped would raise SIGBUS, so the builder uses maps for local
    source files and the verifier for packs, while ``read_chunk`` (imports) uses ``read``.
    """

    def __init__(self, fileno: int, offset: int, length: int) -> None:
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        self._delta = offset - start
        try:
            self._map = mmap.mmap(fileno, self._delta + length, access=mmap.ACCESS_READ,
                                  offset=start)
        except ValueError as e:  # the file is shorter than offset + length
            raise TruncatedError(f"file ends before byte {offset + length}",
                                 offset=offset) from e
        self._view = memoryview(self._map)[self._delta:self._delta + length]

    @property
    def view(self) -> memoryview:
        return self._view

    def close(self) -> None:
        self._view.release()
        self._map.close()


# Packs are fsynced when closed; starting their writeback as they grow keeps the disk busy
# during the build, so that fsync finds little left to write (a 6 GB build spent 3 s in it).
_WRITEBACK_BYTES = fsutil.WRITEBACK_BYTES


class PackWriter:
    """Appends stored chunks to ``packs/pack-NNNN.zst`` in a volume directory, starting a new
    pack before one would exceed ``pack_size``. Records index entries as it goes."""

    def __init__(self, volume_dir: Path, pack_size: int) -> None:
        self.packs_dir = volume_dir / PACKS_DIR
        self.packs_dir.mkdir(parents=True, exist_ok=True)
        self.pack_size = pack_size
        self.entries: list[IndexEntry] = []
        self.pack_sizes: list[int] = []
        self._file: BinaryIO | None = None
        self.bytes_written = 0
        self._writeback_at = 0

    def _open_next(self) -> BinaryIO:
        self._close_current()
        self.pack_sizes.append(0)
        self._file = (self.packs_dir / pack_name(len(self.pack_sizes))).open("xb")
        return self._file

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def append(self, digest: bytes, stored: bytes | memoryview, compressed: bool) -> IndexEntry:
        if len(stored) > self.pack_size:
            raise MediaError(f"a stored chunk of {len(stored)} bytes exceeds the pack size")
        f = self._file
        if f is None or self.pack_sizes[-1] + len(stored) > self.pack_size:
            f = self._open_next()
        entry = IndexEntry(digest, len(self.pack_sizes), self.pack_sizes[-1], len(stored),
                           compressed)
        f.write(stored)
        self.pack_sizes[-1] += len(stored)
        self.bytes_written += len(stored)
        self.entries.append(entry)
        if self.bytes_written - self._writeback_at >= _WRITEBACK_BYTES:
            f.flush()
            fsutil.start_writeback(f.fileno())
            self._writeback_at = self.bytes_written
        return entry

    def close(self) -> None:
        self._close_current()

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def pack_paths(volume_dir: Path, count: int) -> Sequence[Path]:
    return [volume_dir / PACKS_DIR / pack_name(n) for n in range(1, count + 1)]
