"""Check an appliance image against its SHA256SUMS, without mounting it.

Owns three things:

- a small read-only ISO 9660 reader: volume descriptors, directory records, Rock Ridge names
  (``NM``, continued through ``CE`` areas) and multi-extent files. It reads only what
  ``build_iso.sh`` writes (Rock Ridge names, no interleaving, no relocated directories,
  no symbolic links) and refuses the rest with ``FormatError``. Being plain Python, it works
  on a secure-site host that has the appliance binary and nothing else (no xorriso, no
  mount rights), on an image file or on a block device such as ``/dev/sr0``;
- the ``SHA256SUMS`` format as coreutils writes it (``HEX  path``), parsed as hostile input;
- ``verify_image`` (an image file or device) and ``verify_tree`` (a mounted disc or an
  extracted tree): every file listed must be present with its checksum, and every file
  present must be listed. All differences are collected and raised as one ``IntegrityError``
  that names the first file and counts the rest.

The checksum list catches a damaged burn or a worn disc; it is not a signature (whoever can
write the image can rewrite it). Authenticity comes from the signed bundle and the trust root.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from appliance.errors import (
    FormatError,
    IntegrityError,
    LimitExceededError,
    MediaError,
    TruncatedError,
    UnsafePathError,
    UsageError,
)

CHECKSUMS_NAME = "SHA256SUMS"
SECTOR = 2048
FIRST_DESCRIPTOR_SECTOR = 16
MAX_DESCRIPTORS = 64
MAX_CHECKSUMS_BYTES = 4 << 20
MAX_ENTRIES = 100_000
MAX_DEPTH = 32
MAX_DIRECTORY_BYTES = 16 << 20
MAX_CONTINUATIONS = 64
READ_BYTES = 1 << 20

_DESCRIPTOR_PRIMARY = 1
_DESCRIPTOR_TERMINATOR = 255
_FLAG_DIRECTORY = 0x02
_FLAG_MULTI_EXTENT = 0x80
_MIN_RECORD = 34
_LINE = re.compile(rb"([0-9a-fA-F]{64}) [ *]([^\r\n]+)")

Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes of file data starting at logical block ``lba``."""

    lba: int
    length: int


@dataclass(frozen=True, slots=True)
class IsoFile:
    """A regular file in the image: its Rock Ridge path and where its bytes are."""

    path: str
    extents: tuple[Extent, ...]

    @property
    def size(self) -> int:
        return sum(e.length for e in self.extents)


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What a successful check covered. ``checksums_sha256`` identifies the list itself, so it
    can be compared with a value published out of band."""

    files: int
    bytes: int
    checksums_sha256: str


# -- SHA256SUMS -----------------------------------------------------------------------------


def _check_list_path(path: str) -> None:
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in path:
        raise UnsafePathError(f"{CHECKSUMS_NAME} names an unsafe path: {path!r}")


def parse_checksums(data: bytes) -> dict[str, str]:
    """``{path: lowercase hex sha256}`` from coreutils ``sha256sum`` output.

    Refuses (``FormatError`` family) an empty list, a malformed or escaped line, an unsafe
    or repeated path; ``LimitExceededError`` past ``MAX_CHECKSUMS_BYTES`` or ``MAX_ENTRIES``.
    """
    if len(data) > MAX_CHECKSUMS_BYTES:
        raise LimitExceededError(
            f"{CHECKSUMS_NAME} is {len(data)} bytes, more than {MAX_CHECKSUMS_BYTES}"
        )
    entries: dict[str, str] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        match = _LINE.fullmatch(line)
        if match is None:
            raise FormatError(
                f"{CHECKSUMS_NAME} line {number} is not 'SHA256  PATH': {line[:80]!r}"
            )
        try:
            path = match.group(2).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{CHECKSUMS_NAME} line {number}: path is not UTF-8") from e
        _check_list_path(path)
        if path in entries:
            raise UnsafePathError(f"{CHECKSUMS_NAME} lists {path!r} twice")
        if len(entries) >= MAX_ENTRIES:
            raise LimitExceededError(f"{CHECKSUMS_NAME} lists more than {MAX_ENTRIES} files")
        entries[path] = match.group(1).decode("ascii").lower()
    if not entries:
        raise FormatError(f"{CHECKSUMS_NAME} is empty")
    return entries


def render_checksums(entries: dict[str, str]) -> bytes:
    """The list as ``sha256sum`` writes it, sorted by path (byte order, like ``LC_ALL=C sort``)."""
    ordered = sorted(entries.items(), key=lambda item: item[0].encode())
    return b"".join(f"{digest}  {path}\n".encode() for path, digest in ordered)


# -- ISO 9660 reader ------------------------------------------------------------------------


def _read_at(fh: BinaryIO, offset: int, length: int, image_size: int, what: str) -> bytes:
    if offset + length > image_size:
        raise TruncatedError(
            f"the image ends at byte {image_size} but {what} runs to {offset + length}: "
            "the image is cut short", offset=offset,
        )
    fh.seek(offset)
    data = fh.read(length)
    if len(data) != length:
        raise TruncatedError(f"short read of {what}", offset=offset)
    return data


@dataclass(slots=True)
class _Record:
    lba: int
    length: int
    flags: int
    name: bytes
    system_use: bytes


def _parse_record(buf: bytes, pos: int, where: str) -> _Record:
    size = buf[pos]
    if size < _MIN_RECORD or pos + size > len(buf):
        raise FormatError(f"bad directory record at byte {pos} of {where}")
    rec = buf[pos : pos + size]
    name_len = rec[32]
    if 33 + name_len > size:
        raise FormatError(f"directory record name overruns its record in {where}")
    if rec[1] != 0 or rec[26] != 0 or rec[27] != 0:
        raise FormatError(f"extended attributes or interleaving in {where}: not supported")
    # A padding byte follows an even-length name so the System Use area starts even.
    su_start = 33 + name_len + (1 - name_len % 2)
    return _Record(
        lba=int.from_bytes(rec[2:6], "little"),
        length=int.from_bytes(rec[10:14], "little"),
        flags=rec[25],
        name=rec[33 : 33 + name_len],
        system_use=rec[su_start:],
    )


class _Reader:
    def __init__(self, fh: BinaryIO, image_size: int) -> None:
        self.fh = fh
        self.size = image_size
        self.skip = 0  # SUSP bytes to skip in each System Use area (from the SP entry)
        self.entries = 0

    def read(self, offset: int, length: int, what: str) -> bytes:
        return _read_at(self.fh, offset, length, self.size, what)

    def root_record(self) -> _Record:
        for index in range(MAX_DESCRIPTORS):
            sector = FIRST_DESCRIPTOR_SECTOR + index
            desc = self.read(sector * SECTOR, SECTOR, f"volume descriptor {index}")
            if desc[1:6] != b"CD001":
                raise FormatError("not an ISO 9660 image (no CD001 volume descriptor)")
            if desc[0] == _DESCRIPTOR_PRIMARY:
                if int.from_bytes(desc[128:130], "little") != SECTOR:
                    raise FormatError("ISO logical block size is not 2048: not supported")
                return _parse_record(desc[156:190], 0, "the root directory record")
            if desc[0] == _DESCRIPTOR_TERMINATOR:
                break
        raise FormatError("no primary volume descriptor in the image")

    def susp(self, system_use: bytes, skip: int, where: str) -> Iterator[tuple[bytes, bytes]]:
        """System Use entries ``(signature, data)``, following ``CE`` continuation areas."""
        area = system_use[skip:]
        for _ in range(MAX_CONTINUATIONS):
            pos = 0
            continuation: tuple[int, int, int] | None = None
            while pos + 4 <= len(area):
                sig, size = area[pos : pos + 2], area[pos + 2]
                if size == 0:  # zero padding ends the area
                    break
                if size < 4 or pos + size > len(area):
                    raise FormatError(f"bad System Use entry {sig!r} in {where}")
                data = area[pos + 4 : pos + size]
                pos += size
                if sig == b"ST":
                    return
                if sig == b"CE":
                    if len(data) < 24:
                        raise FormatError(f"short CE entry in {where}")
                    continuation = (
                        int.from_bytes(data[0:4], "little"),
                        int.from_bytes(data[8:12], "little"),
                        int.from_bytes(data[16:20], "little"),
                    )
                    continue
                yield sig, data
            if continuation is None:
                return
            lba, offset, length = continuation
            if offset + length > SECTOR:
                raise FormatError(f"continuation area crosses its block in {where}")
            area = self.read(lba * SECTOR + offset, length, f"continuation area of {where}")
        raise LimitExceededError(f"more than {MAX_CONTINUATIONS} continuation areas in {where}")

    def rock_ridge_name(self, record: _Record, where: str) -> str:
        parts: list[bytes] = []
        for sig, data in self.susp(record.system_use, self.skip, where):
            if sig == b"NM" and data:
                parts.append(data[1:])
            elif sig == b"SL":
                raise FormatError(f"symbolic link in {where}: not in an appliance image")
            elif sig in (b"CL", b"RE"):
                raise FormatError(f"relocated directory in {where}: not supported")
        if not parts:
            raise FormatError(f"an entry in {where} has no Rock Ridge name")
        try:
            name = b"".join(parts).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"a Rock Ridge name in {where} is not UTF-8") from e
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise UnsafePathError(f"unsafe name {name!r} in {where}")
        return name

    def records(self, directory: _Record, where: str) -> Iterator[_Record]:
        if directory.length > MAX_DIRECTORY_BYTES:
            raise LimitExceededError(f"directory {where} is {directory.length} bytes")
        buf = self.read(directory.lba * SECTOR, directory.length, f"directory {where}")
        pos = 0
        while pos < len(buf):
            if buf[pos] == 0:  # records never cross a block: the rest of this one is padding
                pos = (pos // SECTOR + 1) * SECTOR
                continue
            record = _parse_record(buf, pos, f"directory {where}")
            pos += buf[pos]
            yield record

    def detect_rock_ridge(self, root: _Record) -> None:
        first = next(self.records(root, "/"), None)
        if first is None or first.name != b"\x00":
            raise FormatError("the root directory has no '.' entry")
        su = first.system_use
        if len(su) >= 7 and su[0:2] == b"SP" and su[4:6] == b"\xbe\xef":
            self.skip = su[6]
            return
        raise FormatError("the image has no Rock Ridge names: not made by build_iso.sh")

    def walk(self, directory: _Record, prefix: str, depth: int, seen: set[int],
             out: list[IsoFile]) -> None:
        if depth > MAX_DEPTH:
            raise LimitExceededError(f"directories nested deeper than {MAX_DEPTH} at {prefix}")
        if directory.lba in seen:
            raise FormatError(f"directory loop at {prefix or '/'}")
        seen.add(directory.lba)
        where = prefix or "/"
        pending: tuple[str, list[Extent]] | None = None
        for record in self.records(directory, where):
            if record.name in (b"\x00", b"\x01"):
                continue
            self.entries += 1
            if self.entries > MAX_ENTRIES:
                raise LimitExceededError(f"more than {MAX_ENTRIES} entries in the image")
            if pending is not None:
                # Later extents of a multi-extent file repeat its name; the first one names it.
                name, extents = pending
            else:
                name, extents = self.rock_ridge_name(record, where), []
            path = f"{prefix}/{name}" if prefix else name
            if record.flags & _FLAG_DIRECTORY:
                if pending is not None:
                    raise FormatError(f"multi-extent file {path} ends in a directory")
                self.walk(record, path, depth + 1, seen, out)
                continue
            extents.append(Extent(record.lba, record.length))
            if record.flags & _FLAG_MULTI_EXTENT:
                pending = (name, extents)
                continue
            pending = None
            out.append(IsoFile(path, tuple(extents)))
        if pending is not None:
            raise FormatError(f"multi-extent file {pending[0]} in {where} has no last extent")


def _image_size(fh: BinaryIO) -> int:
    # st_size is 0 for a block device (/dev/sr0); seeking to the end works for both.
    return fh.seek(0, os.SEEK_END)


def _open(path: Path) -> BinaryIO:
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    try:
        return path.open("rb")
    except OSError as e:
        raise MediaError(f"cannot read {path}: {e.strerror or e}") from e


def list_image(path: Path) -> list[IsoFile]:
    """Every regular file in the image at ``path``, with its extents, sorted by path."""
    with _open(path) as fh:
        try:
            return _list(fh)
        except OSError as e:
            raise MediaError(f"cannot read {path}: {e.strerror or e}") from e


def _list(fh: BinaryIO) -> list[IsoFile]:
    reader = _Reader(fh, _image_size(fh))
    root = reader.root_record()
    reader.detect_rock_ridge(root)
    files: list[IsoFile] = []
    reader.walk(root, "", 0, set(), files)
    return sorted(files, key=lambda f: f.path.encode())


def read_file(fh: BinaryIO, entry: IsoFile, image_size: int) -> Iterator[bytes]:
    """The bytes of ``entry``, in blocks of at most ``READ_BYTES``."""
    for extent in entry.extents:
        offset, left = extent.lba * SECTOR, extent.length
        if offset + left > image_size:
            raise TruncatedError(
                f"{entry.path} runs past the end of the image (byte {offset + left} of "
                f"{image_size}): the image is cut short", file=entry.path, offset=offset,
            )
        fh.seek(offset)
        while left:
            block = fh.read(min(READ_BYTES, left))
            if not block:
                raise TruncatedError(f"short read of {entry.path}", file=entry.path, offset=offset)
            left -= len(block)
            yield block


# -- verification ---------------------------------------------------------------------------


def _compare(
    expected: dict[str, str],
    sizes: dict[str, int],
    open_file: Callable[[str], Iterator[bytes]],
    progress: Progress | None,
    checksums_sha256: str,
) -> VerifyReport:
    missing = sorted(set(expected) - set(sizes))
    unlisted = sorted(set(sizes) - set(expected))
    total = sum(sizes[p] for p in expected if p in sizes)
    done = 0
    differ: list[str] = []
    for path in sorted(p for p in expected if p in sizes):
        h = hashlib.sha256()
        for block in open_file(path):
            h.update(block)
            done += len(block)
            if progress is not None:
                progress(done, total)
        if h.hexdigest() != expected[path]:
            differ.append(path)
    problems = (
        [f"{p}: checksum differs" for p in differ]
        + [f"{p}: listed in {CHECKSUMS_NAME} but missing" for p in missing]
        + [f"{p}: present but not listed in {CHECKSUMS_NAME}" for p in unlisted]
    )
    if problems:
        first = (differ or missing or unlisted)[0]
        more = ""
        if len(problems) > 1:
            more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:6])})"
        raise IntegrityError(f"{problems[0]}{more}; do not use this image", file=first)
    return VerifyReport(len(expected), total, checksums_sha256)


def verify_image(path: Path, *, progress: Progress | None = None) -> VerifyReport:
    """Check every file of the image (file or block device) at ``path`` against its SHA256SUMS."""
    with _open(path) as fh:
        try:
            size = _image_size(fh)
            files = {f.path: f for f in _list(fh)}
            listing = files.pop(CHECKSUMS_NAME, None)
            if listing is None:
                raise IntegrityError(f"the image has no {CHECKSUMS_NAME}", file=CHECKSUMS_NAME)
            if listing.size > MAX_CHECKSUMS_BYTES:
                raise LimitExceededError(f"{CHECKSUMS_NAME} is {listing.size} bytes")
            data = b"".join(read_file(fh, listing, size))
            expected = parse_checksums(data)
            sizes = {p: f.size for p, f in files.items()}
            return _compare(expected, sizes, lambda p: read_file(fh, files[p], size), progress,
                            hashlib.sha256(data).hexdigest())
        except OSError as e:
            raise MediaError(f"cannot read {path}: {e.strerror or e}") from e


def _tree_files(root: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = Path(dirpath, name)
            found[full.relative_to(root).as_posix()] = full.stat().st_size
            if len(found) > MAX_ENTRIES:
                raise LimitExceededError(f"more than {MAX_ENTRIES} files under {root}")
    return found


def _read_tree_file(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while block := fh.read(READ_BYTES):
            yield block


def verify_tree(root: Path, *, progress: Progress | None = None) -> VerifyReport:
    """Check a mounted disc or an extracted image (a directory) against its SHA256SUMS."""
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory")
    try:
        sizes = _tree_files(root)
        if sizes.pop(CHECKSUMS_NAME, None) is None:
            raise IntegrityError(f"{root} has no {CHECKSUMS_NAME}", file=CHECKSUMS_NAME)
        listing = root / CHECKSUMS_NAME
        if listing.stat().st_size > MAX_CHECKSUMS_BYTES:
            raise LimitExceededError(f"{CHECKSUMS_NAME} is {listing.stat().st_size} bytes")
        data = listing.read_bytes()
        expected = parse_checksums(data)
        return _compare(expected, sizes, lambda p: _read_tree_file(root / p), progress,
                        hashlib.sha256(data).hexdigest())
    except OSError as e:
        raise MediaError(f"cannot read {root}: {e.strerror or e}") from e


def verify(path: Path, *, progress: Progress | None = None) -> VerifyReport:
    """``verify_tree`` for a directory, else ``verify_image``."""
    if path.is_dir():
        return verify_tree(path, progress=progress)
    return verify_image(path, progress=progress)
