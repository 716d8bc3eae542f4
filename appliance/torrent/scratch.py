"""``STORE/torrent-scratch``: the torrent commands' working directories, and who holds them.

Each torrent command works in one directory under ``STORE/torrent-scratch``: a fetch in
``<infohash>/`` (libtorrent's save path, a tree of links into staging, and ``guard/``, the
checked copies of done chunks), a partial seed in ``seed-<infohash>/`` (links to a model's
staged files), ``torrent make --media`` in ``make-*/`` (the model's plain files while they are
hashed). A command holds its directory with ``held``: a shared ``flock`` on the directory
itself, the store's own mechanism (``layout.writer_lock``), which the kernel drops when the
process dies, so a SIGKILLed command never leaves a directory looking busy (and no lock file
is left in a directory that must hold only links).

``sweep`` (``appliance store gc``) removes every directory nobody holds: it takes the lock
exclusively without waiting (a directory in use is left alone), renames the directory to a
``.gc-*`` name while it holds the lock, then deletes it. The rename is what keeps a command
that opens the directory meanwhile from working in a directory being deleted: ``held`` checks,
once it has the lock, that the directory it locked is still the one at its path, and starts
again in a fresh directory when it is not. No libtorrent here: ``store gc`` imports this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.store import layout

SCRATCH_DIR = "torrent-scratch"
GUARD_DIR = "guard"  # under a fetch's directory: checked copies of done chunks (storage.Guard)
_SWEPT_PREFIX = ".gc-"


def scratch_root(store_dir: Path) -> Path:
    return store_dir / SCRATCH_DIR


@contextmanager
def held(directory: Path) -> Iterator[Path]:
    """Create ``directory`` if needed and hold it (``sweep`` leaves it alone) while the body
    runs; several processes may hold the same one."""
    while True:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = _open_dir(directory)
        except FileNotFoundError:
            continue  # swept between the mkdir and the open: make it again
        except OSError as e:
            raise layout.os_error(e, f"cannot create {directory}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a sweep deletes this directory
            if _is_current(fd, directory):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the directory was swept while we waited: start again in a new one
    try:
        yield directory
    finally:
        os.close(fd)


def _open_dir(directory: Path) -> int:
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _is_current(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


@dataclass(frozen=True)
class Swept:
    """A scratch directory ``sweep`` removed."""

    path: Path  # where it was
    freed_bytes: int  # its regular files (links are not followed)
    guarded: tuple[str, ...]  # digests of the guard copies it held


def sweep(store_dir: Path) -> list[Swept]:
    """Remove every scratch directory (and stray file) no running command holds."""
    root = scratch_root(store_dir)
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise layout.os_error(e, f"cannot list {root}") from e
    removed = []
    for entry in entries:
        try:
            if entry.name.startswith(_SWEPT_PREFIX):  # a sweep killed while deleting
                removed.append(_delete(entry, entry))
            elif entry.is_dir() and not entry.is_symlink():
                swept = _sweep_one(entry)
                if swept is not None:
                    removed.append(swept)
            else:
                size = entry.lstat().st_size if entry.is_file() else 0
                entry.unlink()
                removed.append(Swept(entry, size, ()))
        except FileNotFoundError:
            continue  # gone meanwhile
        except OSError as e:
            raise layout.os_error(e, f"cannot remove {entry}") from e
    if removed:
        with contextlib.suppress(OSError):
            root.rmdir()  # only when empty: the next command makes it again
    return removed


def _sweep_one(directory: Path) -> Swept | None:
    fd = _open_dir(directory)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # a running command works here
        aside = directory.with_name(f"{_SWEPT_PREFIX}{directory.name}.{os.getpid()}")
        os.rename(directory, aside)
    finally:
        os.close(fd)
    return _delete(aside, directory)


def _delete(path: Path, was: Path) -> Swept:
    freed, guarded = 0, []
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            item = Path(dirpath, name)
            st = item.lstat()
            if not item.is_symlink():
                freed += st.st_size
                if item.parent.name == GUARD_DIR and len(name) == 64:
                    guarded.append(name)
    shutil.rmtree(path)  # unlinks the links, never what they point at
    return Swept(was, freed, tuple(sorted(guarded)))
