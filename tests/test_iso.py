"""Tests for appliance.iso (SHA256SUMS, the ISO 9660 reader, verify) and build_iso.sh's checks.

Small ISOs are made with xorriso and the reader is checked against xorriso's own extraction.
The one-file binary and full images are tested in test_iso_image.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from iso_helpers import (
    REPO,
    extract_iso,
    flip_byte,
    make_iso,
    run_build_iso,
    sha256,
    write_tree,
)

from appliance.cli.main import main
from appliance.errors import (
    FormatError,
    IntegrityError,
    LimitExceededError,
    TruncatedError,
    UnsafePathError,
    UsageError,
)
from appliance.iso import (
    CHECKSUMS_NAME,
    MAX_CHECKSUMS_BYTES,
    SECTOR,
    list_image,
    parse_checksums,
    render_checksums,
    verify,
    verify_image,
    verify_tree,
)

LONG_NAME = "n" * 230 + ".txt"  # too long for one directory record: needs a CE area


SAMPLE = {
    "x.txt": b"hello\n",
    "empty": b"",
    "a/b/c/big.bin": bytes(range(256)) * 1200,
    f"a/{LONG_NAME}": b"long name\n",
    "bundle/vol-001/manifest.yaml": b"channel: test\n",
}


@pytest.fixture
def sample_iso(tmp_path: Path) -> Path:
    return make_iso(write_tree(tmp_path / "src", SAMPLE), tmp_path / "sample.iso")


# -- SHA256SUMS -------------------------------------------------------------------------------

GOOD_HASH = "ab" * 32


def test_checksums_round_trip_sorted_like_lc_all_c() -> None:
    entries = {"b/x": GOOD_HASH, "B": "cd" * 32, "a": "ef" * 32}
    data = render_checksums(entries)
    assert data.decode().splitlines()[0].endswith("  B")  # uppercase sorts first in C order
    assert parse_checksums(data) == entries


def test_checksums_accepts_binary_marker_and_uppercase_hex() -> None:
    assert parse_checksums(f"{GOOD_HASH.upper()} *bin/app\n".encode()) == {"bin/app": GOOD_HASH}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n",
        f"{GOOD_HASH} one-space-only\n".encode(),  # "HASH path" lacks the second column char
        f"{GOOD_HASH[:-2]}  short-hash\n".encode(),
        f"\\{GOOD_HASH}  escaped\\nname\n".encode(),  # coreutils escapes odd names: refused
        f"{GOOD_HASH}  \xff\xfe\n".encode("latin-1"),
    ],
)
def test_checksums_malformed(data: bytes) -> None:
    with pytest.raises(FormatError):
        parse_checksums(data)


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../b", "a//b", "./a", "a\\b"])
def test_checksums_unsafe_path(path: str) -> None:
    with pytest.raises(UnsafePathError):
        parse_checksums(f"{GOOD_HASH}  {path}\n".encode())


def test_checksums_duplicate_path() -> None:
    with pytest.raises(UnsafePathError):
        parse_checksums(f"{GOOD_HASH}  a\n{GOOD_HASH}  a\n".encode())


def test_checksums_size_cap() -> None:
    line = f"{GOOD_HASH}  a\n".encode()
    with pytest.raises(LimitExceededError):
        parse_checksums(line * (MAX_CHECKSUMS_BYTES // len(line) + 1))


# -- the ISO reader ---------------------------------------------------------------------------


def test_list_image_matches_xorriso_extraction(sample_iso: Path, tmp_path: Path) -> None:
    listed = {f.path: f for f in list_image(sample_iso)}
    extracted = extract_iso(sample_iso, tmp_path / "out")
    on_disk = {p.relative_to(extracted).as_posix() for p in extracted.rglob("*") if p.is_file()}
    assert set(listed) == on_disk == {*SAMPLE, CHECKSUMS_NAME}
    assert f"a/{LONG_NAME}" in listed  # the name continued in a CE area, read whole
    with sample_iso.open("rb") as fh:
        for path, entry in listed.items():
            data = b""
            for extent in entry.extents:
                fh.seek(extent.lba * SECTOR)
                data += fh.read(extent.length)
            assert data == (extracted / path).read_bytes(), path
            assert entry.size == len(data)


def test_verify_image_ok(sample_iso: Path) -> None:
    seen: list[tuple[int, int]] = []
    report = verify_image(sample_iso, progress=lambda done, total: seen.append((done, total)))
    assert report.files == len(SAMPLE)
    assert report.bytes == sum(len(d) for d in SAMPLE.values())
    assert seen[-1] == (report.bytes, report.bytes)
    sums = next(f for f in list_image(sample_iso) if f.path == CHECKSUMS_NAME)
    with sample_iso.open("rb") as fh:
        fh.seek(sums.extents[0].lba * SECTOR)
        assert report.checksums_sha256 == sha256(fh.read(sums.size))


def test_verify_image_flipped_byte_names_the_file(sample_iso: Path) -> None:
    entry = next(f for f in list_image(sample_iso) if f.path == "a/b/c/big.bin")
    flip_byte(sample_iso, entry.extents[0].lba * SECTOR + 1000)
    with pytest.raises(IntegrityError) as caught:
        verify_image(sample_iso)
    assert caught.value.file == "a/b/c/big.bin"
    assert "checksum differs" in str(caught.value)


def test_verify_image_unlisted_file(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", SAMPLE)
    (src / "smuggled.sh").write_bytes(b"#!/bin/sh\n")
    with pytest.raises(IntegrityError) as caught:
        verify_image(make_iso(src, tmp_path / "extra.iso"))
    assert caught.value.file == "smuggled.sh"
    assert "not listed" in str(caught.value)


def test_verify_image_missing_file_and_counts_all_problems(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", SAMPLE)
    (src / "x.txt").unlink()
    (src / "empty").unlink()
    with pytest.raises(IntegrityError) as caught:
        verify_image(make_iso(src, tmp_path / "missing.iso"))
    assert caught.value.file == "empty"
    assert "and 1 more" in str(caught.value) and "x.txt" in str(caught.value)


def test_verify_image_without_checksum_list(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", SAMPLE, sums=False)
    with pytest.raises(IntegrityError) as caught:
        verify_image(make_iso(src, tmp_path / "nosums.iso"))
    assert caught.value.file == CHECKSUMS_NAME


def test_verify_image_cut_short(sample_iso: Path) -> None:
    last = max(list_image(sample_iso), key=lambda f: f.extents[0].lba + f.size / SECTOR)
    end = last.extents[0].lba * SECTOR + last.size
    with sample_iso.open("r+b") as fh:
        fh.truncate(end - 1)
    with pytest.raises(TruncatedError):
        verify_image(sample_iso)


def test_not_an_iso(tmp_path: Path) -> None:
    junk = tmp_path / "junk.iso"
    junk.write_bytes(os.urandom(40 * SECTOR))
    with pytest.raises(FormatError):
        verify_image(junk)


def test_tiny_file_is_not_an_iso(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.iso"
    tiny.write_bytes(b"CD001")
    with pytest.raises(TruncatedError):
        list_image(tiny)


def test_image_without_rock_ridge_is_refused(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"a.txt": b"a"})
    with pytest.raises(FormatError, match="Rock Ridge"):
        list_image(make_iso(src, tmp_path / "plain.iso", "-rockridge", "off"))


def test_symlink_in_image_is_refused(tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"a.txt": b"a"})
    (src / "link").symlink_to("a.txt")
    with pytest.raises(FormatError, match="symbolic link"):
        list_image(make_iso(src, tmp_path / "link.iso"))


def test_directory_loop_is_refused(sample_iso: Path) -> None:
    # Point a subdirectory's record at the root directory's extent.
    data = bytearray(sample_iso.read_bytes())
    root_lba = int.from_bytes(data[16 * SECTOR + 158 : 16 * SECTOR + 162], "little")
    sub = bytes([ord("A")])  # ISO 9660 name of directory "a" in the root
    root = data[root_lba * SECTOR : root_lba * SECTOR + SECTOR]
    pos = 0
    while root[pos]:
        if root[pos + 32] == 1 and root[pos + 33 : pos + 34] == sub and root[pos + 25] & 2:
            start = root_lba * SECTOR + pos
            data[start + 2 : start + 6] = root_lba.to_bytes(4, "little")
            data[start + 6 : start + 10] = root_lba.to_bytes(4, "big")
            break
        pos += root[pos]
    else:
        raise AssertionError("directory record 'A' not found")
    looped = sample_iso.with_name("loop.iso")
    looped.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="loop"):
        list_image(looped)


def test_missing_image_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        verify(tmp_path / "nope.iso")


def test_verify_tree(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "disc", SAMPLE)
    assert verify_tree(root).files == len(SAMPLE)
    flip_byte(root / "x.txt", 0)
    with pytest.raises(IntegrityError) as caught:
        verify(root)
    assert caught.value.file == "x.txt"


def test_cli_iso_verify(sample_iso: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["iso", "verify", str(sample_iso), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["files"] == len(SAMPLE)
    entry = next(f for f in list_image(sample_iso) if f.path == "x.txt")
    flip_byte(sample_iso, entry.extents[0].lba * SECTOR)
    assert main(["iso", "verify", str(sample_iso)]) == 2
    assert "IntegrityError: x.txt: checksum differs" in capsys.readouterr().err


# -- build_iso.sh arguments and tool checks (no build) ----------------------------------------


def test_build_iso_names_every_missing_tool(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname",):  # what the script needs before its tool check
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    (tmp_path / "media").mkdir()
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "APPLIANCE_VENV": str(tmp_path / "nov")}
    proc = run_build_iso(["--bundle", str(tmp_path / "media"), "--out", str(tmp_path / "a.iso")],
                         env)
    assert proc.returncode == 1
    for needed in ("xorriso", "sha256sum", "venv"):
        assert needed in proc.stderr, proc.stderr
    assert not (tmp_path / "a.iso").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--out is required"),
        (["--out", "x.iso"], "--recipe RECIPE --key KEY, or --bundle DIR"),
        (["--bundle", "/nonexistent", "--out", "x.iso"], "does not exist"),
        (["--recipe", "r.yaml", "--bundle", ".", "--out", "x.iso"], "not both"),
        (["--recipe", str(REPO / "bundles" / "default.yaml"), "--out", "x.iso"], "--key"),
        (["--bundle", ".", "--out", "x.iso", "--volid", "bad id"], "--volid"),
        (["--bundle", ".", "--out", "x.iso", "--binary", "/nonexistent"], "not an executable"),
        (["--frobnicate"], "unknown argument"),
    ],
)
def test_build_iso_bad_arguments(args: list[str], message: str) -> None:
    proc = run_build_iso(args)
    assert proc.returncode == 1
    assert message in proc.stderr
