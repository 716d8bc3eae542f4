"""The bundle manifest: dataclasses, hostile-input parsing and canonical bytes.

Pure: bytes in, objects out; no files, no clock. The manifest is the one signed document of a
bundle (signatures cover its exact bytes, see ``appliance.format.signing``), so the parser
treats its input as hostile even after the signature threshold is met: size cap first, then
``format_version``, then every field, with unknown keys, duplicate paths, lying sizes and
mismatched Merkle roots refused.

Public API (called by the bundle reader, the importer and peers):

- ``Manifest(format_version, channel, sequence, created, expires, models)``
- ``ModelEntry(name, version, license, provenance, gguf, files)``
- ``Provenance(builder, sources)`` / ``SourceRecord(path, source, sha256)``
- ``GgufInfo(architecture, quantization, parameter_count, context_length, tensor_count,
  chat_template_hash)``
- ``FileEntry(path, size, merkle_root, chunks)`` / ``ChunkRef(digest, length, offset)``;
  parsed chunks are a compact ``ChunkList`` (a sequence of ``ChunkRef`` made on demand)
- ``parse_manifest(data, limits) -> Manifest`` raises ``FormatError``,
  ``UnsafePathError``, ``LimitExceededError``
- ``manifest_bytes(manifest) -> bytes`` deterministic (sorted keys), what the builder signs
- ``manifest_hash(data) -> str`` BLAKE3 hex of the exact bytes

Chunk offsets are not stored; they follow from the lengths and are computed while parsing.
The exact YAML schema is in docs/FORMAT.md, section "Manifest".
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import blake3

from appliance.errors import FormatError, LimitExceededError, UnsafePathError
from appliance.format import fields, yamlsafe
from appliance.format.chunklist import ChunkList, ChunkRef
from appliance.format.fields import format_timestamp, parse_timestamp
from appliance.format.merkle import merkle_root
from appliance.format.parity_field import ParitySection, parity_to_value, parse_parity
from appliance.limits import DEFAULT_LIMITS, Limits

FORMAT_VERSION = 1
DIGEST_HEX_CHARS = 64
SHA256_HEX_CHARS = 64


@dataclass(frozen=True)
class FileEntry:
    """A model file: ``path`` relative to the model's directory, ``size`` in bytes, the
    Merkle ``merkle_root`` (hex) over its chunk digests, and its ``chunks`` in file order
    (a ``ChunkList`` when parsed; the builder's tuples work the same)."""

    path: str
    size: int
    merkle_root: str
    chunks: Sequence[ChunkRef]


@dataclass(frozen=True)
class SourceRecord:
    """Where the builder got one file: ``source`` (e.g. ``hf:org/repo@rev/file.gguf``) and the
    ``sha256`` (hex) of the upstream file, so a site can compare with the publisher's hash."""

    path: str
    source: str
    sha256: str


@dataclass(frozen=True)
class Provenance:
    builder: str  # e.g. "appliance 0.1.0"
    sources: tuple[SourceRecord, ...]


@dataclass(frozen=True)
class GgufInfo:
    """GGUF facts of the model's first GGUF file (see ``appliance.gguf_layout``)."""

    architecture: str
    quantization: str | None
    parameter_count: int | None
    context_length: int | None
    tensor_count: int
    chat_template_hash: str | None


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    license: str
    provenance: Provenance
    gguf: GgufInfo | None
    files: tuple[FileEntry, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Manifest:
    format_version: int
    channel: str
    sequence: int
    created: datetime
    expires: datetime
    models: tuple[ModelEntry, ...]
    parity: ParitySection | None = None  # optional: bundles built with --parity

    @property
    def total_bytes(self) -> int:
        return sum(m.size for m in self.models)

    def iter_chunks(self) -> Iterator[tuple[ModelEntry, FileEntry, ChunkRef]]:
        """Every chunk reference in manifest order (duplicates included)."""
        for model in self.models:
            for file in model.files:
                for chunk in file.chunks:
                    yield model, file, chunk

    def unique_chunks(self) -> ChunkList:
        """Each distinct chunk once, in order of first appearance: the order of media packs.
        Compact (a ``ChunkList``), as readers keep it for a whole import."""
        seen: set[bytes] = set()
        digests = bytearray()
        lengths: array[int] = array("Q")
        offsets: array[int] = array("Q")
        for _, _, chunk in self.iter_chunks():
            raw = bytes.fromhex(chunk.digest)
            if raw not in seen:
                seen.add(raw)
                digests += raw
                lengths.append(chunk.length)
                offsets.append(chunk.offset)
        return ChunkList.from_arrays(bytes(digests), lengths, offsets)

    def find_model(self, name: str, version: str | None = None) -> ModelEntry | None:
        for model in self.models:
            if model.name == name and (version is None or model.version == version):
                return model
        return None


# ---------------------------------------------------------------------------------------------
# Serialising


def _chunk_text(chunk: ChunkRef) -> str:
    return f"{chunk.digest} {chunk.length}"


def manifest_to_value(manifest: Manifest) -> dict[str, Any]:
    """The plain-value tree that ``manifest_bytes`` dumps (also handy for --json output)."""
    return {
        "format_version": manifest.format_version,
        "channel": manifest.channel,
        "sequence": manifest.sequence,
        "created": format_timestamp(manifest.created),
        "expires": format_timestamp(manifest.expires),
        "models": [
            {
                "name": m.name,
                "version": m.version,
                "license": m.license,
                "provenance": {
                    "builder": m.provenance.builder,
                    "sources": [
                        {"path": s.path, "source": s.source, "sha256": s.sha256}
                        for s in m.provenance.sources
                    ],
                },
                "gguf": None
                if m.gguf is None
                else {
                    "architecture": m.gguf.architecture,
                    "quantization": m.gguf.quantization,
                    "parameter_count": m.gguf.parameter_count,
                    "context_length": m.gguf.context_length,
                    "tensor_count": m.gguf.tensor_count,
                    "chat_template_hash": m.gguf.chat_template_hash,
                },
                "files": [
                    {
                        "path": f.path,
                        "size": f.size,
                        "merkle_root": f.merkle_root,
                        "chunks": [_chunk_text(c) for c in f.chunks],
                    }
                    for f in m.files
                ],
            }
            for m in manifest.models
        ],
        **({"parity": parity_to_value(manifest.parity)} if manifest.parity else {}),
    }


def manifest_bytes(manifest: Manifest) -> bytes:
    """Deterministic bytes of ``manifest`` (sorted keys, block YAML): what gets signed."""
    return yamlsafe.dump(manifest_to_value(manifest))


def manifest_hash(data: bytes) -> str:
    """BLAKE3 (hex) of a manifest's exact bytes: the bundle's identity."""
    return blake3.blake3(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Parsing hostile bytes


def parse_manifest(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """Parse untrusted manifest bytes into a ``Manifest`` or raise a ``FormatError`` subclass.

    Checks, in order: size cap, YAML safety (no aliases, tags, duplicate keys; depth cap),
    ``format_version``, then every field: unknown keys, types, names, paths (``UnsafePathError``),
    counts and lengths against ``limits`` (``LimitExceededError``), chunk lengths summing to the
    declared size, and each file's Merkle root matching its chunk list.
    """
    root = yamlsafe.load(
        data, max_bytes=limits.max_manifest_bytes, max_depth=limits.max_yaml_depth,
        what="manifest",
    )
    if not isinstance(root, dict):
        raise FormatError("manifest: top level must be a mapping")
    version = root.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise FormatError(
            f"manifest: unsupported format_version {version!r} (this reader knows "
            f"{FORMAT_VERSION})"
        )
    fields.keys(root, {"format_version", "channel", "sequence", "created", "expires", "models"},
                {"parity"}, "manifest")
    channel = fields.name(root["channel"], "manifest channel", limits.max_name_bytes)
    sequence = fields.sequence_number(root["sequence"], "manifest sequence")
    created = parse_timestamp(root["created"], "manifest created")
    expires = parse_timestamp(root["expires"], "manifest expires")
    if expires <= created:
        raise FormatError("manifest: expires is not after created")
    models_raw = fields.items(root["models"], "manifest models", nonempty=True,
                              max_items=limits.max_models)
    models = tuple(_parse_model(raw, i, limits) for i, raw in enumerate(models_raw))
    seen: set[tuple[str, str]] = set()
    for model in models:
        key = (model.name, model.version)
        if key in seen:
            raise FormatError(f"manifest: model {model.name} {model.version} appears twice")
        seen.add(key)
    return Manifest(
        format_version=version, channel=channel, sequence=sequence, created=created,
        expires=expires, models=models,
        parity=parse_parity(root["parity"]) if "parity" in root else None,
    )


def _parse_model(raw: object, index: int, limits: Limits) -> ModelEntry:
    where = f"manifest models[{index}]"
    mapping = fields.record(raw, {"name", "version", "license", "provenance", "gguf", "files"},
                            where)
    name = fields.name(mapping["name"], f"{where}.name", limits.max_name_bytes, slash=True)
    where = f"model {name}"
    version = fields.name(mapping["version"], f"{where} version", limits.max_name_bytes)
    license_ = fields.text(mapping["license"], f"{where} license", limits.max_name_bytes)
    files_raw = fields.items(mapping["files"], f"{where} files", nonempty=True,
                             max_items=limits.max_files_per_model)
    files = tuple(_parse_file(f, f"{where} files[{i}]", limits) for i, f in enumerate(files_raw))
    paths = [f.path for f in files]
    check_unique_paths(paths, where)
    provenance = _parse_provenance(mapping["provenance"], f"{where} provenance", paths, limits)
    gguf = None if mapping["gguf"] is None else _parse_gguf(mapping["gguf"], f"{where} gguf",
                                                            limits)
    return ModelEntry(name=name, version=version, license=license_, provenance=provenance,
                      gguf=gguf, files=files)


def _parse_file(raw: object, where: str, limits: Limits) -> FileEntry:
    mapping = fields.record(raw, {"path", "size", "merkle_root", "chunks"}, where)
    path = check_path(mapping["path"], where, limits)
    where = f"file {path}"
    size = fields.integer(mapping["size"], f"{where} size", maximum=limits.max_file_bytes,
                          cap=True)
    root_hex = fields.hex64(mapping["merkle_root"], f"{where} merkle_root")
    chunks_raw = fields.items(mapping["chunks"], f"{where} chunks",
                              max_items=limits.max_chunks_per_file)
    digests = bytearray()
    lengths = array("Q")
    offsets = array("Q")
    offset = 0
    for i, text in enumerate(chunks_raw):
        digest, length = _parse_chunk_text(text, f"{where} chunks[{i}]", limits)
        digests += bytes.fromhex(digest)
        lengths.append(length)
        offsets.append(offset)
        offset += length
        if offset > size:
            raise FormatError(f"{where}: chunk lengths exceed the declared size {size}")
    if offset != size:
        raise FormatError(f"{where}: chunk lengths sum to {offset}, declared size is {size}")
    # The parsed YAML tree is this parser's own: drop its chunk strings (about 120 bytes each)
    # as soon as they are packed, so the peak is not both forms of every chunk at once.
    chunks_raw.clear()
    chunks = ChunkList.from_arrays(bytes(digests), lengths, offsets)
    del digests
    computed = merkle_root(chunks.raw_digests()).hex()
    if computed != root_hex:
        raise FormatError(f"{where}: merkle_root does not match the chunk list")
    return FileEntry(path=path, size=size, merkle_root=root_hex, chunks=chunks)


def _parse_chunk_text(text: object, where: str, limits: Limits) -> tuple[str, int]:
    if not isinstance(text, str):
        raise FormatError(f"{where}: expected '<blake3 hex> <length>'")
    parts = text.split(" ")
    if len(parts) != 2 or not parts[1].isascii() or not parts[1].isdigit():
        raise FormatError(f"{where}: expected '<blake3 hex> <length>'")
    digest = fields.hex64(parts[0], where)
    if len(parts[1]) > 1 and parts[1][0] == "0":
        raise FormatError(f"{where}: length has a leading zero")
    length = int(parts[1])
    if length == 0:
        raise FormatError(f"{where}: zero-length chunk")
    if length > limits.max_chunk_bytes:
        raise LimitExceededError(
            f"{where}: chunk of {length} bytes, over the cap of {limits.max_chunk_bytes}"
        )
    return digest, length


def _parse_provenance(raw: object, where: str, paths: Sequence[str], limits: Limits
                      ) -> Provenance:
    mapping = fields.record(raw, {"builder", "sources"}, where)
    builder = fields.text(mapping["builder"], f"{where} builder", limits.max_name_bytes)
    sources_raw = fields.items(mapping["sources"], f"{where} sources",
                               max_items=limits.max_files_per_model)
    sources: list[SourceRecord] = []
    for i, item in enumerate(sources_raw):
        w = f"{where} sources[{i}]"
        m = fields.record(item, {"path", "source", "sha256"}, w)
        sources.append(SourceRecord(
            path=check_path(m["path"], w, limits),
            source=fields.text(m["source"], f"{w} source", limits.max_path_bytes),
            sha256=fields.hex64(m["sha256"], f"{w} sha256"),
        ))
    if sorted(s.path for s in sources) != sorted(paths):
        raise FormatError(f"{where}: sources must name each file exactly once")
    return Provenance(builder=builder, sources=tuple(sources))


def _parse_gguf(raw: object, where: str, limits: Limits) -> GgufInfo:
    m = fields.record(raw, {"architecture", "quantization", "parameter_count",
                            "context_length", "tensor_count", "chat_template_hash"}, where)
    cth = m["chat_template_hash"]
    return GgufInfo(
        architecture=fields.text(m["architecture"], f"{where} architecture",
                                 limits.max_name_bytes),
        quantization=None if m["quantization"] is None
        else fields.text(m["quantization"], f"{where} quantization", limits.max_name_bytes),
        parameter_count=None if m["parameter_count"] is None
        else fields.integer(m["parameter_count"], f"{where} parameter_count", cap=True),
        context_length=None if m["context_length"] is None
        else fields.integer(m["context_length"], f"{where} context_length", cap=True),
        tensor_count=fields.integer(m["tensor_count"], f"{where} tensor_count", cap=True),
        chat_template_hash=None if cth is None
        else fields.hex64(cth, f"{where} chat_template_hash"),
    )


# ---------------------------------------------------------------------------------------------
# Field checks (the shared ones live in appliance.format.fields)


def check_path(value: object, where: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """A safe relative POSIX path or ``UnsafePathError``: not absolute, no ``..`` or ``.``
    segments, no empty segments, no backslash, NUL or control characters, no segment a file
    system cannot hold (over 255 bytes, a reserved name), capped length."""
    return fields.relative_path(value, where, limits.max_path_bytes)


def check_unique_paths(paths: Sequence[str], where: str) -> None:
    """Refuse duplicate paths, and a path that is also a directory of another (a/b and a/b/c),
    compared case-insensitively because removable media are often FAT32 or exFAT."""
    seen: set[str] = set()
    for path in paths:
        key = path.casefold()
        if key in seen:
            raise UnsafePathError(f"{where}: duplicate path {path!r}")
        seen.add(key)
    for path in paths:
        parts = path.casefold().split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in seen:
                raise UnsafePathError(f"{where}: {path!r} is inside another file's path")
