"""The few file-system moves every writer and reader of the appliance makes the same way.

- ``write_atomic``: temporary name in the same directory, full write, fsync, rename, then
  fsync of the directory, so a reader sees the old file or the new one, never half of one.
- ``create_exclusive``: a new file that must not exist yet (key files, CA keys, certs):
  ``O_EXCL | O_NOFOLLOW`` so neither an existing file nor a planted symlink is written
  through, ``fchmod`` to the exact mode whatever the umask, full writes, fsync.
- ``fsync_dir``: make a directory's new or renamed entries durable.
- ``open_regular`` / ``read_capped``: open a file from untrusted media only when it is a
  regular file (a symlink to one is fine). A FIFO, device, socket or directory is refused
  with ``SpecialFileError`` before any read, and the open itself uses ``O_NONBLOCK`` so a
  FIFO swapped in after the check cannot block either: the descriptor is checked again with
  ``fstat``. ``read_capped`` then reads at most the cap, refusing a bigger file before
  reading it.

Functions that write raise ``OSError`` for their callers to translate into the error their
users act on (``StoreError``, ``KeyFileError``, ``MediaError``...); the readers raise
``ApplianceError`` subclasses because they are used on media, where those are the answer.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import stat
import threading
from pathlib import Path

from appliance.errors import ApplianceError, LimitExceededError, MediaError, SpecialFileError

ErrorClass = type[ApplianceError]


def fsync_dir(path: Path, *, strict: bool = True) -> None:
    """fsync a directory. With ``strict=False`` errors are ignored: some file systems (FAT on
    some kernels, a few FUSE mounts) refuse a directory fsync, and media writes can live
    with that while the store cannot."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def create_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` holding ``data`` with exactly ``mode``; ``FileExistsError`` if it exists
    (or is a symlink, dangling or not). A partly written file is removed on failure."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; say exactly what we mean
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644, sync_dir: bool = True,
                 strict_dir_sync: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically: tmp + fsync + rename (+ directory fsync)."""
    # Named for this process and thread, so two writers of one file never share a temporary.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by a crash of an earlier process with this pid: ours to remove
    create_exclusive(tmp, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        fsync_dir(path.parent, strict=strict_dir_sync)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_regular(path: Path, what: str, *, error: ErrorClass = MediaError,
                 missing: ErrorClass | None = None,
                 special: ErrorClass = SpecialFileError) -> int:
    """A read-only descriptor of ``path`` if it is a regular file (symlinks followed).

    ``SpecialFileError`` for a FIFO, device, socket or directory, decided by ``stat`` before
    opening and again by ``fstat`` on the descriptor (``special`` names another class for a
    file the user named, where it is a usage mistake rather than hostile media); ``missing``
    (default ``error``) when it does not exist, ``error`` when it is unreadable. Never blocks
    on a FIFO (``O_NONBLOCK``).
    """
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise special(f"{what} ({path}) is {_kind(mode)}, not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise (missing or error)(f"{what} {path} does not exist") from e
    except OSError as e:
        raise error(f"cannot read {what} ({path}): {e}") from e
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise error(f"cannot read {what} ({path}): {e}") from e
    if not stat.S_ISREG(mode):  # swapped between the stat and the open
        os.close(fd)
        raise special(f"{what} ({path}) is {_kind(mode)}, not a regular file")
    return fd


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes at ``offset``; fewer only when the file ends first."""
    parts: list[bytes] = []
    got = 0
    while got < length:
        part = os.pread(fd, length - got, offset + got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_capped(path: Path, cap: int, what: str, *, error: ErrorClass = MediaError,
                missing: ErrorClass | None = None, special: ErrorClass = SpecialFileError,
                too_big: ErrorClass = LimitExceededError) -> bytes:
    """A whole small regular file, refused before reading when it is over ``cap`` bytes
    (``too_big``); ``SpecialFileError`` for anything but a regular file, ``missing`` (default
    ``error``) when there is none, ``error`` when it cannot be read."""
    fd = open_regular(path, what, error=error, missing=missing, special=special)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise too_big(f"{what} is {size} bytes, over the cap of {cap}")
        # One read of the whole file (plus a byte, to see it grow) is the usual case and
        # holds the bytes once; joining many small reads would hold them twice.
        parts = [os.read(fd, size + 1)]
        total = len(parts[0])
        while parts[-1] and total <= cap:
            parts.append(os.read(fd, cap + 1 - total))
            total += len(parts[-1])
    except OSError as e:
        raise error(f"cannot read {what} ({path}): {e}") from e
    finally:
        os.close(fd)
    if total > cap:  # grew while we read it
        raise too_big(f"{what} is over the cap of {cap}")
    return parts[0] if len(parts) == 1 or not any(parts[1:]) else b"".join(parts)


# How much a file being written may gather before its writeback is started (start_writeback).
WRITEBACK_BYTES = 64 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages out, without waiting (Linux
    ``sync_file_range``; elsewhere nothing: the fsync at close does it all). Called as a file
    grows, it keeps the disk busy meanwhile, so the closing fsync finds little left."""
    libc = _libc()
    if libc is not None:
        libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), _SYNC_FILE_RANGE_WRITE)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.sync_file_range  # noqa: B018 - absent off Linux
    except (OSError, AttributeError):
        return None
    return libc
