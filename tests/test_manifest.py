"""Manifest: canonical bytes, round trip, and hostile input refused with the exact error."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import blake3
import pytest

from appliance.errors import FormatError, LimitExceededError, UnsafePathError
from appliance.format import yamlsafe
from appliance.format.manifest import (
    ChunkRef,
    FileEntry,
    GgufInfo,
    Manifest,
    ModelEntry,
    Provenance,
    SourceRecord,
    manifest_bytes,
    manifest_hash,
    manifest_to_value,
    parse_manifest,
)
from appliance.format.merkle import merkle_root
from appliance.limits import Limits

CREATED = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def make_file(path: str, pieces: list[bytes]) -> FileEntry:
    chunks, offset = [], 0
    for piece in pieces:
        chunks.append(ChunkRef(blake3.blake3(piece).hexdigest(), len(piece), offset))
        offset += len(piece)
    root = merkle_root([bytes.fromhex(c.digest) for c in chunks]).hex()
    return FileEntry(path=path, size=offset, merkle_root=root, chunks=tuple(chunks))


def make_manifest(files: list[FileEntry] | None = None, name: str = "acme/tiny") -> Manifest:
    files = files or [
        make_file("model.gguf", [b"header" * 10, b"tensor-a" * 100, b"tensor-b" * 50]),
        make_file("extra/README.txt", [b"hello"]),
    ]
    model = ModelEntry(
        name=name,
        version="q4_k_m",
        license="apache-2.0",
        provenance=Provenance(
            builder="appliance 0.1.0",
            sources=tuple(
                SourceRecord(f.path, f"path:models/{f.path}", "ab" * 32) for f in files
            ),
        ),
        gguf=GgufInfo("llama", "Q4_K_M", 1234, 2048, 3, "cd" * 32),
        files=tuple(files),
    )
    return Manifest(1, "site-models", 7, CREATED, CREATED + timedelta(days=365), (model,))


def mutate(edit: Callable[[dict[str, Any]], None]) -> bytes:
    value = copy.deepcopy(manifest_to_value(make_manifest()))
    edit(value)
    return yamlsafe.dump(value)


def test_round_trip_is_exact_and_offsets_follow_from_lengths() -> None:
    manifest = make_manifest()
    data = manifest_bytes(manifest)
    parsed = parse_manifest(data)
    assert parsed == manifest
    assert manifest_bytes(parsed) == data
    offsets = [c.offset for c in parsed.models[0].files[0].chunks]
    assert offsets == [0, 60, 860]
    assert b"offset" not in data


def test_bytes_are_deterministic_and_hash_covers_every_byte() -> None:
    data = manifest_bytes(make_manifest())
    assert data == manifest_bytes(make_manifest())
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    assert manifest_hash(data) != manifest_hash(bytes(flipped))
    assert manifest_hash(data) == blake3.blake3(data).hexdigest()


def test_unique_chunks_dedup_in_first_appearance_order() -> None:
    shared = b"same tensor bytes" * 10
    files = [make_file("a.gguf", [b"h1", shared]), make_file("b.gguf", [b"h2", shared])]
    manifest = make_manifest(files)
    unique = manifest.unique_chunks()
    assert [c.digest for c in unique] == [
        blake3.blake3(p).hexdigest() for p in (b"h1", shared, b"h2")
    ]
    assert len(list(manifest.iter_chunks())) == 4


def test_size_cap_is_checked_before_parsing() -> None:
    data = manifest_bytes(make_manifest())
    with pytest.raises(LimitExceededError):
        parse_manifest(data, Limits(max_manifest_bytes=len(data) - 1))


def test_yaml_aliases_are_refused() -> None:
    data = manifest_bytes(make_manifest()).replace(
        b"license: apache-2.0", b"license: &l apache-2.0\n  x: *l"
    )
    with pytest.raises(FormatError):
        parse_manifest(data)


def test_duplicate_yaml_key_is_refused() -> None:
    data = manifest_bytes(make_manifest()).replace(b"sequence: 7", b"sequence: 7\nsequence: 9")
    with pytest.raises(FormatError):
        parse_manifest(data)


@pytest.mark.parametrize(
    "edit",
    [
        lambda v: v.update(format_version=2),
        lambda v: v.pop("format_version"),
        lambda v: v.update(extra="field"),
        lambda v: v.pop("channel"),
        lambda v: v.update(sequence=True),
        lambda v: v.update(sequence="7"),
        lambda v: v.update(sequence=0),
        lambda v: v.update(created="2025-03-01 12:00:00"),
        lambda v: v.update(expires="2025-02-30T00:00:00Z"),
        lambda v: v.update(expires=v["created"]),
        lambda v: v.update(models=[]),
        lambda v: v["models"].append(copy.deepcopy(v["models"][0])),
        lambda v: v["models"][0].update(license=""),
        lambda v: v["models"][0]["files"][0].update(merkle_root="00" * 32),
        lambda v: v["models"][0]["files"][0].update(merkle_root="XYZ"),
        lambda v: v["models"][0]["files"][0]["chunks"].append("zz 12"),
        lambda v: v["models"][0]["files"][0]["chunks"].__setitem__(0, "ab" * 32),
        lambda v: v["models"][0]["provenance"]["sources"].pop(),
        lambda v: v["models"][0]["provenance"].update(builder=None),
        lambda v: v["models"][0]["gguf"].update(tensor_count=-1),
        lambda v: v["models"][0]["gguf"].update(surprise=1),
    ],
    ids=[
        "version-2", "no-version", "unknown-top-field", "missing-channel", "bool-sequence",
        "string-sequence", "zero-sequence", "bad-timestamp", "impossible-date",
        "expires-not-after-created", "no-models", "duplicate-model", "empty-license",
        "merkle-root-lies", "merkle-root-not-hex", "garbage-chunk", "chunk-without-length",
        "provenance-misses-a-file", "builder-null", "negative-tensor-count", "unknown-gguf-field",
    ],
)
def test_malformed_fields_are_format_errors(edit: Callable[[dict[str, Any]], None]) -> None:
    with pytest.raises(FormatError) as info:
        parse_manifest(mutate(edit))
    assert type(info.value) is FormatError


def test_unquoted_yaml_timestamp_is_refused() -> None:
    data = manifest_bytes(make_manifest()).replace(
        b"created: '2025-03-01T12:00:00Z'", b"created: 2025-03-01T12:00:00Z"
    )
    assert data != manifest_bytes(make_manifest())
    with pytest.raises(FormatError):
        parse_manifest(data)


def test_declared_size_that_lies_is_refused() -> None:
    for delta in (1, -1):
        data = mutate(lambda v, d=delta: v["models"][0]["files"][0].update(
            size=v["models"][0]["files"][0]["size"] + d))
        with pytest.raises(FormatError, match="declared size"):
            parse_manifest(data)


def test_zero_length_chunk_is_refused() -> None:
    data = mutate(lambda v: v["models"][0]["files"][1]["chunks"].append("ab" * 32 + " 0"))
    with pytest.raises(FormatError, match="zero-length"):
        parse_manifest(data)


@pytest.mark.parametrize(
    "bad_path",
    ["/etc/passwd", "../escape.gguf", "a/../../b", "a//b", "./x", "a\\b", "a\x00b", "a\nb",
     "C:/x.gguf", ""],
)
def test_unsafe_paths_are_refused(bad_path: str) -> None:
    def edit(v: dict[str, Any]) -> None:
        v["models"][0]["files"][1]["path"] = bad_path
        v["models"][0]["provenance"]["sources"][1]["path"] = bad_path

    with pytest.raises(UnsafePathError):
        parse_manifest(mutate(edit))


@pytest.mark.parametrize("dup", ["model.gguf", "MODEL.gguf", "model.gguf/inner"])
def test_duplicate_and_shadowing_paths_are_refused(dup: str) -> None:
    def edit(v: dict[str, Any]) -> None:
        v["models"][0]["files"][1]["path"] = dup
        v["models"][0]["provenance"]["sources"][1]["path"] = dup

    with pytest.raises(UnsafePathError):
        parse_manifest(mutate(edit))


@pytest.mark.parametrize("name", ["../etc", "acme/../x", "/abs", ".hidden", "a b", "acme//x"])
def test_unsafe_model_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafePathError):
        parse_manifest(mutate(lambda v: v["models"][0].update(name=name)))


def test_unsafe_version_and_channel_are_refused() -> None:
    with pytest.raises(UnsafePathError):
        parse_manifest(mutate(lambda v: v["models"][0].update(version="../q4")))
    with pytest.raises(UnsafePathError):
        parse_manifest(mutate(lambda v: v.update(channel="a/b")))


def test_chunk_count_over_limit_is_refused() -> None:
    data = manifest_bytes(make_manifest())
    with pytest.raises(LimitExceededError):
        parse_manifest(data, Limits(max_chunks_per_file=2))
    assert parse_manifest(data, Limits(max_chunks_per_file=3))


def test_chunk_length_over_limit_is_refused() -> None:
    data = manifest_bytes(make_manifest())
    with pytest.raises(LimitExceededError):
        parse_manifest(data, Limits(max_chunk_bytes=799))


def test_model_and_file_counts_over_limit_are_refused() -> None:
    data = manifest_bytes(make_manifest())
    with pytest.raises(LimitExceededError):
        parse_manifest(data, Limits(max_files_per_model=1))
    two = mutate(lambda v: v["models"].append(
        {**copy.deepcopy(v["models"][0]), "name": "acme/other"}))
    with pytest.raises(LimitExceededError):
        parse_manifest(two, Limits(max_models=1))
    assert len(parse_manifest(two).models) == 2


def test_file_size_over_limit_is_refused() -> None:
    with pytest.raises(LimitExceededError):
        parse_manifest(manifest_bytes(make_manifest()), Limits(max_file_bytes=100))


def test_gguf_facts_may_be_absent() -> None:
    data = mutate(lambda v: v["models"][0].update(gguf=None))
    assert parse_manifest(data).models[0].gguf is None


def test_empty_file_has_the_empty_merkle_root() -> None:
    files = [make_file("empty.bin", []), make_file("model.gguf", [b"x" * 10])]
    manifest = make_manifest(files)
    parsed = parse_manifest(manifest_bytes(manifest))
    assert parsed.models[0].files[0].size == 0
    assert parsed.models[0].files[0].chunks == ()


def test_not_a_mapping_and_not_yaml() -> None:
    with pytest.raises(FormatError):
        parse_manifest(b"- a\n- b\n")
    with pytest.raises(FormatError):
        parse_manifest(b"\xff\xfe not utf-8")
    with pytest.raises(FormatError):
        parse_manifest(b"key: [unclosed\n")


@pytest.mark.parametrize("bad_path", [
    "a" * 256 + ".gguf",  # one segment over NAME_MAX (255 bytes)
    "dir/" + "é" * 128,  # 256 bytes in 128 characters
    "models/nul.gguf", "CON", "x/aux.txt",  # names some file systems cannot hold
    "a/\x01b", "a/\x7f",
])
def test_names_a_file_system_cannot_hold_are_refused_at_parse_time(bad_path: str) -> None:
    def edit(v: dict[str, Any]) -> None:
        v["models"][0]["files"][1]["path"] = bad_path
        v["models"][0]["provenance"]["sources"][1]["path"] = bad_path

    with pytest.raises(UnsafePathError) as info:
        parse_manifest(mutate(edit))
    assert type(info.value) is UnsafePathError and info.value.exit_code == 2


def test_longest_segment_a_file_system_holds_is_fine() -> None:
    path = "d" * 255 + "/" + "f" * 250 + ".gguf"

    def edit(v: dict[str, Any]) -> None:
        v["models"][0]["files"][1]["path"] = path
        v["models"][0]["provenance"]["sources"][1]["path"] = path

    assert parse_manifest(mutate(edit)).models[0].files[1].path == path


@pytest.mark.parametrize("field, text", [
    ("sequence", "0x1F"), ("sequence", "017"), ("sequence", "1:20"), ("sequence", "0o17"),
])
def test_yaml_1_1_integers_in_a_manifest_are_refused(field: str, text: str) -> None:
    data = manifest_bytes(make_manifest()).replace(b"sequence: 7", f"{field}: {text}".encode())
    with pytest.raises(FormatError, match=r"YAML 1\.1") as info:
        parse_manifest(data)
    assert type(info.value) is FormatError


def test_byte_order_mark_in_a_manifest_is_refused() -> None:
    with pytest.raises(FormatError, match="byte-order mark"):
        parse_manifest(b"\xef\xbb\xbf" + manifest_bytes(make_manifest()))
