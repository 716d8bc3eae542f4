"""A large GGUF for the benches, generated once and cached outside the repository.

Site models are 4 to 40 GB and often split in shards; the 253 MB gemma alone hides what
grows with size. ``large_gguf()`` writes (once) a llama-shaped GGUF v3 of about 6.4 GB:
hundreds of Q4_K / Q8_0 tensors whose bytes are pseudo-random (BLAKE3 XOF of the tensor
name and offset, so the file repeats exactly and zstd cannot shrink it, like real
quantized weights), a tokenizer vocabulary in the header like a real model. ``split_gguf()``
writes a sharded variant the way llama.cpp's ``gguf-split`` does: files named
``NAME-00001-of-0000N.gguf``, each a complete GGUF holding a run of the tensors and the
``split.no`` / ``split.count`` / ``split.tensors.count`` keys, the first one also every
metadata key.

Files live under ``$APPLIANCE_BENCH_CACHE`` (default ``~/.cache/appliance-bench``), written
to a ``.part`` name and renamed when complete, so an interrupted run never leaves a torn
file behind. ``python -m bench.large_model`` generates both and prints their paths.
"""

from __future__ import annotations

import argparse
import itertools
import os
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

MIB = 1 << 20
ALIGNMENT = 32
N_EMBD = 4096
N_FF = 14336
N_KV = 1024
N_VOCAB = 32000
DEFAULT_SIZE = 6400 * 10**6
DEFAULT_SPLIT_SIZE = 3200 * 10**6
DEFAULT_SHARDS = 4


def cache_dir() -> Path:
    return Path(os.environ.get("APPLIANCE_BENCH_CACHE", "~/.cache/appliance-bench")).expanduser()


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (the row) first
    kind: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[self.kind]
        elements = 1
        for n in self.shape:
            elements *= n
        return elements // block * type_size


def _layer(i: int) -> list[Tensor]:
    q4, q8, f32 = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q8_0, GGMLQuantizationType.F32
    p = f"blk.{i}."
    return [
        Tensor(p + "attn_norm.weight", (N_EMBD,), f32),
        Tensor(p + "attn_q.weight", (N_EMBD, N_EMBD), q4),
        Tensor(p + "attn_k.weight", (N_EMBD, N_KV), q4),
        Tensor(p + "attn_v.weight", (N_EMBD, N_KV), q8),
        Tensor(p + "attn_output.weight", (N_EMBD, N_EMBD), q4),
        Tensor(p + "ffn_norm.weight", (N_EMBD,), f32),
        Tensor(p + "ffn_gate.weight", (N_EMBD, N_FF), q4),
        Tensor(p + "ffn_up.weight", (N_EMBD, N_FF), q4),
        Tensor(p + "ffn_down.weight", (N_FF, N_EMBD), q8),
    ]


def plan(size: int) -> tuple[int, list[Tensor]]:
    """As many layers as make about ``size`` bytes; (layer count, every tensor in order)."""
    q4, f32 = GGMLQuantizationType.Q4_K, GGMLQuantizationType.F32
    ends = [Tensor("token_embd.weight", (N_EMBD, N_VOCAB), q4)]
    tail = [Tensor("output_norm.weight", (N_EMBD,), f32),
            Tensor("output.weight", (N_EMBD, N_VOCAB), GGMLQuantizationType.Q6_K)]
    per_layer = sum(t.nbytes for t in _layer(0))
    fixed = sum(t.nbytes for t in ends + tail)
    layers = max(1, round((size - fixed) / per_layer))
    tensors = ends + [t for i in range(layers) for t in _layer(i)] + tail
    return layers, tensors


def _string(s: str) -> bytes:
    data = s.encode()
    return struct.pack("<Q", len(data)) + data


def _kv(key: str, kind: GGUFValueType, value: object) -> bytes:
    head = _string(key) + struct.pack("<I", kind)
    if kind == GGUFValueType.STRING:
        assert isinstance(value, str)
        return head + _string(value)
    if kind == GGUFValueType.ARRAY:
        assert isinstance(value, list)
        return (head + struct.pack("<IQ", GGUFValueType.STRING, len(value))
                + b"".join(_string(v) for v in value))
    fmt = {GGUFValueType.UINT32: "<I", GGUFValueType.UINT16: "<H", GGUFValueType.INT32: "<i",
           GGUFValueType.FLOAT32: "<f"}[kind]
    return head + struct.pack(fmt, value)


def _metadata(layers: int) -> list[bytes]:
    u32, s = GGUFValueType.UINT32, GGUFValueType.STRING
    vocab = [f"<0x{i:02X}>" if i < 256 else f"piece{i}" for i in range(N_VOCAB)]
    return [
        _kv("general.architecture", s, "llama"),
        _kv("general.name", s, "appliance-bench-large"),
        _kv("general.alignment", u32, ALIGNMENT),
        _kv("general.file_type", u32, 15),  # MOSTLY_Q4_K_M
        _kv("llama.block_count", u32, layers),
        _kv("llama.context_length", u32, 8192),
        _kv("llama.embedding_length", u32, N_EMBD),
        _kv("llama.feed_forward_length", u32, N_FF),
        _kv("llama.attention.head_count", u32, 32),
        _kv("llama.attention.head_count_kv", u32, 8),
        _kv("tokenizer.ggml.model", s, "llama"),
        _kv("tokenizer.ggml.tokens", GGUFValueType.ARRAY, vocab),
    ]


def _pad(n: int) -> int:
    return -n % ALIGNMENT


def _write_gguf(path: Path, kvs: Sequence[bytes], tensors: Sequence[Tensor]) -> None:
    infos = []
    offset = 0
    for t in tensors:
        infos.append(_string(t.name) + struct.pack("<I", len(t.shape))
                     + struct.pack(f"<{len(t.shape)}Q", *t.shape)
                     + struct.pack("<IQ", t.kind, offset))
        offset += t.nbytes + _pad(t.nbytes)
    header = (b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
              + b"".join(kvs) + b"".join(infos))
    part = path.with_name(path.name + ".part")
    with part.open("wb") as f:
        f.write(header + bytes(_pad(len(header))))
        for t in tensors:
            done = 0
            while done < t.nbytes:
                n = min(16 * MIB, t.nbytes - done)
                seed = t.name.encode() + done.to_bytes(8, "little")
                f.write(blake3.blake3(seed).digest(length=n))
                done += n
            f.write(bytes(_pad(t.nbytes)))
        f.flush()
        os.fsync(f.fileno())
    part.rename(path)


def large_gguf(size: int = DEFAULT_SIZE, directory: Path | None = None) -> Path:
    """The cached one-file model of about ``size`` bytes, written when missing."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"bench-large-{size // 10**6}m.gguf"
    if not path.exists():
        layers, tensors = plan(size)
        _write_gguf(path, _metadata(layers), tensors)
    return path


def _runs(tensors: Sequence[Tensor], shards: int) -> Iterable[Sequence[Tensor]]:
    """Consecutive runs of tensors of about equal bytes (gguf-split --split-max-size)."""
    share = sum(t.nbytes for t in tensors) / shards
    bounds = [0]
    acc = 0
    for i, t in enumerate(tensors):
        acc += t.nbytes
        if len(bounds) < shards and acc >= share * len(bounds):
            bounds.append(i + 1)
    bounds.append(len(tensors))
    for a, b in itertools.pairwise(bounds):
        yield tensors[a:b]


def split_gguf(size: int = DEFAULT_SPLIT_SIZE, shards: int = DEFAULT_SHARDS,
               directory: Path | None = None) -> list[Path]:
    """The cached sharded model (``gguf-split`` naming), written when missing."""
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"bench-split-{size // 10**6}m"
    paths = [directory / f"{stem}-{i:05d}-of-{shards:05d}.gguf" for i in range(1, shards + 1)]
    if all(p.exists() for p in paths):
        return paths
    layers, tensors = plan(size)
    for i, (path, run) in enumerate(zip(paths, _runs(tensors, shards), strict=True)):
        split = [_kv("split.no", GGUFValueType.UINT16, i),
                 _kv("split.count", GGUFValueType.UINT16, shards),
                 _kv("split.tensors.count", GGUFValueType.INT32, len(tensors))]
        kvs = _metadata(layers) + split if i == 0 else split
        if not path.exists():
            _write_gguf(path, kvs, run)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.large_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=DEFAULT_SIZE // 10**6)
    parser.add_argument("--split-mb", type=int, default=DEFAULT_SPLIT_SIZE // 10**6)
    parser.add_argument("--shards", type=int, default=DEFAULT_SHARDS)
    args = parser.parse_args(argv)
    print(large_gguf(args.size_mb * 10**6))
    for path in split_gguf(args.split_mb * 10**6, args.shards):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
