"""GGUF header reading: the facts a manifest records and the offsets the chunker cuts at.

Owns one capped, streaming walk over a GGUF file's header (magic, counts, metadata KV
entries, tensor-info table) that yields:

- ``GgufFacts``: architecture, quantization, parameter count, context length, tensor count,
  chat-template hash, where tensor data starts and the alignment;
- ``GgufBoundaries``: the byte extent of every KV entry and tensor-info entry, the alignment
  padding before the data, and each tensor's extent, so ``appliance.chunker`` can cut there;
- ``SplitInfo``: the ``split.*`` keys of one shard of a split GGUF (``appliance.gguf_split``
  checks that the shards make one whole model). Shards after the first carry only those keys
  and their tensors, so they have no facts of their own (``GgufLayout.facts`` is None).

The walk is our own rather than ``gguf.GGUFReader`` because the file may be hostile and
large: every count is checked against ``appliance.limits`` and against the bytes left
*before* anything is looped over or allocated, string arrays are skipped without building
one numpy view per token (gemma3's 262,144-token vocabulary), and only the few values the
facts need are decoded. The file is memory-mapped read-only and only header pages are
touched. The ``gguf`` package supplies the type tables (block sizes, file-type names);
the tests cross-check every offset against ``gguf.GGUFReader``.

Only little-endian GGUF version 2 and 3 files are accepted (what llama.cpp writes).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import blake3
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from appliance.errors import FormatError, LimitExceededError, UsageError
from appliance.limits import DEFAULT_LIMITS, Limits

GGUF_MAGIC = b"GGUF"
FIXED_HEADER_BYTES = 24  # magic u32, version u32, tensor_count u64, kv_count u64
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20
MAX_TENSOR_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME_BYTES = 4096
MAX_ARRAY_NESTING = 4

# GGUF value types (gguf.GGUFValueType) and the size of the fixed-size ones.
_T_STRING = 8
_T_ARRAY = 9
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_INT_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_KEY_ARCH = "general.architecture"
_KEY_ALIGNMENT = "general.alignment"
_KEY_FILE_TYPE = "general.file_type"
_KEY_CHAT_TEMPLATE = "tokenizer.chat_template"
# What llama.cpp's gguf-split (and gguf-py's GGUFWriter with split_max_*) write in every shard.
KEY_SPLIT_NO = "split.no"  # u16, 0-based index of this shard
KEY_SPLIT_COUNT = "split.count"  # u16, shards in the set
KEY_SPLIT_TENSORS = "split.tensors.count"  # i32, tensors over all shards


@dataclass(frozen=True)
class GgufFacts:
    """What a manifest says about a GGUF model, read from its header."""

    architecture: str
    quantization: str  # e.g. "Q4_K_M" from general.file_type, else the dominant tensor type
    parameter_count: int
    context_length: int | None
    tensor_count: int
    chat_template_hash: str | None  # BLAKE3 hex of tokenizer.chat_template's UTF-8 bytes
    header_bytes: int  # offset where tensor data starts (after alignment padding)
    alignment: int


@dataclass(frozen=True)
class Extent:
    """A named byte range of the file: a KV entry (name = key) or a tensor-info entry."""

    offset: int
    length: int
    name: str

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class TensorExtent:
    """One tensor's data: absolute ``offset`` in the file and ``n_bytes`` (no padding)."""

    name: str
    offset: int
    n_bytes: int
    type_name: str
    shape: tuple[int, ...]

    @property
    def end(self) -> int:
        return self.offset + self.n_bytes


@dataclass(frozen=True)
class GgufBoundaries:
    """The natural cut points of a GGUF file, in file order.

    ``[0, FIXED_HEADER_BYTES)`` holds magic, version and the two counts; ``kv_entries``
    follow back to back up to ``kv_end``; ``tensor_infos`` run from ``kv_end`` to
    ``table_end``; zero padding up to ``data_start`` (a multiple of ``alignment``); then
    ``tensors`` sorted by offset, each followed by padding or a gap up to the next one.
    """

    file_size: int
    alignment: int
    kv_entries: tuple[Extent, ...]
    kv_end: int
    tensor_infos: tuple[Extent, ...]
    table_end: int
    data_start: int
    tensors: tuple[TensorExtent, ...]

    @property
    def points(self) -> tuple[int, ...]:
        """Every boundary offset, sorted and unique, from 0 to ``file_size``."""
        found = {0, FIXED_HEADER_BYTES, self.kv_end, self.table_end, self.data_start}
        found.update(e.end for e in self.kv_entries)
        found.update(e.end for e in self.tensor_infos)
        for tensor in self.tensors:
            found.add(tensor.offset)
            found.add(tensor.end)
        found.add(self.file_size)
        return tuple(sorted(found))


@dataclass(frozen=True)
class SplitInfo:
    """One shard's place in a split GGUF (``split.count`` > 1)."""

    index: int  # split.no: 0 for the first shard, which holds the model's metadata
    count: int  # split.count
    tensor_count: int  # split.tensors.count: tensors over every shard


@dataclass(frozen=True)
class GgufLayout:
    facts: GgufFacts | None  # None only for a shard after the first of a split GGUF
    boundaries: GgufBoundaries
    split: SplitInfo | None = None
    file_type: int | None = None  # general.file_type as written, for a split model's facts


def is_gguf(path: Path) -> bool:
    """True when the file starts with the GGUF magic (it may still be malformed)."""
    try:
        with path.open("rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e


def read_gguf_facts(path: Path, *, limits: Limits = DEFAULT_LIMITS) -> GgufFacts:
    """Facts for the manifest. FormatError / LimitExceededError for a bad header, or for a
    shard after the first of a split GGUF (its metadata lives in the first shard)."""
    layout = read_gguf_layout(path, limits=limits)
    if layout.facts is None:
        assert layout.split is not None
        raise FormatError(
            f"{path.name} is shard {layout.split.index + 1} of {layout.split.count} of a split "
            "GGUF: the model's metadata is in its first shard")
    return layout.facts


def gguf_boundaries(path: Path, *, limits: Limits = DEFAULT_LIMITS) -> GgufBoundaries:
    """Every KV, tensor-info and tensor extent of the file, for the chunker.

    Needs only a well-formed structure: a file without ``general.architecture`` still has
    boundaries (``read_gguf_facts`` refuses it).
    """
    return _walk(path, limits).boundaries


def read_gguf_layout(path: Path, *, limits: Limits = DEFAULT_LIMITS) -> GgufLayout:
    """Facts, boundaries and split keys from one walk over the header.

    A shard after the first of a split GGUF has no facts (None); any other GGUF without
    ``general.architecture`` is a FormatError.
    """
    walker = _walk(path, limits)
    split = walker.split()
    facts = None if split is not None and split.index > 0 else walker.facts()
    file_type = walker.values.get(_KEY_FILE_TYPE)
    return GgufLayout(facts, walker.boundaries, split,
                      file_type if isinstance(file_type, int) else None)


def quantization_name(file_type: object, bytes_by_type: dict[str, int]) -> str:
    """``general.file_type`` as a name (Q4_K_M), else the type holding the most matrix bytes."""
    if isinstance(file_type, int):
        try:
            name = LlamaFileType(file_type).name
        except ValueError:
            name = ""
        if name and name != "GUESSED":
            return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
    if not bytes_by_type:
        return "unknown"
    return max(bytes_by_type.items(), key=lambda item: (item[1], item[0]))[0]


def _walk(path: Path, limits: Limits) -> _Walker:
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, 2)
            if size < FIXED_HEADER_BYTES:
                raise FormatError(f"{path.name}: {size} bytes is too short for a GGUF header")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                walker = _Walker(mapped, size, limits, path.name)
                walker.walk()
                return walker
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e


class _Walker:
    """One pass over the header; every read is bounds-checked against the file size."""

    def __init__(self, buf: mmap.mmap, size: int, limits: Limits, label: str) -> None:
        self.buf = buf
        self.size = size
        self.limits = limits
        self.label = label
        self.pos = 0
        self.values: dict[str, object] = {}
        # Set by walk():
        self.boundaries: GgufBoundaries
        self.tensor_count = 0
        self.parameters = 0
        self.bytes_by_type: dict[str, int] = {}

    def fail(self, message: str) -> FormatError:
        return FormatError(f"{self.label}: malformed GGUF at byte {self.pos}: {message}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes, only {self.size - self.pos} left")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(value)

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(value)

    def string(self, what: str, cap: int) -> bytes:
        length = self.u64(f"{what} length")
        if length > cap:
            raise LimitExceededError(
                f"{self.label}: {what} of {length} bytes exceeds the cap of {cap}"
            )
        self.need(length, what)
        data = self.buf[self.pos : self.pos + length]
        self.pos += length
        return data

    def skip_value(self, vtype: int, depth: int) -> None:
        fixed = _FIXED_SIZES.get(vtype)
        if fixed is not None:
            self.need(fixed, "value")
            self.pos += fixed
        elif vtype == _T_STRING:
            length = self.u64("string length")
            if length > self.limits.max_gguf_string_bytes:
                raise LimitExceededError(
                    f"{self.label}: a string of {length} bytes exceeds the cap of "
                    f"{self.limits.max_gguf_string_bytes}"
                )
            self.need(length, "string")
            self.pos += length
        elif vtype == _T_ARRAY:
            self.skip_array(depth)
        else:
            raise self.fail(f"unknown value type {vtype}")

    def skip_array(self, depth: int) -> None:
        if depth >= MAX_ARRAY_NESTING:
            raise LimitExceededError(f"{self.label}: arrays nested deeper than {depth}")
        etype = self.u32("array element type")
        count = self.u64("array length")
        fixed = _FIXED_SIZES.get(etype)
        if fixed is not None:
            self.need(count * fixed, f"array of {count} elements")
            self.pos += count * fixed
            return
        if etype not in (_T_STRING, _T_ARRAY):
            raise self.fail(f"unknown array element type {etype}")
        # Each element takes at least 8 bytes (a length or a type+count): refuse an absurd
        # count before looping over it.
        self.need(count * 8, f"array of {count} elements")
        if etype == _T_ARRAY:
            for _ in range(count):
                self.skip_array(depth + 1)
            return
        cap = self.limits.max_gguf_string_bytes
        buf, size, pos, unpack = self.buf, self.size, self.pos, _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail("string array runs past the end of the file")
            (length,) = unpack(buf, pos)
            if length > cap:
                self.pos = pos
                raise LimitExceededError(
                    f"{self.label}: a string of {length} bytes exceeds the cap of {cap}"
                )
            pos += 8 + length
        if pos > size:
            raise self.fail("string array runs past the end of the file")
        self.pos = pos

    def read_kv(self) -> Extent:
        start = self.pos
        raw_key = self.string("key", self.limits.max_gguf_string_bytes)
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail("key is not UTF-8") from e
        if key in self.values:
            raise self.fail(f"duplicate key {key!r}")
        vtype = self.u32(f"type of {key!r}")
        value_start = self.pos
        if vtype == _T_STRING and key in (_KEY_ARCH, _KEY_CHAT_TEMPLATE):
            self.values[key] = self.string(key, self.limits.max_gguf_string_bytes)
        elif vtype in _INT_FORMATS:
            self.skip_value(vtype, 0)
            (self.values[key],) = struct.unpack_from(_INT_FORMATS[vtype], self.buf, value_start)
        else:
            self.skip_value(vtype, 0)
            self.values[key] = None
        return Extent(start, self.pos - start, key)

    def read_tensor_info(
        self, alignment: int
    ) -> tuple[Extent, str, int, int, int, tuple[int, ...]]:
        start = self.pos
        raw_name = self.string("tensor name", MAX_TENSOR_NAME_BYTES)
        name = raw_name.decode("utf-8", errors="replace")
        n_dims = self.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_TENSOR_DIMS:
            raise self.fail(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(self.u64(f"dimension of {name!r}") for _ in range(n_dims))
        type_id = self.u32(f"type of {name!r}")
        offset = self.u64(f"offset of {name!r}")
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError) as e:
            raise self.fail(f"tensor {name!r} has unknown type {type_id}") from e
        elements = 1
        for dim in shape:
            elements *= dim
        if elements > self.size * 64 or shape[0] % block:
            raise self.fail(f"tensor {name!r} has an impossible shape {shape}")
        if offset % alignment:
            raise self.fail(f"tensor {name!r} offset {offset} is not {alignment}-aligned")
        n_bytes = elements // block * type_size
        extent = Extent(start, self.pos - start, name)
        return extent, qtype.name, offset, n_bytes, elements, shape

    def walk(self) -> None:
        if self.buf[0:4] != GGUF_MAGIC:
            raise self.fail("bad magic (not a GGUF file)")
        self.pos = 4
        version = self.u32("version")
        if version not in (2, 3):
            swapped = " (big-endian GGUF is not supported)" if version >= 1 << 16 else ""
            raise self.fail(f"unsupported GGUF version {version}{swapped}")
        tensor_count = self.u64("tensor count")
        kv_count = self.u64("KV count")
        limits = self.limits
        if kv_count > limits.max_gguf_kv_count:
            raise LimitExceededError(
                f"{self.label}: {kv_count} metadata entries exceed the cap of "
                f"{limits.max_gguf_kv_count}"
            )
        if tensor_count > limits.max_gguf_tensor_count:
            raise LimitExceededError(
                f"{self.label}: {tensor_count} tensors exceed the cap of "
                f"{limits.max_gguf_tensor_count}"
            )
        # Smallest KV: 8-byte key length + type + 1-byte value; smallest tensor info:
        # 8 + 4 + 8 + 4 + 8 bytes. Refuse counts the file cannot possibly hold.
        self.need(kv_count * 13 + tensor_count * 32, f"{kv_count} KVs and {tensor_count} tensors")

        kv_entries = tuple(self.read_kv() for _ in range(kv_count))
        kv_end = self.pos
        alignment = self._alignment()

        infos: list[Extent] = []
        tensors: list[TensorExtent] = []
        names: set[str] = set()
        parameters = 0
        bytes_by_type: dict[str, int] = {}
        relative: list[tuple[int, int, str, str, tuple[int, ...]]] = []
        for _ in range(tensor_count):
            extent, type_name, offset, n_bytes, elements, shape = self.read_tensor_info(alignment)
            if extent.name in names:
                raise self.fail(f"duplicate tensor {extent.name!r}")
            names.add(extent.name)
            infos.append(extent)
            relative.append((offset, n_bytes, extent.name, type_name, shape))
            parameters += elements
            if len(shape) >= 2:
                bytes_by_type[type_name] = bytes_by_type.get(type_name, 0) + n_bytes
        table_end = self.pos
        data_start = -(-table_end // alignment) * alignment
        if data_start > self.size:
            raise self.fail(f"tensor data would start at {data_start}, past the end")

        previous_end = data_start
        for offset, n_bytes, name, type_name, shape in sorted(relative):
            start = data_start + offset
            if start < previous_end:
                raise self.fail(f"tensor {name!r} overlaps the previous tensor")
            if start + n_bytes > self.size:
                raise FormatError(
                    f"{self.label}: tensor {name!r} ends at {start + n_bytes}, past the end "
                    f"of the {self.size}-byte file (truncated?)"
                )
            tensors.append(TensorExtent(name, start, n_bytes, type_name, shape))
            previous_end = start + n_bytes

        self.boundaries = GgufBoundaries(
            file_size=self.size,
            alignment=alignment,
            kv_entries=kv_entries,
            kv_end=kv_end,
            tensor_infos=tuple(infos),
            table_end=table_end,
            data_start=data_start,
            tensors=tuple(tensors),
        )
        self.tensor_count = tensor_count
        self.parameters = parameters
        self.bytes_by_type = bytes_by_type

    def _alignment(self) -> int:
        if _KEY_ALIGNMENT not in self.values:
            return DEFAULT_ALIGNMENT
        value = self.values[_KEY_ALIGNMENT]
        if not isinstance(value, int) or value <= 0 or value & (value - 1) or value > MAX_ALIGNMENT:
            raise self.fail(f"general.alignment {value!r} is not a power of two up to 1 MiB")
        return value

    def facts(self) -> GgufFacts:
        raw_arch = self.values.get(_KEY_ARCH)
        if not isinstance(raw_arch, bytes) or not raw_arch:
            raise FormatError(f"{self.label}: GGUF has no string general.architecture")
        architecture = raw_arch.decode("utf-8", errors="replace")
        context = self.values.get(f"{architecture}.context_length")
        template = self.values.get(_KEY_CHAT_TEMPLATE)
        return GgufFacts(
            architecture=architecture,
            quantization=quantization_name(self.values.get(_KEY_FILE_TYPE), self.bytes_by_type),
            parameter_count=self.parameters,
            context_length=context if isinstance(context, int) else None,
            tensor_count=self.tensor_count,
            chat_template_hash=(
                blake3.blake3(template).hexdigest() if isinstance(template, bytes) else None
            ),
            header_bytes=self.boundaries.data_start,
            alignment=self.boundaries.alignment,
        )

    def split(self) -> SplitInfo | None:
        """The split keys, when the file says it is one of several shards."""
        if KEY_SPLIT_COUNT not in self.values:
            return None
        count = self.values[KEY_SPLIT_COUNT]
        index = self.values.get(KEY_SPLIT_NO)
        tensors = self.values.get(KEY_SPLIT_TENSORS)
        label = self.label
        if not isinstance(count, int) or count < 1:
            raise FormatError(f"{label}: {KEY_SPLIT_COUNT} {count!r} is not a positive count")
        if count == 1:  # llama.cpp loads such a file alone
            return None
        if not isinstance(index, int) or not 0 <= index < count:
            raise FormatError(f"{label}: {KEY_SPLIT_NO} {index!r} is not an index below {count}")
        if not isinstance(tensors, int) or tensors < 0:
            raise FormatError(f"{label}: {KEY_SPLIT_TENSORS} {tensors!r} is not a tensor count")
        return SplitInfo(index=index, count=count, tensor_count=tensors)
