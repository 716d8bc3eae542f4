"""File -> chunk spans, and streaming BLAKE3 digests of those spans.

``plan_spans`` decides where a file is cut (docs/FORMAT.md, "Chunking", algorithm
``CHUNKER_ID``); ``hash_spans`` and ``iter_span_bytes`` read the spans back with one reused
buffer, so memory stays flat whatever the file size.

GGUF files are cut so that the chunks survive the edits models actually get:

- the 24-byte fixed header (magic, version, counts) is a chunk of its own: adding a KV
  changes the KV count and nothing else there;
- metadata KV entries are grouped whole, greedily up to the header target; a KV bigger than
  that (the vocabulary) is cut content-defined with a gear rolling hash, so its pieces do
  not depend on where it sits in the file;
- the tensor-info table is grouped the same way, and the alignment padding before the
  tensor data is a chunk of its own (its length changes whenever the header does);
- each tensor with its trailing padding is one chunk, or is split every ``maximum`` bytes
  counted from the tensor start; runs of tensors smaller than ``MIN_CHUNK_BYTES`` are
  coalesced up to ``target``. Padding lengths depend only on tensor offsets relative to the
  aligned data start, so a tensor that moves keeps its chunk hashes.

Other files are cut into fixed-size ``target`` pieces.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import blake3
import numpy as np

from appliance.errors import TruncatedError, UsageError
from appliance.gguf_layout import (
    FIXED_HEADER_BYTES,
    Extent,
    GgufBoundaries,
    GgufFacts,
    gguf_boundaries,
    is_gguf,
    read_gguf_layout,
)
from appliance.limits import (
    DEFAULT_LIMITS,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
    TARGET_CHUNK_BYTES,
    Limits,
)

CHUNKER_ID = "appliance-chunker-1"
GEAR_WINDOW = 32  # bytes that influence the 32-bit gear hash at a position
SMALLEST_MAXIMUM = 4096
_CDC_BLOCK = 32 << 10  # small enough that the gear arrays stay in cache


def _gear_table() -> np.ndarray:
    values = [
        int.from_bytes(blake3.blake3(b"appliance gear v1" + bytes([i])).digest()[:4], "little")
        for i in range(256)
    ]
    return np.array(values, dtype=np.uint32)


GEAR = _gear_table()

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Span:
    """A chunk's place in its file."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class CdcParams:
    """Content-defined cutting: a cut after ``min_len`` bytes where the top ``bits`` of the
    gear hash are zero, forced at ``max_len``. Expected piece ~ ``min_len + 2**bits``."""

    min_len: int
    bits: int
    max_len: int


def header_target(target: int, maximum: int) -> int:
    """Size the header pieces are grouped up to: a sixteenth of the tensor target."""
    return min(maximum, max(4 * GEAR_WINDOW, target // 16))


def header_cdc(target: int, maximum: int) -> CdcParams:
    """Parameters for cutting a KV entry bigger than ``header_target``."""
    group = header_target(target, maximum)
    return CdcParams(
        min_len=max(GEAR_WINDOW, group // 4),
        bits=min(31, max(1, group.bit_length() - 1)),
        max_len=min(4 * group, maximum),
    )


@dataclass(frozen=True)
class FilePlan:
    """Where a file is cut, and its GGUF facts (None for other files), from one header walk."""

    spans: tuple[Span, ...]
    facts: GgufFacts | None
    size: int


def plan_spans(
    path: Path,
    *,
    target: int = TARGET_CHUNK_BYTES,
    maximum: int = MAX_CHUNK_BYTES,
    limits: Limits = DEFAULT_LIMITS,
) -> list[Span]:
    """Contiguous spans covering ``path`` exactly, each 1..``maximum`` bytes.

    FormatError / LimitExceededError when the file claims to be GGUF but is malformed;
    UsageError when it cannot be read or the sizes make no sense.
    """
    return list(_plan(path, target, maximum, limits, want_facts=False).spans)


def plan_file(
    path: Path,
    *,
    target: int = TARGET_CHUNK_BYTES,
    maximum: int = MAX_CHUNK_BYTES,
    limits: Limits = DEFAULT_LIMITS,
) -> FilePlan:
    """``plan_spans`` plus ``read_gguf_facts`` for a builder, reading the header once.

    Unlike ``plan_spans`` it also refuses a GGUF without ``general.architecture``.
    """
    return _plan(path, target, maximum, limits, want_facts=True)


def _plan(path: Path, target: int, maximum: int, limits: Limits, *, want_facts: bool) -> FilePlan:
    if not 0 < target <= maximum:
        raise UsageError(f"chunk target {target} must be positive and at most maximum {maximum}")
    if maximum < SMALLEST_MAXIMUM:
        raise UsageError(f"chunk maximum {maximum} is below {SMALLEST_MAXIMUM} bytes")
    if maximum > limits.max_chunk_bytes:
        raise UsageError(f"chunk maximum {maximum} exceeds the cap of {limits.max_chunk_bytes}")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    if size < FIXED_HEADER_BYTES or not is_gguf(path):
        return FilePlan(tuple(_split(0, size, target)), None, size)
    facts: GgufFacts | None = None
    if want_facts:
        layout = read_gguf_layout(path, limits=limits)
        facts, boundaries = layout.facts, layout.boundaries
    else:
        boundaries = gguf_boundaries(path, limits=limits)
    try:
        with path.open("rb") as handle:
            spans = plan_gguf(boundaries, handle, target=target, maximum=maximum)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    return FilePlan(tuple(spans), facts, size)


def plan_gguf(b: GgufBoundaries, handle: BinaryIO, *, target: int, maximum: int) -> list[Span]:
    """The GGUF cutting rules over already-read boundaries; ``handle`` reads big KVs."""
    group = header_target(target, maximum)
    cdc = header_cdc(target, maximum)
    spans: list[Span] = [Span(0, FIXED_HEADER_BYTES)]
    _group_entries(spans, b.kv_entries, group, cdc, handle)
    _group_entries(spans, b.tensor_infos, group, cdc, handle)
    spans.extend(_split(b.table_end, b.data_start, maximum))

    tensor_starts = [t.offset for t in b.tensors if t.offset < b.file_size]
    first = tensor_starts[0] if tensor_starts else b.file_size
    spans.extend(_split(b.data_start, first, maximum))

    small = min(MIN_CHUNK_BYTES, target)
    ends = [*tensor_starts[1:], b.file_size]
    run_start = run_end = first
    for start, end in zip(tensor_starts, ends, strict=True):
        length = end - start
        if length == 0:
            continue
        if length < small:
            if end - run_start > target:
                spans.extend(_split(run_start, run_end, maximum))
                run_start = start
            run_end = end
            continue
        spans.extend(_split(run_start, run_end, maximum))
        spans.extend(_split(start, end, maximum))
        run_start = run_end = end
    spans.extend(_split(run_start, run_end, maximum))
    return spans


def _split(start: int, end: int, maximum: int) -> list[Span]:
    """[start, end) in pieces of ``maximum`` counted from ``start``; nothing when empty."""
    return [Span(at, min(maximum, end - at)) for at in range(start, end, maximum)]


def _group_entries(
    spans: list[Span],
    entries: Sequence[Extent],
    group: int,
    cdc: CdcParams,
    handle: BinaryIO,
) -> None:
    """Whole entries grouped up to ``group`` bytes; bigger entries cut content-defined."""
    run_start = run_end = entries[0].offset if entries else 0
    for entry in entries:
        if entry.length > group:
            if run_end > run_start:
                spans.append(Span(run_start, run_end - run_start))
            spans.extend(cdc_spans(handle, entry.offset, entry.length, cdc))
            run_start = run_end = entry.end
            continue
        if run_end - run_start + entry.length > group:
            spans.append(Span(run_start, run_end - run_start))
            run_start = entry.offset
        run_end = entry.end
    if run_end > run_start:
        spans.append(Span(run_start, run_end - run_start))


def gear_hashes(data: np.ndarray) -> np.ndarray:
    """The rolling gear hash after each byte: h = (h << 1) + GEAR[byte] mod 2**32, h0 = 0.

    Equal to the sum of GEAR[b[i - j]] << j over the last 32 bytes, computed by doubling the
    window five times (vectorised) instead of a Python loop per byte.
    """
    hashes = GEAR[data]
    shifted = np.empty_like(hashes)
    width = 1
    while width < GEAR_WINDOW:
        np.left_shift(hashes[:-width], np.uint32(width), out=shifted[width:])
        np.add(hashes[width:], shifted[width:], out=hashes[width:])
        width *= 2
    return hashes


def cdc_spans(
    handle: BinaryIO,
    offset: int,
    length: int,
    params: CdcParams,
    *,
    block_bytes: int = _CDC_BLOCK,
) -> list[Span]:
    """Content-defined pieces of ``[offset, offset + length)``; cuts depend only on content.

    The range is hashed ``block_bytes`` at a time (plus 31 bytes of history), so memory
    stays flat for any KV size; the cuts do not depend on the block size.
    """
    if not (GEAR_WINDOW <= params.min_len <= params.max_len and 1 <= params.bits <= 31):
        raise UsageError(f"invalid CDC parameters {params}")
    if block_bytes < GEAR_WINDOW:
        raise UsageError(f"CDC block of {block_bytes} bytes is under {GEAR_WINDOW}")
    shift = np.uint32(32 - params.bits)
    cuts: list[int] = []
    start = 0  # current piece start, relative to offset
    block_start = 0
    while block_start < length and start + params.min_len < length:
        block_end = min(length, block_start + block_bytes)
        history = min(GEAR_WINDOW - 1, block_start)
        handle.seek(offset + block_start - history)
        raw = handle.read(block_end - block_start + history)
        if len(raw) != block_end - block_start + history:
            raise TruncatedError("file shrank while it was being chunked", offset=offset)
        hashes = gear_hashes(np.frombuffer(raw, dtype=np.uint8))[history:]
        candidates = np.flatnonzero((hashes >> shift) == 0) + (block_start + 1)
        while True:
            low, high = start + params.min_len, start + params.max_len
            if low >= length:
                break
            index = int(np.searchsorted(candidates, low))
            if index < len(candidates) and candidates[index] <= high:
                start = int(candidates[index])
            elif high <= block_end or index < len(candidates):
                start = min(high, length)
            else:
                break
            if start < length:
                cuts.append(start)
        block_start = block_end
    edges = [0, *cuts, length]
    return [Span(offset + a, b - a) for a, b in itertools.pairwise(edges) if b > a]


def iter_span_bytes(
    path: Path, spans: Iterable[Span], *, buffer_bytes: int = MAX_CHUNK_BYTES
) -> Iterator[tuple[Span, memoryview]]:
    """Each span's bytes, read into one reused buffer.

    The view is only valid until the next item: copy it (``bytes(view)``) to keep it.
    TruncatedError when the file is shorter than a span says.
    """
    buffer = bytearray(0)
    try:
        with path.open("rb", buffering=0) as handle:
            position = 0
            for span in spans:
                if span.length > len(buffer):
                    buffer = bytearray(max(span.length, min(buffer_bytes, 2 * len(buffer))))
                if span.offset != position:
                    handle.seek(span.offset)
                view = memoryview(buffer)[: span.length]
                filled = 0
                while filled < span.length:
                    got = handle.readinto(view[filled:])
                    if not got:
                        raise TruncatedError(
                            f"file ends inside a chunk ({filled} of {span.length} bytes read)",
                            file=str(path),
                            offset=span.offset + filled,
                        )
                    filled += got
                position = span.end
                yield span, view
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3 of a chunk's plain bytes (32 bytes), multi-threaded for big chunks."""
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()


def hash_spans(path: Path, spans: Sequence[Span], progress: Progress | None = None) -> list[bytes]:
    """BLAKE3 digest of every span, streaming; ``progress(bytes_done, bytes_total)``."""
    total = sum(span.length for span in spans)
    done = 0
    digests: list[bytes] = []
    for span, view in iter_span_bytes(path, spans):
        digests.append(chunk_digest(view))
        done += span.length
        if progress is not None:
            progress(done, total)
    return digests
