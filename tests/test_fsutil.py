"""The file-system helpers: atomic replace, exclusive create, capped reads of regular files."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from appliance import fsutil
from appliance.errors import LimitExceededError, MediaError, SpecialFileError, TruncatedError


def test_read_capped(tmp_path: Path) -> None:
    small = tmp_path / "f"
    small.write_bytes(b"12345")
    assert fsutil.read_capped(small, 5, "f") == b"12345"
    with pytest.raises(LimitExceededError):
        fsutil.read_capped(small, 4, "f")
    with pytest.raises(MediaError) as info:
        fsutil.read_capped(tmp_path / "missing", 4, "missing")
    assert type(info.value) is MediaError


def test_read_capped_follows_a_symlink_to_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"abc")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert fsutil.read_capped(tmp_path / "link", 10, "link") == b"abc"


@pytest.mark.timeout(5)
def test_special_files_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes: an open without O_NONBLOCK would wait forever
    directory = tmp_path / "dir"
    directory.mkdir()
    zero = tmp_path / "zero"
    zero.symlink_to("/dev/zero")  # a device: an uncapped read would never end
    sock_path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        for path in (fifo, directory, zero, sock_path):
            with pytest.raises(SpecialFileError) as info:
                fsutil.read_capped(path, 1 << 20, path.name)
            assert type(info.value) is SpecialFileError
            assert "not a regular file" in str(info.value)


def test_open_regular_missing_class(tmp_path: Path) -> None:
    with pytest.raises(TruncatedError):
        fsutil.open_regular(tmp_path / "gone", "pack", missing=TruncatedError)


def test_create_exclusive_sets_the_exact_mode_and_refuses_existing(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        fsutil.create_exclusive(tmp_path / "cert.pem", b"x" * 100_000, 0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "cert.pem").stat().st_mode) == 0o644
    assert (tmp_path / "cert.pem").read_bytes() == b"x" * 100_000
    with pytest.raises(FileExistsError):
        fsutil.create_exclusive(tmp_path / "cert.pem", b"y", 0o600)
    assert (tmp_path / "cert.pem").read_bytes() == b"x" * 100_000


def test_create_exclusive_never_writes_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"keep")
    (tmp_path / "key").symlink_to(target)
    with pytest.raises(FileExistsError):
        fsutil.create_exclusive(tmp_path / "key", b"secret", 0o600)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        fsutil.create_exclusive(tmp_path / "dangling", b"secret", 0o600)
    assert target.read_bytes() == b"keep" and not (tmp_path / "nowhere").exists()


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "index.bin"
    fsutil.write_atomic(path, b"one")
    fsutil.write_atomic(path, b"two", mode=0o600)
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.bin"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "head"
    path.write_bytes(b"old")
    (tmp_path / "sub").mkdir()
    with pytest.raises(OSError):
        fsutil.write_atomic(tmp_path / "sub", b"new")  # cannot rename a file over a directory
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head", "sub"]


def test_fsync_dir(tmp_path: Path) -> None:
    fsutil.fsync_dir(tmp_path)
    with pytest.raises(OSError):
        fsutil.fsync_dir(tmp_path / "missing")
    fsutil.fsync_dir(tmp_path / "missing", strict=False)


def test_write_atomic_from_many_threads_at_once(tmp_path: Path) -> None:
    """Writers of one file in one process (server threads appending audit records) never
    share a temporary: every write lands whole and nothing is left behind."""
    path = tmp_path / "audit-head"
    payloads = {f"{n} {'x' * 4000}\n".encode() for n in range(8)}

    def writer(data: bytes) -> None:
        for _ in range(50):
            fsutil.write_atomic(path, data)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in payloads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit-head"]
