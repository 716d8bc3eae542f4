"""GGUF files made by the tests: a runnable tiny llama and a big many-tensor file.

Import from tests as ``from gguf_fixtures import write_tiny_llama, write_many_tensor_gguf``
(pytest puts tests/ on sys.path), or use the session fixtures ``tiny_gguf`` and
``many_tensor_gguf`` from conftest.py. Both writers are deterministic: the same seed gives
the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from appliance.tiny_model import DEFAULT_TEMPLATE, write_tiny_llama

__all__ = [
    "DEFAULT_TEMPLATE",
    "MANY_TENSOR_ARRAY_LEN",
    "many_tensor_names",
    "write_many_tensor_gguf",
    "write_tiny_llama",
]

MANY_TENSOR_ARRAY_LEN = 20_000
# Cycled over the tensors; quantized types need rows that are whole blocks.
_TYPES = (Q.F32, Q.F16, Q.Q8_0, Q.I8, Q.I32, Q.Q4_0, Q.F16, Q.I16, Q.BF16, Q.F32)
_N_LARGE = 8
_LARGE_BYTES = (2 << 20, 6 << 20)
_SMALL_BYTES = (4, 1 << 20)


def many_tensor_names(n_tensors: int = 200) -> list[str]:
    """Tensor names written by ``write_many_tensor_gguf``, in file order."""
    return [f"t{i:03d}.{_TYPES[i % len(_TYPES)].name.lower()}" for i in range(n_tensors)]


def _byte_sizes(rng: np.random.Generator, n_tensors: int) -> list[int]:
    """A few tensors of several MiB, the rest log-uniform from a few bytes to 1 MiB."""
    lo, hi = np.log(_SMALL_BYTES[0]), np.log(_SMALL_BYTES[1])
    sizes = [int(np.exp(rng.uniform(lo, hi))) for _ in range(n_tensors)]
    for slot in rng.choice(n_tensors, size=min(_N_LARGE, n_tensors), replace=False):
        sizes[int(slot)] = int(rng.integers(*_LARGE_BYTES))
    return sizes


def _tensor(rng: np.random.Generator, qtype: Q, nbytes: int) -> tuple[np.ndarray, Q | None]:
    """Random data of about ``nbytes`` bytes in ``qtype``; returns (array, raw_dtype)."""
    if qtype in (Q.Q8_0, Q.Q4_0):
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_blocks = max(1, nbytes // type_size)
        cols = block * min(n_blocks, 64)
        rows = max(1, (n_blocks * block) // cols)
        floats = rng.standard_normal((rows, cols), dtype=np.float32)
        return gguf.quants.quantize(floats, qtype), qtype
    if qtype == Q.BF16:
        n = max(1, nbytes // 2)
        floats = rng.standard_normal(n, dtype=np.float32)
        return gguf.quants.quantize(floats, Q.BF16), Q.BF16
    dtype = np.dtype({Q.F32: "f4", Q.F16: "f2", Q.I8: "i1", Q.I16: "i2", Q.I32: "i4"}[qtype])
    n = max(1, nbytes // dtype.itemsize)
    shape: tuple[int, ...] = (n // 256, 256) if n >= 4096 and n % 256 == 0 else (n,)
    if dtype.kind == "i":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True), None
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False), None


def _add_metadata(writer: gguf.GGUFWriter, rng: np.random.Generator) -> None:
    writer.add_name("many-tensor-test")
    writer.add_description("non-runnable GGUF for chunking tests; random tensors")
    writer.add_uint8("test.u8", 7)
    writer.add_int16("test.i16", -1234)
    writer.add_uint32("test.u32", 4_000_000_000)
    writer.add_int32("test.i32", -2_000_000_000)
    writer.add_uint64("test.u64", 2**63 + 5)
    writer.add_int64("test.i64", -(2**62))
    writer.add_float32("test.f32", 0.25)
    writer.add_float64("test.f64", 1e-300)
    writer.add_bool("test.flag", True)
    writer.add_string("test.unicode", "grüße, 模型, ✓")
    writer.add_array("test.ints", [int(x) for x in rng.integers(-1000, 1000, size=500)])
    writer.add_array("test.floats", [float(x) for x in rng.standard_normal(500)])
    # A large string array makes the header span hundreds of KiB, like a real vocab.
    salts = rng.integers(0, 2**32, size=MANY_TENSOR_ARRAY_LEN)
    writer.add_array("test.strings", [f"piece-{i:05d}-{int(v):08x}" for i, v in enumerate(salts)])


def write_many_tensor_gguf(path: Path, *, seed: int = 0, n_tensors: int = 200) -> Path:
    """Write a non-runnable GGUF with ``n_tensors`` tensors of mixed types and sizes.

    Sizes run from a few bytes to several MiB (about 40 MB in all for 200 tensors); types
    cycle through F32, F16, Q8_0, I8, I32, Q4_0, I16 and BF16. Names come from
    ``many_tensor_names(n_tensors)``. Replaces ``path`` atomically and returns it.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    names = many_tensor_names(n_tensors)
    sizes = _byte_sizes(rng, n_tensors)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        _add_metadata(writer, rng)
        for i, (name, nbytes) in enumerate(zip(names, sizes, strict=True)):
            array, raw_dtype = _tensor(rng, _TYPES[i % len(_TYPES)], nbytes)
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return path
