"""Where the store keeps things on disk, and the low-level file rules every store module follows.

Layout under the store directory (docs/DESIGN.md, "Store internals"):

    index.sqlite (+ -wal, -shm)     the index (appliance.store.db)
    lock                            flock'ed by the one writer (import, pull, rm, verify, gc)
    models/<name>/<version>/<path>  published files, read-only, written once ("/" in a
                                    model name is written "~": org/model -> org~model)
    staging/<file id>.part          a file being imported, preallocated to its size
    quarantine/<stamp>-<file id>-<name>-<version>-<path>   files that failed a re-verify

This module also owns the translation of ENOSPC into ``DiskFullError``, so every writer gets
it the same way; the durability primitives (``fsync_dir``, strict here: the store must not
carry on when a directory cannot be made durable) come from ``appliance.fsutil``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from appliance.errors import DiskFullError, StoreError, UnsafePathError
from appliance.fsutil import fsync_dir
from appliance.store.location import check_store_path

MODELS_DIR = "models"
STAGING_DIR = "staging"
QUARANTINE_DIR = "quarantine"
LOCK_NAME = "lock"
STAGED_SUFFIX = ".part"
# Room kept free beyond the bytes an import needs: the index, its WAL and directory entries.
FREE_SPACE_MARGIN = 4 * 1024 * 1024


def models_dir(store_dir: Path) -> Path:
    return store_dir / MODELS_DIR


def staging_dir(store_dir: Path) -> Path:
    return store_dir / STAGING_DIR


def quarantine_dir(store_dir: Path) -> Path:
    return store_dir / QUARANTINE_DIR


def staged_path(store_dir: Path, file_id: int) -> Path:
    return staging_dir(store_dir) / f"{file_id}{STAGED_SUFFIX}"


def _safe_component(value: str, what: str) -> str:
    if not value or value in (".", "..") or "/" in value or "\\" in value or "\x00" in value:
        raise UnsafePathError(f"{what} {value!r} cannot be used as a directory name")
    return value


def relative_parts(path: str) -> tuple[str, ...]:
    """Split a manifest file path into safe components (the manifest parser checks too)."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or not pure.parts:
        raise UnsafePathError(f"file path {path!r} is not a relative path")
    for part in pure.parts:
        _safe_component(part, "file path component")
    return pure.parts


def name_dir(name: str) -> str:
    """A model name as one directory: "/" (allowed between name segments) becomes "~"."""
    return _safe_component(name.replace("/", "~"), "model name")


def model_dir(store_dir: Path, name: str, version: str) -> Path:
    return models_dir(store_dir) / name_dir(name) / _safe_component(version, "model version")


def published_path(store_dir: Path, name: str, version: str, path: str) -> Path:
    return model_dir(store_dir, name, version).joinpath(*relative_parts(path))


def quarantine_name(stamp: str, file_id: int, name: str, version: str, path: str) -> str:
    flat = "__".join(relative_parts(path))
    return f"{stamp}-{file_id}-{name_dir(name)}-{version}-{flat}"


def ensure_dirs(store_dir: Path) -> None:
    check_store_path(store_dir)  # a file where the store should be: say so, not "Errno 20"
    try:
        for sub in (models_dir(store_dir), staging_dir(store_dir), quarantine_dir(store_dir)):
            sub.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, f"cannot create the store directories in {store_dir}") from e


def make_parents(store_dir: Path, target: Path) -> None:
    """mkdir -p the parents of ``target`` and fsync every directory that gained an entry."""
    missing: list[Path] = []
    parent = target.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        fsync_dir(directory.parent)


def free_bytes(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(store_dir: Path, needed: int, what: str) -> None:
    """Raise DiskFullError before starting work that needs ``needed`` more bytes."""
    if needed <= 0:
        return
    free = free_bytes(store_dir)
    if needed + FREE_SPACE_MARGIN > free:
        raise DiskFullError(
            f"{what} needs {human_bytes(needed)} ({needed} bytes) plus "
            f"{human_bytes(FREE_SPACE_MARGIN)} of headroom in {store_dir}, but only "
            f"{human_bytes(free)} is free; free {human_bytes(needed + FREE_SPACE_MARGIN - free)}"
        )


def read_only_reason(store_dir: Path) -> str | None:
    """Why nothing can be written to the store, or None: a read-only mount (a write-protected
    disk, an ISO, ``mount -o ro``) or no write permission for this user. A store that does
    not exist yet is not read-only."""
    try:
        read_only_mount = bool(os.statvfs(store_dir).f_flag & os.ST_RDONLY)
    except OSError:
        return None
    if read_only_mount:
        return "it is on a read-only file system"
    index = store_dir / "index.sqlite"
    if not os.access(store_dir, os.W_OK) or (index.exists() and not os.access(index, os.W_OK)):
        return "this user may not write to it"
    return None


def read_only_error(store_dir: Path, reason: str, what: str) -> StoreError:
    return StoreError(
        f"the store {store_dir} is read-only ({reason}): {what} needs to write to it. The "
        "read-only commands (models list, audit verify, store verify) still work"
    )


def _is_read_only(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno == errno.EROFS
    if isinstance(e, sqlite3.Error):
        return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY or (
            "readonly database" in str(e)
        )
    return False


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, sqlite3.Error):
        return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(
            e
        )
    return False


def os_error(e: BaseException, message: str, *, needed: int | None = None) -> StoreError:
    """Translate an OSError or sqlite3.Error into StoreError, ENOSPC into DiskFullError."""
    if is_disk_full(e):
        need = f"; {human_bytes(needed)} more is needed" if needed else ""
        return DiskFullError(f"{message}: the disk is full{need} ({e})")
    if _is_read_only(e):
        return StoreError(f"{message}: the store is read-only ({e})")
    return StoreError(f"{message}: {e}")


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover


@contextmanager
def writer_lock(store_dir: Path, what: str, *, read_only_ok: bool = False) -> Iterator[None]:
    """Hold the store's single-writer lock; a second writer gets StoreError, not a wait.

    The kernel drops an flock when its process dies, so a SIGKILLed import never leaves the
    store locked. On a read-only store a writer gets a StoreError saying so before it starts;
    with ``read_only_ok`` (``store verify``, which then only reports) a shared lock is taken
    instead, which still waits for no one and keeps out a writer reaching the same store
    through another, writable mount.
    """
    check_store_path(store_dir)  # a file where the store should be: say so, not "Errno 20"
    reason = read_only_reason(store_dir)
    if reason is not None:
        if not read_only_ok:
            raise read_only_error(store_dir, reason, what)
        with _shared_lock(store_dir, what):
            yield
        return
    store_dir.mkdir(parents=True, exist_ok=True)
    lock_path = store_dir / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise StoreError(
                f"the store {store_dir} is busy ({holder}); "
                f"wait for it to finish, then retry {what}"
            ) from e
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} by pid {os.getpid()}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def _shared_lock(store_dir: Path, what: str) -> Iterator[None]:
    try:
        fd = os.open(store_dir / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        yield  # never written to: no writer to keep out
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise StoreError(
                f"the store {store_dir} is busy (a writer holds it); wait, then retry {what}"
            ) from e
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
