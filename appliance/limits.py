"""Hard caps for untrusted input.

Everything read from media, a peer, a recipe or an HTTP request is checked against these
before it is parsed or allocated: size cap first, then version, then fields (DESIGN.md).
``Limits`` is a frozen dataclass so tests can pass smaller caps without monkeypatching.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Sequences and versions are stored in SQLite INTEGER columns (signed 64-bit).
MAX_SEQUENCE = (1 << 63) - 1
# NAME_MAX of ext4, XFS, btrfs and of FAT/exFAT long names: a longer path segment cannot be
# created, so it is refused when the manifest is parsed, not after the copy.
MAX_NAME_SEGMENT_BYTES = 255


@dataclass(frozen=True)
class Limits:
    # Documents read from media or peers.
    max_manifest_bytes: int = 32 * MiB
    max_signature_bytes: int = 4 * KiB
    max_signatures: int = 64
    max_trust_root_bytes: int = 1 * MiB
    max_trust_chain_length: int = 256
    max_volume_index_bytes: int = 64 * MiB
    max_recipe_bytes: int = 1 * MiB
    max_yaml_depth: int = 32
    # Manifest contents.
    max_models: int = 256
    max_files_per_model: int = 256
    max_chunks_per_file: int = 1 << 20
    max_chunk_bytes: int = 64 * MiB
    max_file_bytes: int = 1 << 40
    max_path_bytes: int = 1024
    max_name_bytes: int = 256
    max_keys: int = 256
    # Packs on media: FAT32 cannot hold a file of 4 GiB or more.
    max_pack_bytes: int = 4 * GiB - 1
    # GGUF headers (read from local files on the connected machine, but still capped).
    max_gguf_kv_count: int = 1 << 20
    max_gguf_tensor_count: int = 1 << 20
    max_gguf_string_bytes: int = 64 * MiB
    # Peers and HTTP.
    max_peer_json_bytes: int = 16 * MiB
    max_request_bytes: int = 8 * MiB


DEFAULT_LIMITS = Limits()

# Chunking targets (not caps on input; the builder's choices, recorded in the manifest).
TARGET_CHUNK_BYTES = 4 * MiB
MAX_CHUNK_BYTES = 8 * MiB
MIN_CHUNK_BYTES = 64 * KiB
# Store a chunk raw when zstd saves less than this fraction. Quantized weights compress by only
# 4-6 %; storing them raw costs ~3 % more media on gemma3-270m but lets verify and import hash
# them at disk speed instead of decompressing first (verify went from ~0.2x to near b3sum).
MIN_COMPRESSION_SAVING = 0.10
DEFAULT_PACK_BYTES = 2 * GiB
