"""Helpers for the store and importer tests: real manifest entries from bytes, a small tmpfs.

``model_entry`` cuts bytes into fixed-size chunks and builds the real
``appliance.format.manifest`` dataclasses (digests, offsets, Merkle root), so store tests
exercise the same inputs the importer passes, without building a bundle.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import blake3

from appliance.format.manifest import ChunkRef, FileEntry, GgufInfo, ModelEntry, Provenance
from appliance.format.merkle import merkle_root
from appliance.store.store import BundleOrigin, Store


def file_entry(path: str, data: bytes, chunk_size: int = 64 * 1024) -> FileEntry:
    chunks = []
    for offset in range(0, len(data), chunk_size):
        piece = data[offset : offset + chunk_size]
        chunks.append(ChunkRef(blake3.blake3(piece).hexdigest(), len(piece), offset))
    root = merkle_root([bytes.fromhex(c.digest) for c in chunks]).hex()
    return FileEntry(path=path, size=len(data), merkle_root=root, chunks=tuple(chunks))


def model_entry(
    name: str, version: str, files: dict[str, bytes], chunk_size: int = 64 * 1024
) -> ModelEntry:
    return ModelEntry(
        name=name,
        version=version,
        license="test",
        provenance=Provenance(builder="tests", sources=()),
        gguf=GgufInfo(
            architecture="llama",
            quantization="F32",
            parameter_count=1,
            context_length=64,
            tensor_count=1,
            chat_template_hash=None,
        ),
        files=tuple(file_entry(p, d, chunk_size) for p, d in files.items()),
    )


def origin(tag: str = "m1", sequence: int = 1) -> BundleOrigin:
    return BundleOrigin(
        manifest_hash=blake3.blake3(tag.encode()).hexdigest(),
        channel="test",
        sequence=sequence,
        manifest_bytes=f"manifest {tag}".encode(),
        signatures=("appliance-sig-v1 k1 AAAA",),
        signers=("k1",),
    )


def add_origin(store: Store, bundle: BundleOrigin, total: int = 0) -> None:
    with store.transaction():
        store.add_manifest(bundle, total, None)


def write_model(
    store: Store,
    model: ModelEntry,
    contents: dict[str, bytes],
    bundle: BundleOrigin | None = None,
    *,
    publish: bool = True,
    limit_chunks: int | None = None,
) -> int | None:
    """Stage a model and write its chunks (optionally only the first ``limit_chunks``)."""
    bundle = bundle or origin()
    add_origin(store, bundle)
    model_id = store.begin_model(model, bundle.manifest_hash)
    if model_id is None:
        return None
    written = 0
    for staged in store.stage_files(model_id):
        data = contents[staged.path]
        for chunk in staged.pending():
            if limit_chunks is not None and written >= limit_chunks:
                staged.close()
                return model_id
            staged.write_chunk(chunk.idx, data[chunk.offset : chunk.offset + chunk.length])
            written += 1
        if publish:
            staged.publish()
        staged.close()
    return model_id


@contextlib.contextmanager
def small_tmpfs(mountpoint: Path, size_mb: int) -> Iterator[Path]:
    """A real size-limited filesystem (tmpfs); raises OSError when mounting is not allowed."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise OSError(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
