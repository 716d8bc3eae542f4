"""Whole-file BLAKE3 of store files: hashed while written, hashed whole, re-checked by chunk.

``StoredChunk`` names a chunk of a stored file (staged or published). ``hash_file`` hashes a
file in blocks; ``verify_chunks`` re-checks a stored file against its signed chunks (store
verify, serve verify, a publish a crash cut short); ``RunningHash`` takes a staged file's
BLAKE3 on the fly while its chunks arrive in file order (``appliance.store.staging``).
"""

from __future__ import annotations

import mmap
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import blake3

from appliance.chunks import check_chunk
from appliance.errors import TruncatedError

_READ_BLOCK = 8 * 1024 * 1024
_HASH_BACKLOG = 4
_MAP_WINDOW = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """A chunk of a file in the store (staged or published): its place in the file and its
    signed digest. The manifest's side is ``ChunkRef``; media's is ``ChunkLocation``."""

    idx: int
    offset: int
    length: int
    digest: str


def hash_file(path: Path, size: int | None = None) -> str:
    """BLAKE3 of a whole file, read in blocks (flat memory)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    buf = bytearray(_READ_BLOCK)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            hasher.update(view[:n])
            total += n
    if size is not None and total != size:
        raise TruncatedError(f"{path} is {total} bytes, expected {size}", file=str(path))
    return hasher.hexdigest()


def verify_chunks(path: Path, chunks: list[StoredChunk], size: int, file_label: str, *,
                  expected: str | None = None) -> str:
    """Re-hash every chunk of a file on disk; return the whole-file BLAKE3 or raise.

    Raises TruncatedError when the file's size differs, IntegrityError naming the first chunk
    whose bytes differ.

    ``expected``: the whole-file BLAKE3 recorded when the file was published from chunks
    that each passed ``check_chunk``. The file is hashed whole first (memory-mapped, on
    every core, as ``b3sum`` does); equal means every byte is the one published, so every
    chunk still matches its signed digest (the recorded hash and the chunk list come from
    the same index). Only a file that differs is read again chunk by chunk, to name the
    first bad chunk: half the hashing, and no copy, for the files that are fine.

    This thread only reads (``pread``: a file cut short while mapped would be a SIGBUS, not
    an error); one thread checks the chunks and another takes the whole-file hash in file
    order, so the file is read once and the two hashes overlap (blake3 releases the GIL).
    At most ``_HASH_BACKLOG`` chunks are held, so memory stays flat.
    """
    if expected is not None and _hash_mapped(path, size, file_label) == expected:
        return expected
    whole = blake3.blake3()
    with open(path, "rb", buffering=0) as f, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-chunk") as checks, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-file") as hashes:
        actual = os.fstat(f.fileno()).st_size
        if actual != size:
            raise TruncatedError(
                f"file is {actual} bytes, expected {size}", file=file_label, offset=actual
            )
        fd = f.fileno()
        pending: deque[tuple[Future[None], Future[object]]] = deque()

        def settle() -> None:
            checked, hashed = pending.popleft()
            checked.result()  # in file order: the first bad chunk is the one named
            hashed.result()

        try:
            for chunk in sorted(chunks, key=lambda c: c.offset):
                data = os.pread(fd, chunk.length, chunk.offset)
                pending.append((
                    checks.submit(check_chunk, data, chunk.digest, chunk.length,
                                  file=file_label, offset=chunk.offset),
                    hashes.submit(whole.update, data),  # one thread: in file order
                ))
                while len(pending) > _HASH_BACKLOG:
                    settle()
            while pending:
                settle()
        except BaseException:
            for checked, hashed in pending:
                checked.cancel()
                hashed.cancel()
            raise
    return whole.hexdigest()


def _hash_mapped(path: Path, size: int, file_label: str) -> str:
    """BLAKE3 of a whole store file through memory maps, multithreaded; TruncatedError when
    its size is not ``size``. Store files are read-only and only the store writes them, so
    a map is safe here (a file cut short while mapped would raise SIGBUS, which is why media
    and the chunk-by-chunk pass use ``pread``)."""
    actual = path.stat().st_size
    if actual != size:
        raise TruncatedError(f"file is {actual} bytes, expected {size}", file=file_label,
                             offset=actual)
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb", buffering=0) as f:
        # Mapped a window at a time and unmapped after: a map of the whole file would count
        # all of it in the process's RSS (b3sum peaks at the file's size).
        for start in range(0, size, _MAP_WINDOW):
            length = min(_MAP_WINDOW, size - start)
            with mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=start) as window:
                hasher.update(window)
    return hasher.hexdigest()


class RunningHash:
    """BLAKE3 of a file's bytes fed in order from offset 0, hashed on one worker thread.

    At most ``_HASH_BACKLOG`` chunks wait for the hasher, so memory stays flat when hashing
    is slower than writing.
    """

    def __init__(self) -> None:
        self._hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self._upto = 0
        self._pool: ThreadPoolExecutor | None = None
        self._backlog: deque[Future[object]] = deque()

    def feed(self, offset: int, data: bytes | memoryview) -> bool:
        """Hash ``data`` if it continues the file; False (and stop) if it does not."""
        if offset != self._upto:
            self.result(None)
            return False
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="file-hash")
        self._backlog.append(self._pool.submit(self._hasher.update, data))
        self._upto += len(data)
        while len(self._backlog) > _HASH_BACKLOG:
            self._backlog.popleft().result()
        return True

    def result(self, size: int | None) -> str | None:
        """Wait for the hasher; the hex digest if it covered exactly ``size`` bytes."""
        while self._backlog:
            self._backlog.popleft().result()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        return self._hasher.hexdigest() if size is not None and self._upto == size else None
