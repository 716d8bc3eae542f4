"""Hostile media that would hang or exhaust the reader: special files, and unsigned bulk.

Every file the reader opens from a volume (manifest, signatures, trust roots, index, packs)
is replaced by a FIFO nobody writes to, a unix socket, a directory, or a symlink to
/dev/zero (a device whose read never ends). Each must be refused with ``SpecialFileError``
before it is opened, by ``bundle inspect``/``verify``/``import`` and the TUI's media scan
alike; the timeout markers turn a hang into a failure instead of a stuck suite.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest
from bundle_helpers import NOW, build, make_sources, rewrite_manifest, root_file, trusted
from trust_helpers import kid, private, raw_envelope, trusted_store

from appliance.bundle.media import INDEX_MAGIC
from appliance.bundle.reader import find_volume_dirs, open_media
from appliance.bundle.verify import verify_media
from appliance.cli.main import main
from appliance.errors import (
    EXIT_REFUSED,
    LimitExceededError,
    RotationError,
    SpecialFileError,
    ThresholdError,
    UnsafePathError,
)
from appliance.format.signing import DOMAIN_ROOT, sign
from appliance.importer import import_media
from appliance.store import audit
from appliance.tui import service

# func_only: the bundle is built once per module, outside the limit; the reader gets 2 s.
quick = pytest.mark.timeout(2, func_only=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("hostile")
    make_sources(base, random_mib=1)
    build(base)
    return base / "media"


@pytest.fixture
def media(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "media"
    shutil.copytree(built, copy, symlinks=True)
    return copy


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    # Unix socket paths are capped at ~108 bytes: bind by a short relative name.
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(path.name)
    finally:
        os.chdir(cwd)


def _directory(path: Path) -> None:
    path.mkdir()


def _dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


KINDS: dict[str, Callable[[Path], None]] = {
    "fifo": _fifo, "socket": _socket, "directory": _directory, "dev-zero": _dev_zero,
}
TARGETS = {
    "manifest": "manifest.yaml",
    "signature": f"signatures/{kid('p1')}.sig",
    "trust-root": "trust/root-1.yaml",
    "index": "index.bin",
    "pack": "packs/pack-0001.zst",
}


def replace_with(media: Path, target: str, kind: str) -> Path:
    path = media / target
    assert path.is_file()
    path.unlink()
    KINDS[kind](path)
    return path


@quick
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_verify_refuses_special_files(media: Path, target: str, kind: str) -> None:
    replace_with(media, TARGETS[target], kind)
    with pytest.raises(SpecialFileError) as info:
        verify_media([media], trusted(), NOW)
    assert type(info.value) is SpecialFileError
    assert "not a regular file" in str(info.value)


@quick
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_inspect_and_the_tui_scan_refuse_a_fifo(media: Path, target: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    replace_with(media, TARGETS[target], "fifo")
    with pytest.raises(SpecialFileError):
        open_media([media]).parse_unverified()
    assert main(["bundle", "inspect", str(media)]) == EXIT_REFUSED
    assert "SpecialFileError" in capsys.readouterr().err
    assert main(["bundle", "verify", str(media), "--trust", str(root_file(media.parent))]
                ) == EXIT_REFUSED
    assert "SpecialFileError" in capsys.readouterr().err
    problem = service.describe_media(media).problem
    assert problem is not None and problem.startswith("SpecialFileError")


@quick
def test_a_mount_root_with_a_fifo_named_manifest(tmp_path: Path) -> None:
    root = tmp_path / "usb"
    root.mkdir()
    os.mkfifo(root / "manifest.yaml")
    assert find_volume_dirs([root]) == [root]
    with pytest.raises(SpecialFileError):
        open_media([root])
    assert service.scan_media([tmp_path]) == []  # listed nowhere, and no hang
    (root / "vol-001").mkdir()
    os.mkfifo(root / "vol-001" / "manifest.yaml")
    root.joinpath("manifest.yaml").unlink()
    with pytest.raises(SpecialFileError):
        open_media([root])


@quick
@pytest.mark.parametrize("target", ["manifest", "pack"])
def test_import_refuses_a_fifo_and_leaves_the_store_intact(media: Path, tmp_path: Path,
                                                           target: str) -> None:
    store = trusted_store(tmp_path / "store")
    before = audit.verify(store)
    replace_with(media, TARGETS[target], "fifo")
    with pytest.raises(SpecialFileError):
        import_media(store, [media], now=NOW)
    # The refusal is audited and the chain is intact; nothing was staged.
    assert audit.verify(store) == before + 1
    assert [r.kind for r in audit.records(store)][-1] == "refusal"
    assert not any((store / "staging").iterdir())


def test_a_symlink_to_a_regular_file_is_still_fine(media: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere.yaml"
    (media / "manifest.yaml").rename(moved)
    (media / "manifest.yaml").symlink_to(moved)
    assert verify_media([media], trusted(), NOW).complete


# --- work before authentication is bounded ------------------------------------------------


def junk_index(media: Path, entries: int) -> None:
    """An index claiming ``entries`` chunks, well formed enough to pass the header checks."""
    head = bytearray((media / "index.bin").read_bytes()[:88])
    struct.pack_into("<QQ", head, 24, entries, entries)  # entry count, total unique chunks
    body = bytes(head) + b"\x01" * (49 * entries)
    (media / "index.bin").write_bytes(body + blake3.blake3(body).digest())


def break_signature(path: Path) -> None:
    magic, key, encoded = path.read_text().split()
    raw = bytearray(base64.b64decode(encoded))
    raw[10] ^= 0x01
    path.write_text(f"{magic} {key} {base64.b64encode(bytes(raw)).decode()}\n")


@pytest.mark.timeout(10, func_only=True)
def test_an_unsigned_huge_index_is_never_parsed(media: Path) -> None:
    """A 48 MiB index of junk next to a manifest with a bad signature: refused for the
    signature, and its million entries are never read (the head is all that is looked at)."""
    junk_index(media, 1_000_000)
    assert (media / "index.bin").read_bytes()[:8] == INDEX_MAGIC
    break_signature(media / TARGETS["signature"])
    opened = open_media([media])
    assert opened.volumes[0].index.entry_count == 1_000_000
    assert opened.volumes[0].index.entries == ()
    with pytest.raises(ThresholdError):
        opened.authenticate(trusted(), NOW)
    assert opened.volumes[0].index.entries == ()


@pytest.mark.parametrize("bad", ["w" * 256 + ".bin", "nul.txt"])
def test_a_signed_path_no_file_system_holds_is_refused_before_any_copy(
        media: Path, tmp_path: Path, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Signed by a trusted publisher, yet a name the store could not create: refused when
    the manifest is parsed (exit 2), with nothing staged and the refusal audited."""
    data = (media / "manifest.yaml").read_bytes().replace(b"notes.txt", bad.encode())
    rewrite_manifest(media, data)
    store = trusted_store(tmp_path / "store")
    with pytest.raises(UnsafePathError) as info:
        import_media(store, [media], now=NOW)
    assert type(info.value) is UnsafePathError
    assert not any((store / "staging").iterdir()) and not any((store / "models").iterdir())
    assert [r.kind for r in audit.records(store)][-1] == "refusal"
    assert main(["bundle", "inspect", str(media)]) == EXIT_REFUSED
    assert "UnsafePathError" in capsys.readouterr().err


@quick
def test_carried_roots_are_checked_for_signatures_before_they_are_parsed(
        media: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A carried v2 whose body is not even a trust root, signed by no trusted key, is a
    RotationError (its signatures were checked first), not the FormatError parsing its body
    would give; v3 after it is never read. ``bundle inspect``, which shows every carried
    root unverified, still parses them and says FormatError."""
    body = b"keys: [this is not a trust root\n"
    signature = sign(private("outsider"), DOMAIN_ROOT, body).to_bytes().decode().strip()
    (media / "trust" / "root-2.yaml").write_bytes(raw_envelope(body, [signature]))
    (media / "trust" / "root-3.yaml").write_bytes(b"\x00 not even an envelope")
    with pytest.raises(RotationError, match="v2 has 0 valid signature") as info:
        verify_media([media], trusted(), NOW)
    assert type(info.value) is RotationError
    assert main(["bundle", "inspect", str(media)]) == EXIT_REFUSED
    assert "FormatError" in capsys.readouterr().err


@quick
@pytest.mark.parametrize("directory, name", [("signatures", "junk-{}.txt"),
                                             ("signatures", "{:032x}.sig"),
                                             ("trust", "root-{}.yaml")])
def test_a_directory_of_many_files_is_refused_without_listing_it_all(
        media: Path, directory: str, name: str) -> None:
    for i in range(400):
        (media / directory / name.format(i + 2)).touch()
    with pytest.raises(LimitExceededError, match="over the cap") as info:
        open_media([media])
    assert type(info.value) is LimitExceededError
