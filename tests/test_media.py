"""Volume index codec, pack writing and bounded reads, zstd with caps."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import blake3
import pytest
import zstandard

from appliance.bundle.media import (
    INDEX_MAGIC,
    PackWriter,
    VolumeIndex,
    compress_chunk,
    decompress_chunk,
    encode_index,
    pack_name,
    parse_index,
    read_stored,
    volume_name,
)
from appliance.chunks import check_chunk
from appliance.errors import (
    DecompressionError,
    FormatError,
    IntegrityError,
    LimitExceededError,
    MediaError,
    TruncatedError,
)
from appliance.limits import Limits

HEADER_BYTES = 72
ENTRY_BYTES = 49


def digest(n: int) -> bytes:
    return blake3.blake3(str(n).encode()).digest()


def sample_index(entries_per_pack: tuple[int, ...] = (3, 2), volume: int = 2) -> VolumeIndex:
    writer_entries = []
    sizes = []
    n = 0
    for pack, count in enumerate(entries_per_pack, start=1):
        offset = 0
        for _ in range(count):
            stored = 100 + n
            writer_entries.append((digest(n), pack, offset, stored, n % 2 == 0))
            offset += stored
            n += 1
        sizes.append(offset)
    from appliance.bundle.media import IndexEntry

    return VolumeIndex(
        volume=volume, volume_count=3, total_chunks=20, manifest_hash=b"\x07" * 32,
        volume_starts=(0, 4, 4 + n), pack_sizes=tuple(sizes),
        entries=tuple(IndexEntry(*e) for e in writer_entries),
    )


def reseal(body: bytes) -> bytes:
    """An attacker who edits the index can always recompute its checksum."""
    return body + blake3.blake3(body).digest()


def test_index_round_trip() -> None:
    index = sample_index()
    data = encode_index(index)
    assert data.startswith(INDEX_MAGIC)
    assert len(data) == HEADER_BYTES + 8 * (3 + 2) + ENTRY_BYTES * 5 + 32
    assert parse_index(data) == index
    assert index.name == "vol-002"
    assert index.chunk_range() == range(4, 9)
    assert [index.volume_of(i) for i in (0, 3, 4, 8, 9, 19)] == [1, 1, 2, 2, 3, 3]


def test_every_flipped_byte_of_the_index_is_a_format_error() -> None:
    data = encode_index(sample_index())
    for pos in range(0, len(data), 7):
        flipped = bytearray(data)
        flipped[pos] ^= 0x40
        with pytest.raises(FormatError):
            parse_index(bytes(flipped))


def test_index_over_cap_is_refused_before_parsing() -> None:
    data = encode_index(sample_index())
    with pytest.raises(LimitExceededError):
        parse_index(data, Limits(max_volume_index_bytes=len(data) - 1))


def test_short_and_foreign_files_are_refused() -> None:
    with pytest.raises(FormatError):
        parse_index(b"")
    with pytest.raises(FormatError):
        parse_index(b"PK\x03\x04" + b"\x00" * 200)


def _entry_pos(i: int, volumes: int = 3, packs: int = 2) -> int:
    return HEADER_BYTES + 8 * (volumes + packs) + ENTRY_BYTES * i


@pytest.mark.parametrize(
    ("label", "patch"),
    [
        ("version", lambda b: struct.pack_into("<I", b, 8, 2)),
        ("volume-over-count", lambda b: struct.pack_into("<I", b, 12, 4)),
        ("entry-count-lies", lambda b: struct.pack_into("<Q", b, 24, 6)),
        ("pack-count-lies", lambda b: struct.pack_into("<I", b, 20, 1)),
        ("gap-in-pack", lambda b: struct.pack_into("<Q", b, _entry_pos(1) + 36, 101)),
        ("overlap", lambda b: struct.pack_into("<Q", b, _entry_pos(2) + 36, 5)),
        ("stored-length-lies", lambda b: struct.pack_into("<I", b, _entry_pos(4) + 44, 50)),
        ("pack-size-lies", lambda b: struct.pack_into("<Q", b, HEADER_BYTES + 24 + 8, 9999)),
        ("unknown-flag", lambda b: struct.pack_into("<B", b, _entry_pos(0) + 48, 0x80)),
        ("bad-pack-number", lambda b: struct.pack_into("<I", b, _entry_pos(3) + 32, 7)),
        ("duplicate-chunk", lambda b: b.__setitem__(
            slice(_entry_pos(1), _entry_pos(1) + 32), b[_entry_pos(0):_entry_pos(0) + 32])),
        ("starts-not-increasing", lambda b: struct.pack_into("<Q", b, HEADER_BYTES + 8, 0)),
        ("starts-not-from-zero", lambda b: struct.pack_into("<Q", b, HEADER_BYTES, 1)),
        ("share-disagrees", lambda b: struct.pack_into("<Q", b, HEADER_BYTES + 16, 10)),
    ],
)
def test_resealed_index_with_lying_fields_is_refused(label: str, patch: object) -> None:
    body = bytearray(encode_index(sample_index())[:-32])
    patch(body)  # type: ignore[operator]
    with pytest.raises(FormatError):
        parse_index(reseal(bytes(body)))


def test_pack_over_the_cap_is_a_limit_error() -> None:
    data = encode_index(sample_index())
    with pytest.raises(LimitExceededError):
        parse_index(data, Limits(max_pack_bytes=300))


def test_stored_length_over_chunk_cap_is_a_limit_error() -> None:
    data = encode_index(sample_index())
    with pytest.raises(LimitExceededError):
        parse_index(data, Limits(max_chunk_bytes=100))


def test_compress_chunk_keeps_incompressible_data_raw() -> None:
    noise = os.urandom(1 << 20)
    stored, compressed = compress_chunk(noise)
    assert (stored, compressed) == (noise, False)
    text = b"the same words again and again " * 40000
    stored, compressed = compress_chunk(text)
    assert compressed and len(stored) < len(text) // 10
    assert decompress_chunk(stored, len(text)) == text


def test_saving_just_under_the_threshold_stays_raw() -> None:
    # 2.5% zeros in random bytes: zstd saves about 2.5%, under MIN_COMPRESSION_SAVING (3%).
    data = os.urandom(975_000) + bytes(25_000)
    stored, compressed = compress_chunk(data)
    assert not compressed and stored == data


def _with_content_size(frame: bytes, size: int) -> bytes:
    """Rewrite the 4-byte frame-content-size field (RFC 8878, 3.1.1.1) of a frame."""
    patched = bytearray(frame)
    descriptor = patched[4]
    assert descriptor >> 6 == 2 and descriptor & 0x03 == 0  # 4-byte FCS, no dictionary id
    single_segment = (descriptor >> 5) & 1
    struct.pack_into("<I", patched, 6 - single_segment, size)
    assert zstandard.frame_content_size(bytes(patched)) == size
    return bytes(patched)


def test_zstd_bomb_that_lies_about_its_size_is_a_decompression_error() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(50_000_000))
    assert len(bomb) < 5000
    # Honest about 50 MB: refused because the manifest says 4 KiB.
    with pytest.raises(DecompressionError):
        decompress_chunk(bomb, 4096)
    # Lies that it holds 4 KiB: libzstd stops at the 4 KiB buffer instead of growing.
    with pytest.raises(DecompressionError):
        decompress_chunk(_with_content_size(bomb, 4096), 4096)


def test_frame_without_content_size_is_refused() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 1000)
    with pytest.raises(DecompressionError):
        decompress_chunk(frame, 1000)


def test_trailing_data_and_two_frames_are_refused() -> None:
    frame = zstandard.ZstdCompressor().compress(b"y" * 1000)
    assert decompress_chunk(frame, 1000) == b"y" * 1000
    with pytest.raises(DecompressionError):
        decompress_chunk(frame + b"!", 1000)
    with pytest.raises(DecompressionError):
        decompress_chunk(frame + frame, 1000)


def test_garbage_is_a_decompression_error() -> None:
    with pytest.raises(DecompressionError):
        decompress_chunk(b"not zstd at all", 100)
    frame = bytearray(zstandard.ZstdCompressor().compress(b"z" * 5000 + os.urandom(500)))
    frame[len(frame) // 2] ^= 0xFF
    with pytest.raises(IntegrityError):  # corrupt frame or, rarely, wrong bytes out
        plain = decompress_chunk(bytes(frame), 5500)
        check_chunk(plain, blake3.blake3(b"z" * 5000).hexdigest())


def test_check_chunk_names_where() -> None:
    with pytest.raises(IntegrityError) as info:
        check_chunk(b"abc", "00" * 32, file="m.gguf", volume="vol-002", offset=42,
                    pack="pack-0001.zst")
    err = info.value
    assert (err.chunk, err.file, err.volume, err.offset) == ("00" * 32, "m.gguf", "vol-002", 42)
    assert "pack-0001.zst" in str(err)
    check_chunk(b"abc", blake3.blake3(b"abc").hexdigest())


def test_pack_writer_rotates_before_the_pack_size(tmp_path: Path) -> None:
    writer = PackWriter(tmp_path, pack_size=250)
    for n in range(5):
        writer.append(digest(n), bytes([n]) * 100, compressed=False)
    writer.close()
    assert writer.pack_sizes == [200, 200, 100]
    assert [(e.pack, e.offset) for e in writer.entries] == [
        (1, 0), (1, 100), (2, 0), (2, 100), (3, 0)]
    packs = sorted(p.name for p in (tmp_path / "packs").iterdir())
    assert packs == [pack_name(1), pack_name(2), pack_name(3)]
    entry = writer.entries[3]
    assert read_stored(tmp_path / "packs" / pack_name(entry.pack), entry.offset, 100) == (
        bytes([3]) * 100)
    index = VolumeIndex(1, 1, 5, b"\x00" * 32, (0,), tuple(writer.pack_sizes),
                        tuple(writer.entries))
    assert parse_index(encode_index(index)) == index


def test_pack_writer_refuses_a_chunk_bigger_than_a_pack(tmp_path: Path) -> None:
    writer = PackWriter(tmp_path, pack_size=10)
    with pytest.raises(MediaError):
        writer.append(digest(0), b"x" * 11, compressed=False)


def test_truncated_pack_is_a_truncated_error(tmp_path: Path) -> None:
    pack = tmp_path / "pack-0001.zst"
    pack.write_bytes(b"a" * 150)
    with pytest.raises(TruncatedError):
        read_stored(pack, 100, 100, chunk="ab" * 32, volume="vol-001")
    with pytest.raises(TruncatedError):
        read_stored(tmp_path / "gone.zst", 0, 10)


def test_names() -> None:
    assert volume_name(1) == "vol-001"
    assert volume_name(1234) == "vol-1234"
    assert pack_name(12) == "pack-0012.zst"
