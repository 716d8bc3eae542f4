"""Chunk bytes from a pack into a staged file inside the kernel, checked where they landed.

A chunk stored raw in a pack (quantized weights mostly are: zstd saves nothing on them) need
not pass through user space: ``copy_range`` moves it with ``copy_file_range`` (as ``cp``
does), or, where the kernel refuses that pair of files (``EXDEV`` across filesystem types,
``EINVAL``, ``ENOSYS``), with ``splice`` through a pipe; ``map_range`` then maps the bytes
that landed in the staged file (ours: only the store writes it, so a map cannot be cut short
under us; media may be pulled out, which is why the import never maps packs) so the signed chunk
check and the whole-file hash read them straight from the page cache, with no copy either.
``sendfile`` is not tried: it writes at the descriptor's file position, which the reader
threads writing the same staged file would share.

``ChunkExtent`` is what a chunk source hands the ingest session for such a chunk: it can copy
itself into a descriptor, check the bytes that landed (``IntegrityError`` naming the chunk,
volume, pack and offset), or, when no kernel copy is possible, read itself the ordinary way.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from abc import ABC, abstractmethod

# Below this a chunk is read with pread: a map, its dup'ed descriptor and an fstat cost more
# than copying a few pages (a manifest may hold hundreds of thousands of tiny chunks).
MIN_KERNEL_COPY = 256 * 1024
_PIPE_SIZE = 1024 * 1024


class ChunkExtent(ABC):
    """A chunk's plain bytes, ``length`` of them, lying uncompressed in a file the source
    opens itself. ``check`` and ``read`` both run ``appliance.chunks.check_chunk``."""

    length: int

    @abstractmethod
    def copy_into(self, dst_fd: int, dst_offset: int) -> bool:
        """Copy the chunk to ``dst_fd`` at ``dst_offset`` in the kernel; False when that is not
        possible (nothing may have been written, or part of it: the caller rewrites it)."""

    @abstractmethod
    def check(self, data: bytes | memoryview) -> None:
        """``IntegrityError`` unless ``data`` are the chunk's signed bytes."""

    @abstractmethod
    def read(self) -> bytes:
        """The chunk's bytes, read and checked the ordinary way."""


def copy_range(src_fd: int, dst_fd: int, length: int, src_offset: int, dst_offset: int) -> int:
    """Copy ``length`` bytes between two regular files at the given offsets, in the kernel.

    Returns how many were copied: fewer when the source ends first, 0 when neither
    ``copy_file_range`` nor ``splice`` works for these files (the caller falls back to
    ``pread``/``pwrite``, which also names any I/O error properly). Neither descriptor's file
    position is used or moved."""
    try:
        return _copy_file_range(src_fd, dst_fd, length, src_offset, dst_offset)
    except OSError:
        pass  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP... or an I/O error the fallback will name
    try:
        return _splice(src_fd, dst_fd, length, src_offset, dst_offset)
    except OSError:
        return 0


def _copy_file_range(src_fd: int, dst_fd: int, length: int, src_offset: int,
                     dst_offset: int) -> int:
    done = 0
    while done < length:
        n = os.copy_file_range(src_fd, dst_fd, length - done, src_offset + done,
                               dst_offset + done)
        if not n:
            break  # the source ended
        done += n
    return done


def _splice(src_fd: int, dst_fd: int, length: int, src_offset: int, dst_offset: int) -> int:
    """File -> pipe -> file: page references move through the pipe, bytes are copied once."""
    r, w = os.pipe()
    try:
        with contextlib.suppress(OSError):  # a bigger pipe means fewer calls, not correctness
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        done = 0
        while done < length:
            got = os.splice(src_fd, w, min(length - done, _PIPE_SIZE),
                            offset_src=src_offset + done)
            if not got:
                break
            put = 0
            while put < got:
                put += os.splice(r, dst_fd, got - put, offset_dst=dst_offset + done + put)
            done += got
        return done
    finally:
        os.close(r)
        os.close(w)


def map_range(fd: int, offset: int, length: int) -> memoryview:
    """A read-only view of ``length`` (> 0) bytes at ``offset`` of a file only we write.

    The map starts at the page boundary below ``offset`` and is unmapped once the view and
    every slice of it are gone (nothing keeps mapped pages in the process for long)."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    window = mmap.mmap(fd, offset - start + length, access=mmap.ACCESS_READ, offset=start)
    return memoryview(window)[offset - start:]
