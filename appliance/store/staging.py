"""One file being written into the store: staged, filled chunk by chunk, then published.

The ordering that keeps the index and the files agreeing after a SIGKILL or power loss:

1. the file row is committed (state ``staging``) BEFORE ``staging/<id>.part`` is created and
   preallocated, and the staging directory is fsynced;
2. ``write_chunk`` checks the chunk (``appliance.chunks.check_chunk``) and pwrites it at its
   offset (the ingest session splits this into ``pwrite_chunk`` on reader threads and
   ``record_chunk`` on the index thread; ``copy_chunk`` copies a chunk stored raw in a pack
   in the kernel and checks the bytes that landed, before it may be recorded); a chunk is
   marked done in the index only AFTER an fdatasync that started after its write returned
   (in the background every ``flush_bytes`` or every ``flush_chunks`` chunks, whichever comes
   first, and in ``flush``), so ``done = 1`` always means the bytes are durable and a SIGKILL
   loses a bounded amount of work even when the chunks are tiny (a crash before the commit
   just rewrites the chunk);
3. ``publish`` (every chunk done) takes the whole-file BLAKE3 (computed on the fly when the
   chunks came in file order, else by re-reading the file), fsyncs it, makes it read-only,
   renames it into ``models/<name>/<version>/<path>``, fsyncs both directories, and only then
   commits ``published`` in one transaction (with the model when it was its last file).
   A crash between the rename and the commit leaves a staging row whose staged file is gone
   and whose final file exists: ``Store.stage_file`` and ``gc`` finish that publish after
   re-verifying the file.

``WriteGate`` lets reader threads pwrite while the index thread records, and closes before the
files do. The whole-file hashes are ``appliance.store.filehash``'s.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from array import array
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from appliance.chunks import check_chunk
from appliance.errors import IntegrityError, StoreError
from appliance.format.fields import format_timestamp
from appliance.store import layout
from appliance.store.filehash import RunningHash, StoredChunk, hash_file
from appliance.store.filehash import verify_chunks as verify_chunks  # its callers import it here
from appliance.store.kernelcopy import MIN_KERNEL_COPY, ChunkExtent, map_range

# Chunks written but not yet marked done are fsynced and committed once they add up to this
# many bytes, or to this many chunks (a manifest of many tiny chunks: bounded loss on SIGKILL).
DEFAULT_FLUSH_BYTES = 64 * 1024 * 1024
DEFAULT_FLUSH_CHUNKS = 1024


def _now(now: datetime | None) -> str:
    return format_timestamp(now or datetime.now(UTC))


class StagedFile:
    """A file of a model under import. Use ``Store.stage_file`` to get one."""

    def __init__(
        self,
        *,
        conn: sqlite3.Connection,
        store_dir: Path,
        file_id: int,
        model_id: int,
        model_name: str,
        model_version: str,
        path: str,
        size: int,
        state: str,
        flush_bytes: int = DEFAULT_FLUSH_BYTES,
        flush_chunks: int = DEFAULT_FLUSH_CHUNKS,
    ) -> None:
        self.conn = conn
        self.store_dir = store_dir
        self.file_id = file_id
        self.model_id = model_id
        self.model_name = model_name
        self.model_version = model_version
        self.path = path
        self.size = size
        self.state = state
        self.flush_bytes = flush_bytes
        self.flush_chunks = max(1, flush_chunks)
        self.staged = layout.staged_path(store_dir, file_id)
        self.final = layout.published_path(store_dir, model_name, model_version, path)
        self._fd: int | None = None
        self._write_lock = threading.Lock()  # held while writing the staged file
        # Whole-file BLAKE3 computed on the fly while chunks arrive in file order from the
        # start (the usual single pass), on its own thread so it overlaps the writes;
        # anything else falls back to re-reading the file at publish.
        self._running: RunningHash | None = RunningHash()
        self._unflushed: list[int] = []
        self._unflushed_bytes = 0
        # One background fdatasync at a time, so copying goes on while the disk catches up;
        # its chunks are committed as done only once it has returned.
        self._syncing: tuple[list[int], int, Future[None]] | None = None
        self._sync_pool: ThreadPoolExecutor | None = None
        # Indexed by idx (0, 1, ... in file order), packed: raw digests in one bytes, offsets
        # and lengths in arrays (48 bytes a chunk, not a StoredChunk and its strings: a
        # manifest may hold hundreds of thousands of tiny chunks). ``chunk`` makes one.
        digests = bytearray()
        self._offsets: array[int] = array("Q")
        self._lengths: array[int] = array("Q")
        rows = conn.execute(
            "SELECT idx, byte_offset, length, digest FROM chunks WHERE file = ? ORDER BY idx",
            (file_id,),
        )
        for i, row in enumerate(rows):
            if row["idx"] != i:
                raise StoreError(f"the index lists the chunks of {self.label} out of order")
            try:
                digests += bytes.fromhex(row["digest"])
            except (TypeError, ValueError) as e:
                raise StoreError(f"the index holds a malformed digest for {self.label}") from e
            self._offsets.append(row["byte_offset"])
            self._lengths.append(row["length"])
        self._digests = bytes(digests)

    @property
    def label(self) -> str:
        return f"{self.model_name}:{self.model_version}/{self.path}"

    @property
    def is_published(self) -> bool:
        return self.state == "published"

    def pending_indexes(self) -> list[int]:
        """The idx of each chunk not yet durable in the staged file, in file order."""
        if self.is_published:
            return []
        rows = self.conn.execute(
            "SELECT idx FROM chunks WHERE file = ? AND done = 0 ORDER BY idx", (self.file_id,)
        )
        unflushed = set(self._unflushed) | set(self._syncing[0] if self._syncing else ())
        return [r["idx"] for r in rows if r["idx"] not in unflushed]

    def pending(self) -> list[StoredChunk]:
        """Chunks not yet durable in the staged file, in file order."""
        return [self.chunk(idx) for idx in self.pending_indexes()]

    def chunk(self, idx: int) -> StoredChunk:
        return StoredChunk(idx, self._offsets[idx], self._lengths[idx],
                           self._digests[32 * idx:32 * idx + 32].hex())

    def all_chunks(self) -> list[StoredChunk]:
        return [self.chunk(idx) for idx in range(len(self._lengths))]

    def open(self) -> None:
        """Create (or reopen) the staged file, preallocated to its final size."""
        if self._fd is not None or self.is_published:
            return
        existed = self.staged.exists()
        try:
            fd = os.open(self.staged, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise layout.os_error(e, f"cannot create {self.staged}", needed=self.size) from e
        try:
            if os.fstat(fd).st_size != self.size or not existed:
                if os.fstat(fd).st_size > self.size:
                    os.ftruncate(fd, self.size)
                if self.size:
                    try:
                        os.posix_fallocate(fd, 0, self.size)
                    except OSError as e:
                        if layout.is_disk_full(e):
                            raise
                        os.ftruncate(fd, self.size)  # the filesystem cannot preallocate
                os.fsync(fd)
                layout.fsync_dir(self.staged.parent)
        except OSError as e:
            os.close(fd)
            if not existed:
                # Give the space back; the row stays 'staging' and the next run recreates it.
                self.staged.unlink(missing_ok=True)
            raise layout.os_error(
                e, f"cannot preallocate {self.size} bytes for {self.label}", needed=self.size
            ) from e
        self._fd = fd

    def write_chunk(self, idx: int, data: bytes, *, checked: bool = False) -> None:
        """Check the chunk against the manifest's hash and pwrite it at its offset.

        ``checked=True`` skips the hash when the caller has just verified ``data`` against
        this chunk's digest (``Store.read_local_chunk`` does); the length is always checked.
        """
        chunk = self.chunk(idx)
        if not checked:
            check_chunk(data, chunk.digest, chunk.length, file=self.label, offset=chunk.offset)
        self.open()
        self.pwrite_chunk(idx, data)
        self.record_chunk(idx, data)

    def pwrite_chunk(self, idx: int, data: bytes | memoryview) -> None:
        """Only the pwrite of bytes ``check_chunk`` passed; safe from any thread once ``open()``.

        The chunk counts as written only after ``record_chunk`` (on the index thread), so a
        crash or an error in between just means it is written again.
        """
        length, offset = self._lengths[idx], self._offsets[idx]
        if len(data) != length:  # the offsets of the neighbours depend on it
            raise IntegrityError(
                f"chunk is {len(data)} bytes, the signed manifest says {length}",
                chunk=self.chunk(idx).digest,
                file=self.label,
            )
        fd = self._fd
        if fd is None:
            raise StoreError(f"{self.label} is not open for writing")
        view = memoryview(data)
        written = 0
        try:
            # Writes to one file take its inode lock in the kernel, where a second writer
            # thread spun on it (13 % more CPU importing 6.35 GB); here it sleeps, or hashes.
            with self._write_lock:
                while written < len(data):
                    written += os.pwrite(fd, view[written:], offset + written)
        except OSError as e:
            raise layout.os_error(e, f"cannot write {self.label}", needed=length) from e

    def copy_chunk(self, idx: int, extent: ChunkExtent) -> bytes | memoryview:
        """Chunk ``idx`` from ``extent`` into the staged file, checked by ``extent`` where it
        landed; safe from any thread once ``open()``. Returns the checked bytes for
        ``record_chunk``: a read-only view of the staged file when the kernel copied them
        (no copy through user space), else what ``extent.read`` gave, pwritten."""
        length, offset = self._lengths[idx], self._offsets[idx]
        if extent.length != length:
            raise IntegrityError(
                f"chunk is {extent.length} bytes, the signed manifest says {length}",
                chunk=self.chunk(idx).digest, file=self.label,
            )
        fd = self._fd
        if fd is None:
            raise StoreError(f"{self.label} is not open for writing")
        copied = False
        if length >= MIN_KERNEL_COPY:
            with self._write_lock:  # see pwrite_chunk
                copied = extent.copy_into(fd, offset)
        if copied:
            try:
                view = map_range(fd, offset, length)
            except (OSError, ValueError) as e:
                raise layout.os_error(e, f"cannot map {self.label}") from e
            extent.check(view)  # what landed, not what the source meant to give
            return view
        data = extent.read()
        self.pwrite_chunk(idx, data)
        return data

    def record_chunk(self, idx: int, data: bytes | memoryview) -> None:
        """Note a chunk ``pwrite_chunk`` wrote (flushing when enough has accumulated)."""
        if self._running is not None and not self._running.feed(self._offsets[idx], data):
            self._running = None
        self._unflushed.append(idx)
        self._unflushed_bytes += self._lengths[idx]
        self._settle(wait=False)
        due = (self._unflushed_bytes >= self.flush_bytes
               or len(self._unflushed) >= self.flush_chunks)
        # While a sync runs, chunks gather for the next one instead of this (index) thread
        # waiting for it: with a small flush_bytes (a pull: 1 MiB) waiting put every chunk
        # behind an fdatasync. Once DEFAULT_FLUSH_BYTES (or flush_chunks chunks) gathered it
        # waits, so what a SIGKILL can lose stays one batch syncing plus one filling.
        if due and (self._syncing is None
                    or self._unflushed_bytes >= max(self.flush_bytes, DEFAULT_FLUSH_BYTES)
                    or len(self._unflushed) >= self.flush_chunks):
            self._start_sync()

    def _start_sync(self) -> None:
        """fdatasync in the background what has been written so far (one sync at a time)."""
        self._settle(wait=True)
        fd = self._fd
        assert fd is not None
        if self._sync_pool is None:
            self._sync_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="file-sync")
        batch, size = self._unflushed, self._unflushed_bytes
        self._unflushed, self._unflushed_bytes = [], 0
        self._syncing = (batch, size, self._sync_pool.submit(os.fdatasync, fd))

    def _settle(self, *, wait: bool) -> None:
        """Commit the chunks of a background sync that has finished (or wait for it)."""
        if self._syncing is None:
            return
        batch, _size, future = self._syncing
        if not wait and not future.done():
            return
        self._syncing = None
        try:
            future.result()
        except OSError as e:
            raise layout.os_error(e, f"cannot flush {self.label}") from e
        self._commit_done(batch)

    @contextlib.contextmanager
    def _index_write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction; a sqlite error rolls it back and says ``what`` failed."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            yield self.conn
            self.conn.execute("COMMIT")
        except sqlite3.Error as e:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise layout.os_error(e, what) from e

    def _commit_done(self, batch: list[int]) -> None:
        with self._index_write("cannot record written chunks in the index") as conn:
            conn.executemany(
                "UPDATE chunks SET done = 1 WHERE file = ? AND idx = ?",
                [(self.file_id, idx) for idx in batch],
            )

    def flush(self) -> None:
        """fsync the staged file, then mark every chunk written so far as done."""
        self._settle(wait=True)
        if not self._unflushed:
            return
        assert self._fd is not None
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise layout.os_error(e, f"cannot flush {self.label}") from e
        batch = self._unflushed
        self._unflushed, self._unflushed_bytes = [], 0
        self._commit_done(batch)

    def _stop_syncing(self) -> None:
        """Wait for a background sync without committing its chunks (they will be redone)."""
        syncing, self._syncing = self._syncing, None
        if syncing is not None:
            with contextlib.suppress(OSError):
                syncing[2].result()
        if self._sync_pool is not None:
            self._sync_pool.shutdown(wait=True)
            self._sync_pool = None

    def done_bytes(self) -> int:
        row = self.conn.execute(
            "SELECT COALESCE(SUM(length), 0) AS n FROM chunks WHERE file = ? AND done = 1",
            (self.file_id,),
        ).fetchone()
        syncing = self._syncing[1] if self._syncing else 0
        return int(row["n"]) + self._unflushed_bytes + syncing

    def _drop_running(self) -> None:
        running, self._running = self._running, None
        if running is not None:
            running.result(None)

    def close(self) -> None:
        """Flush what was written (so it is not redone) and close the staged file."""
        self._drop_running()
        try:
            if self._fd is not None:
                self.flush()
        finally:
            self._stop_syncing()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def abort(self) -> None:
        """Close without flushing: chunks written since the last flush will be written again."""
        self._drop_running()
        self._stop_syncing()
        self._unflushed.clear()
        self._unflushed_bytes = 0
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def publish(self, now: datetime | None = None) -> bool:
        """Move the complete file into place; return True when this completed its model."""
        if self.is_published:
            return False
        self.open()
        self.flush()
        self._stop_syncing()
        assert self._fd is not None
        left = self.conn.execute(
            "SELECT COUNT(*) AS n FROM chunks WHERE file = ? AND done = 0", (self.file_id,)
        ).fetchone()["n"]
        if left:
            raise StoreError(f"cannot publish {self.label}: {left} chunks are not written yet")
        try:
            os.fsync(self._fd)
            os.fchmod(self._fd, 0o444)
        except OSError as e:
            raise layout.os_error(e, f"cannot flush {self.label}") from e
        finally:
            os.close(self._fd)
            self._fd = None
        running, self._running = self._running, None
        whole = running.result(self.size) if running is not None else None
        if whole is None:
            whole = hash_file(self.staged, self.size)
        try:
            layout.make_parents(self.store_dir, self.final)
            os.rename(self.staged, self.final)
            layout.fsync_dir(self.final.parent)
            layout.fsync_dir(self.staged.parent)
        except OSError as e:
            raise layout.os_error(e, f"cannot publish {self.label}") from e
        return self.mark_published(whole, now)

    def mark_published(self, whole_blake3: str, now: datetime | None = None) -> bool:
        """Commit the publish of a file already renamed into place."""
        stamp = _now(now)
        with self._index_write(f"cannot record the publish of {self.label}") as conn:
            conn.execute(
                "UPDATE files SET state = 'published', blake3 = ?, verified_at = ? WHERE id = ?",
                (whole_blake3, stamp, self.file_id),
            )
            conn.execute("UPDATE chunks SET done = 1 WHERE file = ?", (self.file_id,))
            left = conn.execute(
                "SELECT COUNT(*) AS n FROM files WHERE model = ? AND state != 'published'",
                (self.model_id,),
            ).fetchone()["n"]
            if not left:
                conn.execute(
                    "UPDATE models SET state = 'published', imported_at = ? WHERE id = ?",
                    (stamp, self.model_id),
                )
        self.state = "published"
        return not left


class WriteGate:
    """Reader and fetch threads pwrite into staged files (``pwrite_chunk``); once the transfer
    stops (done, failed or interrupted) ``close`` waits for writes in progress and refuses new
    ones, so nothing is written through a descriptor about to be closed (and the kernel may
    reuse). The ingest session holds one."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._active = 0
        self._closed = False

    def enter(self) -> bool:
        with self._cv:
            if self._closed:
                return False
            self._active += 1
            return True

    def leave(self) -> None:
        with self._cv:
            self._active -= 1
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            while self._active:
                self._cv.wait()
