"""Chunk planning and hashing on real GGUF files: coverage, cut points, edit stability."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import blake3
import gguf
import numpy as np
import pytest

from appliance.chunker import (
    GEAR,
    MIN_CHUNK_BYTES,
    CdcParams,
    FilePlan,
    Span,
    cdc_spans,
    gear_hashes,
    hash_spans,
    header_target,
    iter_span_bytes,
    plan_file,
    plan_spans,
)
from appliance.errors import FormatError, LimitExceededError, TruncatedError, UsageError
from appliance.gguf_layout import (
    FIXED_HEADER_BYTES,
    GgufBoundaries,
    gguf_boundaries,
    read_gguf_facts,
)
from appliance.limits import MAX_CHUNK_BYTES, TARGET_CHUNK_BYTES, Limits

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def write_gguf(
    path: Path, tensors: list[tuple[str, np.ndarray]], kvs: Mapping[str, object]
) -> Path:
    writer = gguf.GGUFWriter(str(path), "testarch")
    for key, value in kvs.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, int(value))  # type: ignore[call-overload]
    for name, array in tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_chat_template(source: Path, target: Path) -> Path:
    """The issue's edit: gguf-new-metadata --chat-template, which shifts every tensor."""
    script = shutil.which("gguf-new-metadata", path=str(Path(sys.executable).parent))
    argv = [script] if script else [sys.executable, "-m", "gguf.scripts.gguf_new_metadata"]
    argv += [str(source), str(target), "--chat-template", TEMPLATE, "--force"]
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    return target


def assert_valid(spans: list[Span], size: int, maximum: int) -> None:
    assert sum(s.length for s in spans) == size
    position = 0
    for span in spans:
        assert span.offset == position
        assert 1 <= span.length <= maximum
        position = span.end


def digests_by_tensor(
    path: Path, target: int = TARGET_CHUNK_BYTES, maximum: int = MAX_CHUNK_BYTES
) -> dict[str, list[bytes]]:
    """Hashes of the chunks starting inside each tensor's extent (its data and padding)."""
    b = gguf_boundaries(path)
    spans = plan_spans(path, target=target, maximum=maximum)
    digests = hash_spans(path, spans)
    starts = [t.offset for t in b.tensors]
    ends = [*starts[1:], b.file_size]
    result: dict[str, list[bytes]] = {}
    for tensor, end in zip(b.tensors, ends, strict=True):
        result[tensor.name] = [
            d for s, d in zip(spans, digests, strict=True) if tensor.offset <= s.offset < end
        ]
    return result


# --- coverage and cut points ---------------------------------------------------------


def check_tensor_cuts(b: GgufBoundaries, spans: list[Span], target: int, maximum: int) -> None:
    small = min(MIN_CHUNK_BYTES, target)
    starts = {s.offset for s in spans}
    tensor_starts = [t.offset for t in b.tensors]
    extents = dict(zip(tensor_starts, [*tensor_starts[1:], b.file_size], strict=True))
    for start, end in extents.items():
        if end - start >= small:
            # A big tensor starts a chunk, and is split every `maximum` bytes from its start.
            assert set(range(start, end, maximum)) <= starts
            assert end in starts or end == b.file_size
    for span in spans:
        inside = [t for t in tensor_starts if span.offset < t < span.end]
        if inside:  # straddles tensor starts only when coalescing small tensors
            assert span.length <= target
            assert all(extents[t] - t < small for t in [span.offset, *inside])


def check_header_cuts(b: GgufBoundaries, spans: list[Span], target: int, maximum: int) -> None:
    group = header_target(target, maximum)
    allowed = {e.end for e in b.kv_entries} | {e.end for e in b.tensor_infos}
    allowed |= {FIXED_HEADER_BYTES, b.data_start}
    big = [e for e in b.kv_entries if e.length > group]
    assert spans[0] == Span(0, FIXED_HEADER_BYTES)
    for span in spans:
        if span.end > b.data_start:
            break
        inside_big = any(e.offset < span.end < e.end for e in big)
        assert span.end in allowed or inside_big, span
    assert any(s.offset == b.table_end for s in spans)  # data padding is its own chunk


def test_many_tensor_default_sizes(many_tensor_gguf: Path) -> None:
    spans = plan_spans(many_tensor_gguf)
    size = many_tensor_gguf.stat().st_size
    assert_valid(spans, size, MAX_CHUNK_BYTES)
    b = gguf_boundaries(many_tensor_gguf)
    check_tensor_cuts(b, spans, TARGET_CHUNK_BYTES, MAX_CHUNK_BYTES)
    check_header_cuts(b, spans, TARGET_CHUNK_BYTES, MAX_CHUNK_BYTES)
    data_spans = [s for s in spans if s.offset >= b.data_start]
    coalesced = [s for s in data_spans if sum(s.offset <= t.offset < s.end for t in b.tensors) > 1]
    assert coalesced, "small tensors should have been coalesced"
    assert len(data_spans) < len(b.tensors)


@pytest.mark.parametrize(("target", "maximum"), [(64 << 10, 256 << 10), (1 << 20, 1 << 20)])
def test_many_tensor_small_chunks(many_tensor_gguf: Path, target: int, maximum: int) -> None:
    spans = plan_spans(many_tensor_gguf, target=target, maximum=maximum)
    assert_valid(spans, many_tensor_gguf.stat().st_size, maximum)
    b = gguf_boundaries(many_tensor_gguf)
    check_tensor_cuts(b, spans, target, maximum)
    check_header_cuts(b, spans, target, maximum)
    assert any(s.length == maximum for s in spans if s.offset >= b.data_start)


def test_tiny_llama(tiny_gguf: Path) -> None:
    spans = plan_spans(tiny_gguf, target=8 << 10, maximum=16 << 10)
    assert_valid(spans, tiny_gguf.stat().st_size, 16 << 10)
    b = gguf_boundaries(tiny_gguf)
    check_tensor_cuts(b, spans, 8 << 10, 16 << 10)
    check_header_cuts(b, spans, 8 << 10, 16 << 10)


def test_non_gguf_files_are_cut_fixed_size(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(os.urandom(100_000))
    spans = plan_spans(path, target=16 << 10, maximum=32 << 10)
    assert_valid(spans, 100_000, 32 << 10)
    assert [s.length for s in spans] == [16 << 10] * 6 + [100_000 - 6 * (16 << 10)]
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert plan_spans(empty) == []
    short = tmp_path / "GGUF-ish"
    short.write_bytes(b"GGUF" + b"\x00" * 10)  # under the fixed header: not a GGUF at all
    assert plan_spans(short) == [Span(0, 14)]


def test_plan_file_gives_spans_and_facts_in_one_walk(tiny_gguf: Path, tmp_path: Path) -> None:
    plan = plan_file(tiny_gguf, target=8 << 10, maximum=16 << 10)
    assert list(plan.spans) == plan_spans(tiny_gguf, target=8 << 10, maximum=16 << 10)
    assert plan.facts == read_gguf_facts(tiny_gguf)
    assert plan.size == tiny_gguf.stat().st_size
    other = tmp_path / "README.md"
    other.write_text("hello")
    assert plan_file(other) == FilePlan((Span(0, 5),), None, 5)


def test_bad_sizes_are_usage_errors(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    with pytest.raises(UsageError):
        plan_spans(path, target=2 << 20, maximum=1 << 20)
    with pytest.raises(UsageError):
        plan_spans(path, target=0)
    with pytest.raises(UsageError):
        plan_spans(path, target=1024, maximum=2048)
    with pytest.raises(UsageError):
        plan_spans(path, maximum=128 << 20, target=1 << 20, limits=Limits(max_chunk_bytes=64 << 20))
    with pytest.raises(UsageError):
        plan_spans(tmp_path / "absent")


def test_malformed_gguf_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    data = tiny_gguf.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError) as excinfo:
        plan_spans(broken)
    assert excinfo.type is FormatError
    with pytest.raises(LimitExceededError):
        plan_spans(tiny_gguf, limits=Limits(max_gguf_tensor_count=3))


# --- stability under edits -----------------------------------------------------------


def changed_fraction(before: Path, after: Path, target: int, maximum: int) -> float:
    old = set(hash_spans(before, plan_spans(before, target=target, maximum=maximum)))
    spans = plan_spans(after, target=target, maximum=maximum)
    digests = hash_spans(after, spans)
    changed = sum(s.length for s, d in zip(spans, digests, strict=True) if d not in old)
    return changed / after.stat().st_size


def check_chat_template_edit(
    source: Path, edited: Path, target: int = TARGET_CHUNK_BYTES, maximum: int = MAX_CHUNK_BYTES
) -> float:
    add_chat_template(source, edited)
    before, after = gguf_boundaries(source), gguf_boundaries(edited)
    assert after.data_start != before.data_start, "the edit must shift the tensors"
    assert [t.offset - after.data_start for t in after.tensors] == [
        t.offset - before.data_start for t in before.tensors
    ]
    assert digests_by_tensor(edited, target, maximum) == digests_by_tensor(source, target, maximum)
    fraction = changed_fraction(source, edited, target, maximum)
    assert fraction < 0.01
    return fraction


def test_chat_template_edit_keeps_every_tensor_chunk(
    many_tensor_gguf: Path, tmp_path: Path
) -> None:
    check_chat_template_edit(many_tensor_gguf, tmp_path / "edited.gguf")


def test_chat_template_edit_with_small_chunks(many_tensor_gguf: Path, tmp_path: Path) -> None:
    check_chat_template_edit(
        many_tensor_gguf, tmp_path / "edited.gguf", target=64 << 10, maximum=256 << 10
    )


@pytest.mark.slow
def test_chat_template_edit_on_real_gemma(gemma_gguf: Path, tmp_path: Path) -> None:
    fraction = check_chat_template_edit(gemma_gguf, tmp_path / "gemma-template.gguf")
    print(f"gemma3-270m chat-template edit: {fraction:.6%} of the file in changed chunks")


def test_two_quants_share_their_identical_tensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    shared_big = rng.standard_normal((256, 512), dtype=np.float32)  # 512 KiB
    shared_norms = [rng.standard_normal(512, dtype=np.float32) for _ in range(3)]
    weights = rng.standard_normal((512, 1024), dtype=np.float32)
    vocab = {"tokenizer.ggml.tokens": [f"tok{i}" for i in range(5000)]}

    def model(path: Path, quantized: np.ndarray) -> Path:
        tensors = [
            ("blk.0.attn_q", quantized),  # differs, and so shifts everything after it
            ("blk.0.norm_a", shared_norms[0]),
            ("blk.0.norm_b", shared_norms[1]),
            ("blk.0.ffn", shared_big),
            ("blk.0.norm_c", shared_norms[2]),
            ("output", shared_big * 2),
        ]
        return write_gguf(path, tensors, vocab)

    q8 = model(tmp_path / "q8.gguf", weights.astype(np.float16))
    f32 = model(tmp_path / "f32.gguf", weights)
    a, b = digests_by_tensor(q8), digests_by_tensor(f32)
    assert a["blk.0.attn_q"] != b["blk.0.attn_q"]
    assert a["blk.0.ffn"] == b["blk.0.ffn"] != []
    assert a["output"] == b["output"] != []
    # The run of small norms between two big tensors coalesces to the same chunk.
    assert a["blk.0.norm_a"] == b["blk.0.norm_a"] != []
    assert a["blk.0.norm_c"] == b["blk.0.norm_c"] != []
    # The metadata chunks (vocabulary) are shared too.
    kv_end = gguf_boundaries(q8).kv_end
    metadata = [s for s in plan_spans(q8) if s.end <= kv_end]
    assert set(hash_spans(q8, metadata)) <= set(hash_spans(f32, plan_spans(f32)))


def test_vocab_edit_changes_only_nearby_header_chunks(tmp_path: Path) -> None:
    tokens = [f"piece-{i:05d}-{(i * 2654435761) % 2**32:08x}" for i in range(30_000)]
    edited = list(tokens)
    edited[15_000] = "a-much-longer-replacement-token-that-shifts-every-later-byte"
    tensor = [("w", np.arange(1024, dtype=np.float32))]
    first = write_gguf(tmp_path / "a.gguf", tensor, {"tokenizer.ggml.tokens": tokens})
    second = write_gguf(tmp_path / "b.gguf", tensor, {"tokenizer.ggml.tokens": edited})
    target, maximum = 64 << 10, 256 << 10
    layout = gguf_boundaries(second)
    header = layout.kv_entries[-1]
    assert header.length > 10 * header_target(
        target, maximum
    )  # cut content-defined into many pieces
    spans = plan_spans(second, target=target, maximum=maximum)
    old = set(hash_spans(first, plan_spans(first, target=target, maximum=maximum)))
    new = [s for s, d in zip(spans, hash_spans(second, spans), strict=True) if d not in old]
    assert sum(s.length for s in new) < 0.1 * header.length
    # Only vocabulary pieces near the edit, and the data padding (the header got longer).
    assert all(header.offset <= s.offset < header.end for s in new if s.offset != layout.table_end)
    assert len(new) <= 4


# --- content-defined cutting -----------------------------------------------------------


def test_gear_hash_matches_the_byte_loop() -> None:
    data = np.random.default_rng(3).integers(0, 256, size=5000, dtype=np.uint8)
    expected, h = [], 0
    for byte in data:
        h = ((h << 1) + int(GEAR[byte])) & 0xFFFFFFFF
        expected.append(h)
    assert gear_hashes(data).tolist() == expected


def reference_cdc(data: bytes, params: CdcParams) -> list[int]:
    """docs/FORMAT.md's CDC, byte by byte: the piece lengths."""
    hashes, h = [], 0
    for byte in data:
        h = (h * 2 + int(GEAR[byte])) % 2**32
        hashes.append(h)
    candidate = [False] + [value >> (32 - params.bits) == 0 for value in hashes]
    lengths, s, total = [], 0, len(data)
    while s < total:
        if s + params.min_len >= total:
            end = total
        else:
            top = min(s + params.max_len, total)
            end = next((e for e in range(s + params.min_len, top + 1) if candidate[e]), top)
        lengths.append(end - s)
        s = end
    return lengths


@pytest.mark.parametrize("block_bytes", [32, 1000, 4096, 1 << 20])
def test_cdc_matches_the_spec_for_any_block_size(tmp_path: Path, block_bytes: int) -> None:
    rng = np.random.default_rng(5)
    # Random bytes, then a constant stretch (forced cuts only), then random again.
    data = rng.bytes(40_000) + b"\x07" * 20_000 + rng.bytes(30_001)
    params = CdcParams(min_len=600, bits=10, max_len=5000)
    path = tmp_path / "data"
    path.write_bytes(b"prefix" + data)
    with path.open("rb") as handle:
        spans = cdc_spans(handle, 6, len(data), params, block_bytes=block_bytes)
    assert [s.length for s in spans] == reference_cdc(data, params)
    assert spans[0].offset == 6 and spans[-1].end == 6 + len(data)


def test_cdc_cuts_depend_only_on_content(tmp_path: Path) -> None:
    payload = np.random.default_rng(4).bytes(3 << 20)
    params = CdcParams(min_len=8 << 10, bits=15, max_len=128 << 10)
    relative = []
    for prefix in (0, 1, 12345):
        path = tmp_path / f"p{prefix}"
        path.write_bytes(os.urandom(prefix) + payload)
        with path.open("rb") as handle:
            spans = cdc_spans(handle, prefix, len(payload), params)
        assert_valid([Span(s.offset - prefix, s.length) for s in spans], len(payload), 128 << 10)
        relative.append([(s.offset - prefix, s.length) for s in spans])
    assert relative[0] == relative[1] == relative[2]
    lengths = [length for _, length in relative[0][:-1]]
    assert all(length >= 8 << 10 for length in lengths)
    assert 8 << 10 < sum(lengths) / len(lengths) < 128 << 10  # not all forced cuts


def test_cdc_on_constant_bytes_uses_forced_cuts(tmp_path: Path) -> None:
    path = tmp_path / "zeros"
    path.write_bytes(b"\x01\x00\x00\x00" * 100_000)
    params = CdcParams(min_len=1024, bits=12, max_len=16 << 10)
    with path.open("rb") as handle:
        spans = cdc_spans(handle, 0, 400_000, params)
    assert_valid(spans, 400_000, 16 << 10)


def test_cdc_rejects_bad_parameters(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    with path.open("rb") as handle, pytest.raises(UsageError):
        cdc_spans(handle, 0, 100, CdcParams(min_len=8, bits=4, max_len=64))


# --- hashing -------------------------------------------------------------------------


def test_hash_spans_are_blake3_of_the_bytes(many_tensor_gguf: Path) -> None:
    spans = plan_spans(many_tensor_gguf)
    calls: list[tuple[int, int]] = []
    digests = hash_spans(many_tensor_gguf, spans, progress=lambda d, t: calls.append((d, t)))
    data = many_tensor_gguf.read_bytes()
    for span, digest in zip(spans, digests, strict=True):
        assert digest == blake3.blake3(data[span.offset : span.end]).digest()
    assert calls[-1] == (len(data), len(data))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.slow
def test_planning_and_hashing_a_real_model_keeps_memory_flat(gemma_gguf: Path) -> None:
    # VmHWM, not ru_maxrss: the latter inherits the forking pytest process's peak on Linux.
    code = (
        "import sys; from pathlib import Path; "
        "from appliance.chunker import plan_spans, hash_spans; "
        "p = Path(sys.argv[1]); hash_spans(p, plan_spans(p)); "
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    )
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status")
    done = subprocess.run(
        [sys.executable, "-c", code, str(gemma_gguf)], capture_output=True, text=True, check=True
    )
    peak_mib = int(done.stdout.strip()) / 1024
    assert peak_mib < 150, f"peak RSS {peak_mib:.0f} MiB for a 253 MB model"


def test_iter_span_bytes_seeks_for_non_contiguous_spans(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 10)
    got = [bytes(v) for _, v in iter_span_bytes(path, [Span(10, 5), Span(600, 3), Span(0, 2)])]
    assert got == [bytes(range(10, 15)), bytes([88, 89, 90]), b"\x00\x01"]


def test_file_truncated_after_planning(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(50_000))
    spans = plan_spans(path, target=8 << 10, maximum=16 << 10)
    path.write_bytes(path.read_bytes()[:30_000])
    with pytest.raises(TruncatedError) as excinfo:
        hash_spans(path, spans)
    assert excinfo.value.offset == 30_000
