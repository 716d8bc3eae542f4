"""Chunk references and compact chunk lists: what a manifest's files are cut into.

Pure. ``ChunkRef(digest, length, offset)`` is one chunk; ``ChunkList`` holds a file's chunks
(or a bundle's unique chunks) packed, 48 bytes a chunk, making each ``ChunkRef`` on demand;
``DigestIndex`` finds a chunk's position in a ``ChunkList`` by digest in 36 bytes a chunk. A
manifest may hold hundreds of thousands of tiny chunks and stays in memory for a whole
import (issue 14), so nothing here keeps an object or a hex string per chunk.
``appliance.format.manifest`` re-exports ``ChunkRef`` and ``ChunkList``.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of a file: BLAKE3 ``digest`` (hex) of its plain bytes, ``length``, and its
    ``offset`` in the file (computed from the lengths before it, never stored)."""

    digest: str
    length: int
    offset: int


_DIGEST_BYTES = 32


class ChunkList(Sequence[ChunkRef]):
    """A file's chunks in file order, held compactly: the digests in one ``bytes``, lengths
    and offsets in two ``array('Q')``, 48 bytes a chunk instead of a ``ChunkRef`` and its
    strings (about 250). A manifest may hold hundreds of thousands of tiny chunks and stays
    in memory for the whole import; each ``ChunkRef`` is made when it is asked for.

    Compares equal to any sequence of the same ``ChunkRef``s (a tuple, another list)."""

    __slots__ = ("_digests", "_lengths", "_offsets")

    def __init__(self, chunks: Iterable[ChunkRef] = ()) -> None:
        digests = bytearray()
        self._lengths = array("Q")
        self._offsets = array("Q")
        for chunk in chunks:
            digests += bytes.fromhex(chunk.digest)
            self._lengths.append(chunk.length)
            self._offsets.append(chunk.offset)
        self._digests = bytes(digests)

    @classmethod
    def from_arrays(cls, digests: bytes, lengths: array[int], offsets: array[int]
                    ) -> ChunkList:
        """Adopt raw arrays: ``digests`` is 32 bytes per chunk, in the order of the others."""
        if len(digests) != _DIGEST_BYTES * len(lengths) or len(lengths) != len(offsets):
            raise ValueError("chunk arrays of different lengths")
        chunks = cls()
        chunks._digests, chunks._lengths, chunks._offsets = digests, lengths, offsets
        return chunks

    def digest_bytes(self, index: int) -> bytes:
        """The raw 32-byte digest of chunk ``index`` (no hex string made)."""
        start = _DIGEST_BYTES * range(len(self._lengths))[index]
        return self._digests[start:start + _DIGEST_BYTES]

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            rows = range(len(self._lengths))[index]
            if rows.step == 1:
                return ChunkList.from_arrays(
                    self._digests[_DIGEST_BYTES * rows.start:_DIGEST_BYTES * rows.stop],
                    self._lengths[index], self._offsets[index])
            return ChunkList(self[i] for i in rows)
        i = range(len(self._lengths))[index]  # IndexError, negative indexes
        return ChunkRef(self._digests[_DIGEST_BYTES * i:_DIGEST_BYTES * (i + 1)].hex(),
                        self._lengths[i], self._offsets[i])

    def __iter__(self) -> Iterator[ChunkRef]:
        digests = self._digests
        for i, (length, offset) in enumerate(zip(self._lengths, self._offsets, strict=True)):
            yield ChunkRef(digests[_DIGEST_BYTES * i:_DIGEST_BYTES * (i + 1)].hex(), length,
                           offset)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ChunkList):
            return (self._digests == other._digests and self._lengths == other._lengths
                    and self._offsets == other._offsets)
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other,
                                                                          strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))  # consistent with tuple equality; nothing hashes it often

    def raw_digests(self) -> Sequence[bytes]:
        """The 32-byte digests in order, each made when asked for (for Merkle roots)."""
        return _Digests(self)

    def __repr__(self) -> str:
        return f"ChunkList({len(self)} chunks)"


class _Digests(Sequence[bytes]):
    """The raw digests of a ``ChunkList``, for the Merkle root (no hex strings)."""

    def __init__(self, chunks: ChunkList) -> None:
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: Any) -> Any:
        return self.chunks.digest_bytes(index)




class DigestIndex:
    """Position by digest in a ``ChunkList`` of distinct chunks (``Manifest.unique_chunks``):
    the digests sorted in one ``bytes`` and their positions in an ``array``, searched by
    bisection. 36 bytes a chunk where a dict of 200k digests took about 120."""

    __slots__ = ("_ordinals", "_sorted")

    def __init__(self, chunks: ChunkList) -> None:
        order = sorted(range(len(chunks)), key=chunks.digest_bytes)
        self._sorted = b"".join(chunks.digest_bytes(i) for i in order)
        self._ordinals = array("Q", order)
        del order

    def get(self, digest: bytes) -> int | None:
        """The position of the chunk with this 32-byte digest, or None."""
        view = _SortedDigests(self._sorted, len(self._ordinals))
        at = bisect.bisect_left(view, digest)
        if at < len(self._ordinals) and view[at] == digest:
            return self._ordinals[at]
        return None


class _SortedDigests(Sequence[bytes]):
    def __init__(self, packed: bytes, count: int) -> None:
        self.packed = packed
        self.size = count

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: Any) -> Any:
        return self.packed[_DIGEST_BYTES * index:_DIGEST_BYTES * (index + 1)]
