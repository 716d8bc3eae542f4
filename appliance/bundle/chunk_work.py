"""What the builder does to each chunk: its BLAKE3, and the bytes stored for it in a pack.

``digest_and_compress`` runs on the builder's worker threads (blake3 and zstd release the
GIL). A chunk the bundle already holds is not compressed again; a large chunk that zstd
would barely shrink (quantized weights) is stored raw after a cheap probe.
"""

from __future__ import annotations

import threading

import blake3
import zstandard

from appliance.bundle.media import compress_chunk
from appliance.limits import MIN_COMPRESSION_SAVING

Work = tuple[bytes, bytes | memoryview, bool]  # digest, stored bytes, compressed


# Quantized weights are incompressible (zstd saves 0-6 %, under MIN_COMPRESSION_SAVING), and
# compressing a whole chunk only to store it raw cost as much CPU as the rest of the build.
# So a chunk of 1 MiB or more is first probed: when zstd saves under _PROBE_SAVING (half of
# MIN_COMPRESSION_SAVING) on _PROBES samples spread over it, together, it is stored raw
# without compressing the rest (real Q4_K weights save 4-6 %; samples see a little less).
_PROBES = 8
_PROBE_BYTES = 32 * 1024
_PROBE_SAVING = MIN_COMPRESSION_SAVING / 2
_probe_local = threading.local()


def _incompressible(data: memoryview, level: int) -> bool:
    if len(data) < 4 * _PROBES * _PROBE_BYTES:  # 1 MiB: gemma's tensors are cut about there
        return False
    cctx = getattr(_probe_local, "cctx", None)
    if cctx is None or _probe_local.level != level:
        cctx = _probe_local.cctx = zstandard.ZstdCompressor(level=level, write_checksum=False)
        _probe_local.level = level
    step = len(data) // _PROBES
    packed = sum(len(cctx.compress(data[start:start + _PROBE_BYTES]))
                 for start in range(0, _PROBES * step, step))
    return packed >= _PROBES * _PROBE_BYTES * (1 - _PROBE_SAVING)


def digest_and_compress(data: memoryview, level: int, known: set[bytes]) -> Work:
    digest = blake3.blake3(data).digest()
    if digest in known:  # a chunk already stored: skip compressing it again
        return digest, b"", False
    if _incompressible(data, level):
        return digest, data, False
    stored, compressed = compress_chunk(data, level)
    return digest, stored, compressed
