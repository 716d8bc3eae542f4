"""GGUF header walk: facts and boundaries against gguf.GGUFReader, hostile headers refused."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import blake3
import gguf
import numpy as np
import pytest
from gguf_fixtures import DEFAULT_TEMPLATE

from appliance.errors import FormatError, LimitExceededError, UsageError
from appliance.gguf_layout import (
    FIXED_HEADER_BYTES,
    GgufBoundaries,
    gguf_boundaries,
    is_gguf,
    read_gguf_facts,
    read_gguf_layout,
)
from appliance.limits import Limits

Setup = Callable[[gguf.GGUFWriter], None]


def write_gguf(
    path: Path,
    tensors: list[tuple[str, np.ndarray]],
    setup: Setup | None = None,
    *,
    arch: str = "testarch",
    alignment: int | None = None,
) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    if setup is not None:
        setup(writer)
    for name, array in tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def small_tensors(n: int = 3, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(f"t{i}", rng.standard_normal((4, 8 + i), dtype=np.float32)) for i in range(n)]


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def assert_matches_reader(path: Path, b: GgufBoundaries) -> gguf.GGUFReader:
    reader = gguf.GGUFReader(path)
    fields = [f for f in reader.fields.values() if not f.name.startswith("GGUF.")]
    assert [(f.name, f.offset) for f in fields] == [(e.name, e.offset) for e in b.kv_entries]
    assert b.kv_entries[0].offset == FIXED_HEADER_BYTES
    for entry, following in zip(b.kv_entries, b.kv_entries[1:], strict=False):
        assert entry.end == following.offset
    assert b.kv_entries[-1].end == b.kv_end
    infos = [t.field.offset for t in reader.tensors]
    assert infos == [e.offset for e in b.tensor_infos]
    assert b.tensor_infos[-1].end == b.table_end
    assert b.data_start == reader.data_offset
    theirs = sorted((int(t.data_offset), int(t.n_bytes), t.name) for t in reader.tensors)
    assert [(t.offset, t.n_bytes, t.name) for t in b.tensors] == theirs
    return reader


def test_tiny_llama_facts_match_the_gguf_reader(tiny_gguf: Path) -> None:
    layout = read_gguf_layout(tiny_gguf)
    reader = assert_matches_reader(tiny_gguf, layout.boundaries)
    facts = layout.facts
    assert facts.architecture == "llama"
    assert facts.quantization == "F16"  # general.file_type = MOSTLY_F16
    assert facts.tensor_count == len(reader.tensors)
    assert facts.parameter_count == sum(int(t.n_elements) for t in reader.tensors)
    context = reader.get_field("llama.context_length")
    assert context is not None
    assert facts.context_length == context.contents()
    assert facts.chat_template_hash == blake3.blake3(DEFAULT_TEMPLATE.encode()).hexdigest()
    assert facts.header_bytes == reader.data_offset
    assert facts.alignment == 32
    assert read_gguf_facts(tiny_gguf) == facts


def test_many_tensor_boundaries_match_the_gguf_reader(many_tensor_gguf: Path) -> None:
    b = gguf_boundaries(many_tensor_gguf)
    assert_matches_reader(many_tensor_gguf, b)
    assert len(b.tensors) == 200
    assert b.file_size == many_tensor_gguf.stat().st_size
    points = b.points
    assert list(points) == sorted(set(points))
    assert points[0] == 0 and points[-1] == b.file_size
    assert {FIXED_HEADER_BYTES, b.kv_end, b.table_end, b.data_start} <= set(points)
    assert {t.offset for t in b.tensors} <= set(points)
    assert all(t.offset % b.alignment == 0 for t in b.tensors)


def test_custom_alignment(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "a.gguf", small_tensors(), alignment=256)
    layout = read_gguf_layout(path)
    assert layout.facts.alignment == 256
    assert layout.boundaries.data_start % 256 == 0
    assert_matches_reader(path, layout.boundaries)


def test_quantization_guessed_from_tensor_types_without_file_type(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tensors: list[tuple[str, np.ndarray]] = [
        ("big", rng.standard_normal((64, 64)).astype(np.float16)),
        ("small", rng.standard_normal((4, 8), dtype=np.float32)),
        ("norm", rng.standard_normal(64, dtype=np.float32)),
    ]
    facts = read_gguf_facts(write_gguf(tmp_path / "q.gguf", tensors))
    assert facts.quantization == "F16"
    assert facts.context_length is None
    assert facts.chat_template_hash is None
    assert facts.parameter_count == 64 * 64 + 32 + 64


def test_file_type_name_wins(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "q.gguf",
        small_tensors(),
        lambda w: w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_K_M)),
    )
    assert read_gguf_facts(path).quantization == "Q4_K_M"


@pytest.mark.slow
def test_real_gemma_facts(gemma_gguf: Path) -> None:
    facts = read_gguf_facts(gemma_gguf)
    assert facts.architecture == "gemma3"
    assert facts.quantization == "Q4_K_M"
    assert facts.tensor_count == 236
    assert 260_000_000 < facts.parameter_count < 280_000_000
    assert facts.header_bytes > 6_000_000  # the 262k-token vocabulary
    b = gguf_boundaries(gemma_gguf)
    assert max(e.length for e in b.kv_entries) > 4_000_000


# --- hostile and malformed headers ---------------------------------------------------


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    def setup(w: gguf.GGUFWriter) -> None:
        w.add_string("aaa.one", "first")
        w.add_string("aaa.two", "second")
        w.add_array("test.strings", [f"s{i}" for i in range(100)])

    return write_gguf(tmp_path / "sample.gguf", small_tensors(), setup)


def exactly(excinfo: pytest.ExceptionInfo[BaseException], cls: type) -> None:
    assert excinfo.type is cls, excinfo.value


def test_bad_magic(sample: Path) -> None:
    patch(sample, 0, b"GGUX")
    with pytest.raises(FormatError) as excinfo:
        gguf_boundaries(sample)
    exactly(excinfo, FormatError)
    assert not is_gguf(sample)


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_unsupported_version(sample: Path, version: int) -> None:
    patch(sample, 4, struct.pack("<I", version))
    with pytest.raises(FormatError) as excinfo:
        read_gguf_facts(sample)
    exactly(excinfo, FormatError)


@pytest.mark.parametrize("size", [0, 3, 23, 24, 40])
def test_too_short(sample: Path, size: int) -> None:
    data = sample.read_bytes()[:size]
    sample.write_bytes(data)
    with pytest.raises(FormatError) as excinfo:
        gguf_boundaries(sample)
    exactly(excinfo, FormatError)


def test_truncated_anywhere_is_a_format_error(sample: Path) -> None:
    data = sample.read_bytes()
    b = gguf_boundaries(sample)
    cuts = [b.kv_entries[1].offset + 3, b.kv_entries[-1].offset + 20, b.kv_end + 5]
    cuts += [b.table_end - 1, b.tensors[-1].offset + 1, b.tensors[-1].end - 1]
    for cut in cuts:
        sample.write_bytes(data[:cut])
        with pytest.raises(FormatError) as excinfo:
            gguf_boundaries(sample)
        exactly(excinfo, FormatError)


@pytest.mark.parametrize("field_offset", [8, 16])  # tensor count, KV count
def test_counts_over_the_cap(sample: Path, field_offset: int) -> None:
    patch(sample, field_offset, struct.pack("<Q", 2**40))
    with pytest.raises(LimitExceededError):
        gguf_boundaries(sample)


@pytest.mark.parametrize("field_offset", [8, 16])
def test_counts_within_the_cap_but_bigger_than_the_file(sample: Path, field_offset: int) -> None:
    patch(sample, field_offset, struct.pack("<Q", 100_000))
    with pytest.raises(FormatError) as excinfo:
        gguf_boundaries(sample)
    exactly(excinfo, FormatError)


def test_counts_over_a_smaller_cap(sample: Path) -> None:
    with pytest.raises(LimitExceededError):
        gguf_boundaries(sample, limits=Limits(max_gguf_tensor_count=2))
    with pytest.raises(LimitExceededError):
        gguf_boundaries(sample, limits=Limits(max_gguf_kv_count=2))


def test_string_over_the_cap(sample: Path) -> None:
    with pytest.raises(LimitExceededError):
        gguf_boundaries(sample, limits=Limits(max_gguf_string_bytes=4))


def test_absurd_string_length(sample: Path) -> None:
    b = gguf_boundaries(sample)
    value_at = b.kv_entries[1].offset + 8 + len(b.kv_entries[1].name) + 4
    patch(sample, value_at, struct.pack("<Q", 2**60))
    with pytest.raises(LimitExceededError):
        gguf_boundaries(sample)
    patch(sample, value_at, struct.pack("<Q", 1_000_000))  # under the cap, past the end
    with pytest.raises(FormatError) as excinfo:
        gguf_boundaries(sample)
    exactly(excinfo, FormatError)


def test_absurd_array_length(sample: Path) -> None:
    b = gguf_boundaries(sample)
    entry = next(e for e in b.kv_entries if e.name == "test.strings")
    count_at = entry.offset + 8 + len(entry.name) + 4 + 4
    patch(sample, count_at, struct.pack("<Q", 2**62))
    with pytest.raises(FormatError) as excinfo:
        gguf_boundaries(sample)
    exactly(excinfo, FormatError)


def test_unknown_value_type(sample: Path) -> None:
    b = gguf_boundaries(sample)
    entry = b.kv_entries[1]
    patch(sample, entry.offset + 8 + len(entry.name), struct.pack("<I", 77))
    with pytest.raises(FormatError) as excinfo:
        gguf_boundaries(sample)
    exactly(excinfo, FormatError)


def test_duplicate_key(sample: Path) -> None:
    b = gguf_boundaries(sample)
    second = next(e for e in b.kv_entries if e.name == "aaa.two")
    patch(sample, second.offset + 8, b"aaa.one")
    with pytest.raises(FormatError, match="duplicate key") as excinfo:
        gguf_boundaries(sample)
    exactly(excinfo, FormatError)


def tensor_field_offset(b: GgufBoundaries, index: int, field: str) -> int:
    info = b.tensor_infos[index]
    tensor = next(t for t in b.tensors if t.name == info.name)
    after_dims = info.offset + 8 + len(info.name) + 4 + 8 * len(tensor.shape)
    return after_dims if field == "type" else after_dims + 4


def test_unknown_tensor_type(sample: Path) -> None:
    b = gguf_boundaries(sample)
    patch(sample, tensor_field_offset(b, 1, "type"), struct.pack("<I", 999))
    with pytest.raises(FormatError, match="unknown type") as excinfo:
        gguf_boundaries(sample)
    exactly(excinfo, FormatError)


def test_misaligned_tensor_offset(sample: Path) -> None:
    b = gguf_boundaries(sample)
    at = tensor_field_offset(b, 1, "offset")
    (offset,) = struct.unpack("<Q", sample.read_bytes()[at : at + 8])
    patch(sample, at, struct.pack("<Q", offset + 4))
    with pytest.raises(FormatError, match="aligned") as excinfo:
        gguf_boundaries(sample)
    exactly(excinfo, FormatError)


def test_overlapping_tensors(sample: Path) -> None:
    b = gguf_boundaries(sample)
    patch(sample, tensor_field_offset(b, 1, "offset"), struct.pack("<Q", 0))
    with pytest.raises(FormatError, match="overlaps") as excinfo:
        gguf_boundaries(sample)
    exactly(excinfo, FormatError)


def test_too_many_dimensions(sample: Path) -> None:
    b = gguf_boundaries(sample)
    info = b.tensor_infos[0]
    patch(sample, info.offset + 8 + len(info.name), struct.pack("<I", 9))
    with pytest.raises(FormatError) as excinfo:
        gguf_boundaries(sample)
    exactly(excinfo, FormatError)


@pytest.mark.parametrize("alignment", [0, 3, 48, 1 << 24])
def test_bad_alignment(tmp_path: Path, alignment: int) -> None:
    path = write_gguf(tmp_path / "a.gguf", small_tensors(), alignment=64)
    b = gguf_boundaries(path)
    entry = next(e for e in b.kv_entries if e.name == "general.alignment")
    patch(path, entry.end - 4, struct.pack("<I", alignment))
    with pytest.raises(FormatError, match="alignment") as excinfo:
        gguf_boundaries(path)
    exactly(excinfo, FormatError)


def test_missing_architecture_is_refused_for_facts_only(sample: Path) -> None:
    b = gguf_boundaries(sample)
    entry = next(e for e in b.kv_entries if e.name == "general.architecture")
    patch(sample, entry.offset + 8, b"general.architecturX")
    assert len(gguf_boundaries(sample).tensors) == 3
    with pytest.raises(FormatError, match="architecture") as excinfo:
        read_gguf_facts(sample)
    exactly(excinfo, FormatError)


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        read_gguf_facts(tmp_path / "absent.gguf")
    with pytest.raises(UsageError):
        is_gguf(tmp_path / "absent.gguf")
