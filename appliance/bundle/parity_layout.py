"""Parity volume layout: names, the ``parity.bin`` header, and volume streams.

A data volume's **stream** is its packs concatenated in order; ``StreamReader`` reads it
block by block (zeros after its end, as the code pads it) and ``StreamWriter`` cuts a rebuilt
stream back into packs of the sizes its index gives. ``ParityHeader`` is the fixed header of
``parity.bin`` (docs/FORMAT.md, "Parity volumes"). Used by ``appliance.bundle.parity`` (writing) and
``appliance.bundle.parity_rebuild`` (reading).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from appliance.bundle.media import MANIFEST_NAME, PACKS_DIR, pack_name
from appliance.errors import FormatError, MediaError, TruncatedError
from appliance.format.parity_field import MAX_SHARES
from appliance.limits import MiB

PARITY_NAME = "parity.bin"
INDEXES_DIR = "indexes"
BLOCK_BYTES = 1 * MiB
PARITY_MAGIC = b"APPLPAR\x00"
PARITY_VERSION = 1
# magic, version, share, k (data volumes), m (all shares), block size, stripes
HEADER = struct.Struct("<8sIIIIQQ")
U64 = struct.Struct("<Q")


def parity_volume_name(number: int) -> str:
    """``par-001`` ...: not ``vol-NNN``, so readers that know no parity never open one."""
    return f"par-{number:03d}"


def is_parity_volume(path: Path) -> bool:
    return os.path.lexists(path / PARITY_NAME) and os.path.lexists(path / MANIFEST_NAME)


@dataclass(frozen=True)
class ParityHeader:
    share: int
    data_volumes: int
    total_shares: int
    block_size: int
    stripes: int
    stream_lengths: tuple[int, ...]  # of each data volume, 1..k

    @property
    def size(self) -> int:
        return HEADER.size + U64.size * self.data_volumes

    def encode(self) -> bytes:
        return HEADER.pack(PARITY_MAGIC, PARITY_VERSION, self.share, self.data_volumes,
                            self.total_shares, self.block_size, self.stripes) + b"".join(
            U64.pack(n) for n in self.stream_lengths)


def parse_parity_header(data: bytes, where: str) -> ParityHeader:
    if len(data) < HEADER.size:
        raise FormatError(f"{where}: parity header is cut short")
    magic, version, share, k, m, block, stripes = HEADER.unpack_from(data)
    if magic != PARITY_MAGIC or version != PARITY_VERSION:
        raise FormatError(f"{where}: not an appliance parity file (version {version})")
    if not 1 <= k < m <= MAX_SHARES or not k <= share < m or block < 1:
        raise FormatError(f"{where}: parity header out of range (k={k}, m={m}, share={share})")
    if len(data) < HEADER.size + U64.size * k:
        raise FormatError(f"{where}: parity header is cut short")
    lengths = tuple(U64.unpack_from(data, HEADER.size + U64.size * i)[0] for i in range(k))
    if any(n > block * stripes for n in lengths):
        raise FormatError(f"{where}: a stream is longer than the stripes hold")
    return ParityHeader(share, k, m, block, stripes, lengths)


# ---------------------------------------------------------------------------------------------
# Streams: a data volume's packs read (or written) as one byte sequence


def pack_files(volume_dir: Path) -> list[Path]:
    packs = volume_dir / PACKS_DIR
    return sorted(p for p in packs.iterdir() if p.name.startswith("pack-")) if packs.is_dir() \
        else []


class StreamReader:
    """Block after block of the packs given, in order; zeros after the end."""

    def __init__(self, packs: Sequence[tuple[Path, int]], volume: str) -> None:
        self.packs = list(packs)
        self.volume = volume
        self._file: BinaryIO | None = None
        self._left = 0

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            if self._left == 0:
                if self._file is not None:
                    self._file.close()
                    self._file = None
                if not self.packs:
                    out += bytes(n - len(out))
                    break
                path, self._left = self.packs.pop(0)
                try:
                    self._file = path.open("rb")
                except FileNotFoundError as e:
                    raise TruncatedError(f"{path.name} is missing", volume=self.volume) from e
                except OSError as e:
                    raise MediaError(f"cannot read {path}: {e}") from e
                continue
            assert self._file is not None
            try:
                data = self._file.read(min(n - len(out), self._left))
            except OSError as e:
                raise MediaError(f"{self.volume}: cannot read {self._file.name}: {e}") from e
            if not data:
                raise TruncatedError(f"{Path(self._file.name).name} ends early",
                                     volume=self.volume)
            if not out and len(data) == n:  # the usual case: one read, no copy
                self._left -= n
                return data
            out += data
            self._left -= len(data)
        return bytes(out)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class StreamWriter:
    """Writes a rebuilt stream back into pack files of the sizes the index gives."""

    def __init__(self, volume_dir: Path, pack_sizes: Sequence[int]) -> None:
        (volume_dir / PACKS_DIR).mkdir(parents=True)
        self.packs = [(volume_dir / PACKS_DIR / pack_name(i), size)
                      for i, size in enumerate(pack_sizes, start=1)]
        self._file: BinaryIO | None = None
        self._left = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._left == 0:
                self._close()
                if not self.packs:
                    return  # the padding after the stream's end
                path, self._left = self.packs.pop(0)
                self._file = path.open("xb")
            assert self._file is not None
            n = min(len(view), self._left)
            self._file.write(view[:n])
            self._left -= n
            view = view[n:]

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._close()


def header_size(data_volumes: int) -> int:
    return HEADER.size + U64.size * data_volumes
