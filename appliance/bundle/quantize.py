"""Quantize a GGUF at build time with llama.cpp's own quantizer, through llama-cpp-python.

A recipe file with ``quantize: Q4_K_M`` (and optionally ``imatrix: FILE``) names an F32, F16
or BF16 GGUF; the builder packs what ``quantize_gguf`` writes instead, and signs where it came
from (source digest and type, target type, importance-matrix digest) as provenance.

Owns:

- ``QUANT_TYPES``: the llama.cpp file types a recipe may name (``llama_ftype`` names without
  ``LLAMA_FTYPE_MOSTLY_``), checked when the recipe is read, without loading llama.cpp;
- ``quantized_dest(name, type)``: the default bundle name of a quantized file;
- ``read_imatrix(path)``: llama.cpp's GGUF importance-matrix file (what ``llama-imatrix``
  writes) as per-tensor weights, normalised exactly as ``llama-quantize`` does;
- ``quantize_gguf(source, target, scratch, ...) -> Quantized``: refuse a source that is
  already quantized, ask llama.cpp for the output size (its own dry run), check free space,
  quantize into ``scratch`` and report per-tensor progress from llama.cpp's log.

llama.cpp's quantizer has no progress callback; it logs one ``[ i/ n] tensor ...`` line per
tensor, so the log callback is swapped for the duration and restored after (the library never
prints; ``progress(done, total)`` gets tensors). The log also carries the reason when
llama.cpp refuses, which goes into the ``QuantizeError``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from appliance.errors import (
    DiskFullError,
    FormatError,
    IntegrityError,
    QuantizeError,
    UsageError,
)

# The quantized llama_ftype values of llama.cpp (include/llama.h), as llama-quantize names
# them. Which ones this llama.cpp build really has is checked when quantizing.
QUANT_TYPES = (
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M",
    "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S",
    "IQ3_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4_MOE",
)
# Tensor types a source may hold: floats to quantize from, and the integer types some
# models keep (never quantized by llama.cpp).
SOURCE_TENSOR_TYPES = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})
_FLOAT_SOURCE_TYPES = ("F32", "F16", "BF16")
# Room kept beyond llama.cpp's own size estimate: the header, and whatever else writes there.
FREE_SPACE_MARGIN = 64 * 1024 * 1024
_HASH_BLOCK = 8 * 1024 * 1024
_SOURCE_TYPE_IN_NAME = re.compile(r"(?i)(?<![a-z0-9])(f32|f16|bf16|fp16|fp32)(?![a-z0-9])")
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
_QUANT_SIZE = re.compile(r"quant size\s*=\s*([0-9.]+) MiB")
_FALLBACK = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback")
# llama.cpp's GGUF imatrix: "<tensor>.in_sum2" (sums of squared activations per column, per
# expert) and "<tensor>.counts" (tokens seen per expert), plus these metadata keys.
_IMATRIX_DATASETS = "imatrix.datasets"
_IMATRIX_CHUNK_COUNT = "imatrix.chunk_count"
_IMATRIX_CHUNK_SIZE = "imatrix.chunk_size"
_KV_OVERRIDE_STR, _KV_OVERRIDE_INT = 3, 0  # llama_model_kv_override_type

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Imatrix:
    """Per-tensor importance weights from an imatrix file, ready for llama.cpp."""

    path: Path
    sha256: str
    entries: dict[str, Any]  # tensor name -> float32 numpy vector
    datasets: tuple[str, ...]
    chunk_count: int


@dataclass(frozen=True)
class Quantized:
    """What ``quantize_gguf`` wrote and what provenance signs about it."""

    path: Path
    source_sha256: str
    source_type: str  # F32, F16 or BF16: the dominant type of the source's weights
    target_type: str  # the llama.cpp type asked for (Q4_K_M)
    imatrix_sha256: str | None
    tensor_types: dict[str, int] = field(default_factory=dict)  # output type -> tensor count
    fallbacks: int = 0  # tensors llama.cpp put in another type because of their shape
    seconds: float = 0.0


def quantized_dest(name: str, target: str) -> str:
    """``model-F16.gguf`` -> ``model-Q4_K_M.gguf``; a name without a float type in it gets
    ``-Q4_K_M`` before its suffix."""
    path = PurePosixPath(name)
    stem, suffix = (path.stem, path.suffix) if path.suffix else (path.name, "")
    if _SOURCE_TYPE_IN_NAME.search(stem):
        stem = _SOURCE_TYPE_IN_NAME.sub(target, stem)
    else:
        stem = f"{stem}-{target}"
    return str(path.with_name(stem + suffix))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def source_type(path: Path) -> str:
    """``F32``, ``F16`` or ``BF16``: the type holding most bytes of the source's weights.

    ``QuantizeError`` when the file is not a GGUF or any tensor is already quantized
    (requantizing loses quality; llama.cpp refuses it by default too).
    """
    from appliance.gguf_layout import read_gguf_layout

    try:
        layout = read_gguf_layout(path)
    except (FormatError, UsageError) as e:
        raise QuantizeError(f"quantize: {path} is not a GGUF file llama.cpp can read: {e}") from e
    if layout.facts is None:
        raise QuantizeError(f"quantize: {path.name} is a later shard of a split GGUF; merge "
                            "the shards first (llama-gguf-split --merge)")
    by_type: Counter[str] = Counter()
    for tensor in layout.boundaries.tensors:
        if tensor.type_name not in SOURCE_TENSOR_TYPES:
            raise QuantizeError(
                f"quantize: {path.name} is already quantized ({layout.facts.quantization}; "
                f"tensor {tensor.name} is {tensor.type_name}); quantize from the F32, F16 or "
                "BF16 GGUF instead, or drop quantize: to pack it as it is"
            )
        if tensor.type_name in _FLOAT_SOURCE_TYPES and len(tensor.shape) >= 2:
            by_type[tensor.type_name] += tensor.n_bytes
    if not by_type:
        raise QuantizeError(f"quantize: {path.name} has no F32, F16 or BF16 weight matrix")
    return by_type.most_common(1)[0][0]


def read_imatrix(path: Path) -> Imatrix:
    """The importance matrix in llama.cpp's GGUF format, normalised like ``llama-quantize``:
    each column's sum of squares divided by the tokens its expert saw (1 where none).

    The legacy binary ``.dat`` format is refused with the command that converts it.
    """
    import gguf
    import numpy as np

    if not path.is_file():
        raise QuantizeError(f"imatrix: {path} does not exist")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise QuantizeError(
            f"imatrix: {path} is not a GGUF importance matrix (the legacy .dat format is not "
            f"read here; convert it: llama-imatrix --in-file {path.name} -o imatrix.gguf)")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise QuantizeError(f"imatrix: cannot read {path}: {e}") from e
    sums: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise QuantizeError(f"imatrix: {path}: tensor {name} is not F32")
        if name.endswith(".in_sum2"):
            sums[name.removesuffix(".in_sum2")] = np.asarray(tensor.data, np.float32).ravel()
        elif name.endswith(".counts"):
            counts[name.removesuffix(".counts")] = np.asarray(tensor.data, np.float32).ravel()
    if not sums or set(sums) != set(counts):
        raise QuantizeError(f"imatrix: {path} has no matching .in_sum2/.counts tensor pairs")
    missing = [k for k in (_IMATRIX_DATASETS, _IMATRIX_CHUNK_COUNT, _IMATRIX_CHUNK_SIZE)
               if reader.get_field(k) is None]
    if missing:  # llama-quantize refuses such a file too ("missing imatrix metadata")
        raise QuantizeError(f"imatrix: {path} lacks metadata {', '.join(missing)}")
    entries: dict[str, Any] = {}
    for name, total in sums.items():
        seen = np.rint(counts[name])
        if not seen.size or total.size % seen.size:
            raise QuantizeError(f"imatrix: {path}: {name} sums do not split over its counts")
        per_expert = total.reshape(seen.size, -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            normal = np.where(seen[:, None] > 0, per_expert / seen[:, None], 1.0)
        if not np.isfinite(normal).all():
            raise QuantizeError(f"imatrix: {path}: {name} holds non-finite values")
        entries[name] = np.ascontiguousarray(normal.ravel(), dtype=np.float32)
    datasets_field = reader.get_field(_IMATRIX_DATASETS)
    chunk_field = reader.get_field(_IMATRIX_CHUNK_COUNT)
    assert datasets_field is not None and chunk_field is not None
    datasets = tuple(str(v) for v in datasets_field.contents()) if datasets_field.data else ()
    return Imatrix(path=path, sha256=sha256_file(path), entries=entries, datasets=datasets,
                   chunk_count=int(chunk_field.contents()))


def quantize_gguf(source: Path, target: str, scratch: Path, *, imatrix: Path | None = None,
                  expected_sha256: str | None = None, threads: int | None = None,
                  progress: Progress | None = None) -> Quantized:
    """Quantize ``source`` to ``target`` (a ``QUANT_TYPES`` name) into a new file in ``scratch``.

    ``expected_sha256``: the upstream digest of the source (a Hugging Face LFS blob), checked
    while hashing it: ``IntegrityError`` when the bytes differ. Refuses an already quantized
    source and a type llama.cpp needs an importance matrix for (``QuantizeError``), and too
    little room in ``scratch`` (``DiskFullError``, checked against llama.cpp's own estimate).
    """
    from appliance.gguf_layout import read_gguf_layout

    started = time.perf_counter()
    target = target.upper()
    if target not in QUANT_TYPES:
        raise QuantizeError(f"quantize: {target!r} is not a llama.cpp quantization type")
    llama_cpp = _llama_cpp()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{target}", None)
    if not isinstance(ftype, int):
        raise QuantizeError(f"quantize: this llama.cpp build has no {target}")
    kind = source_type(source)
    source_sha = sha256_file(source)
    if expected_sha256 is not None and source_sha != expected_sha256:
        raise IntegrityError(
            f"quantize: {source} does not match its upstream digest {expected_sha256} "
            f"(sha256 {source_sha}); the cache holds damaged bytes", file=str(source))
    matrix = read_imatrix(imatrix) if imatrix is not None else None
    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / quantized_dest(source.name, target)
    partial = out.with_name(f".{out.name}.partial")
    call = _Call(llama_cpp, ftype, matrix, threads)
    estimate = call.dry_run(source, partial)
    free = shutil.disk_usage(scratch).free
    if free < estimate + FREE_SPACE_MARGIN:
        raise DiskFullError(
            f"quantize: {source.name} to {target} needs about {_mib(estimate + FREE_SPACE_MARGIN)}"
            f" free in {scratch} (set TMPDIR elsewhere), only {_mib(free)} is")
    try:
        call.run(source, partial, progress)
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    types: Counter[str] = Counter(t.type_name for t in read_gguf_layout(out).boundaries.tensors)
    return Quantized(path=out, source_sha256=source_sha, source_type=kind, target_type=target,
                     imatrix_sha256=matrix.sha256 if matrix else None,
                     tensor_types=dict(types), fallbacks=call.fallbacks,
                     seconds=time.perf_counter() - started)


def _llama_cpp() -> Any:
    try:
        import llama_cpp
        import llama_cpp._logger  # its log callback, put back after each quantization
    except ImportError as e:  # the native library failed to load, or it is not installed
        raise QuantizeError(f"quantize: needs llama-cpp-python ({e})") from e
    return llama_cpp


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


# llama.cpp's log callback is process-global: one quantization at a time.
_LOG_LOCK = threading.Lock()


class _Call:
    """One llama_model_quantize call's parameters (kept alive for the C side) and its log."""

    def __init__(self, llama_cpp: Any, ftype: int, matrix: Imatrix | None,
                 threads: int | None) -> None:
        self.llama_cpp, self.ftype, self.matrix = llama_cpp, ftype, matrix
        self.threads = threads or os.cpu_count() or 1
        self.lines: list[str] = []
        self.fallbacks = 0
        self._keep: list[object] = []  # ctypes arrays the params point into

    def dry_run(self, source: Path, out: Path) -> int:
        """llama.cpp's own size of the output, before anything is written."""
        self._call(source, out, dry_run=True, progress=None)
        sizes = [m for line in self.lines if (m := _QUANT_SIZE.search(line))]
        if any("will require an imatrix" in line for line in self.lines):
            raise QuantizeError(
                "quantize: llama.cpp needs an importance matrix for this type; give "
                "imatrix: (made by llama-imatrix) or choose a K-quant such as Q4_K_M")
        if not sizes:
            raise QuantizeError(f"quantize: llama.cpp gave no size estimate: {self._tail()}")
        return int(float(sizes[-1].group(1)) * 2**20)

    def run(self, source: Path, out: Path, progress: Progress | None) -> None:
        self._call(source, out, dry_run=False, progress=progress)
        if match := next((m for line in self.lines if (m := _FALLBACK.search(line))), None):
            self.fallbacks = int(match.group(1))

    def _params(self, dry_run: bool) -> Any:
        llama = self.llama_cpp
        params = llama.llama_model_quantize_default_params()
        params.nthread = self.threads
        params.ftype = self.ftype
        params.dry_run = dry_run
        if self.matrix is not None:
            params.imatrix = self._imatrix_array(self.matrix)
            params.kv_overrides = self._kv_overrides(self.matrix)
        return params

    def _imatrix_array(self, matrix: Imatrix) -> Any:
        llama = self.llama_cpp
        entries = (llama.llama_model_imatrix_data * (len(matrix.entries) + 1))()
        for slot, (name, values) in zip(entries, matrix.entries.items(), strict=False):
            slot.name = name.encode()
            slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            slot.size = values.size
        self._keep.append(entries)  # the last slot stays zero: the terminator
        return ctypes.cast(entries, ctypes.POINTER(llama.llama_model_imatrix_data))

    def _kv_overrides(self, matrix: Imatrix) -> Any:
        """The metadata llama-quantize writes about the imatrix it used."""
        llama = self.llama_cpp
        values: list[tuple[bytes, int, str | int]] = [
            (b"quantize.imatrix.file", _KV_OVERRIDE_STR, matrix.path.name[:127]),
            (b"quantize.imatrix.entries_count", _KV_OVERRIDE_INT, len(matrix.entries)),
        ]
        if matrix.datasets:
            values.append((b"quantize.imatrix.dataset", _KV_OVERRIDE_STR,
                           matrix.datasets[0][:127]))
        if matrix.chunk_count > 0:
            values.append((b"quantize.imatrix.chunks_count", _KV_OVERRIDE_INT,
                           matrix.chunk_count))
        array = (llama.llama_model_kv_override * (len(values) + 1))()
        for slot, (key, tag, value) in zip(array, values, strict=False):
            slot.key, slot.tag = key, tag
            if isinstance(value, str):
                slot.value.val_str = value.encode()[:127]
            else:
                slot.value.val_i64 = value
        self._keep.append(array)
        return ctypes.cast(array, ctypes.POINTER(llama.llama_model_kv_override))

    def _call(self, source: Path, out: Path, *, dry_run: bool,
              progress: Progress | None) -> None:
        params = self._params(dry_run)
        self.lines = []
        with _LOG_LOCK, self._captured_log(progress):
            status = self.llama_cpp.llama_model_quantize(
                os.fsencode(source), os.fsencode(out), ctypes.byref(params))
        if status != 0:
            raise QuantizeError(f"quantize: llama.cpp failed on {source.name}: {self._tail()}")

    @contextmanager
    def _captured_log(self, progress: Progress | None) -> Iterator[None]:
        llama = self.llama_cpp
        pending: list[str] = []

        def on_line(line: str) -> None:
            self.lines.append(line)
            match = _TENSOR_LINE.match(line)
            if match and progress is not None:
                progress(int(match.group(1)), int(match.group(2)))

        @llama.llama_log_callback
        def callback(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
            pending.append((text or b"").decode("utf-8", "replace"))
            joined = "".join(pending)
            if "\n" in joined:
                *done, rest = joined.split("\n")
                pending[:] = [rest] if rest else []
                for line in done:
                    on_line(line)

        llama.llama_log_set(callback, ctypes.c_void_p(0))
        try:
            yield
        finally:
            llama.llama_log_set(llama._logger.llama_log_callback, ctypes.c_void_p(0))
            if pending:
                on_line("".join(pending))

    def _tail(self) -> str:
        errors = [line.strip() for line in self.lines
                  if "failed" in line or "ERROR" in line or "error" in line]
        return "; ".join(errors[-3:]) or "; ".join(line.strip() for line in self.lines[-3:])
