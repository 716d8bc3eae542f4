"""Merkle tree over a file's chunk digests: leaf and node hashing, roots and proofs (pure).

The tree (docs/FORMAT.md, "Merkle tree"):

- leaf  = BLAKE3(0x00 || chunk_digest)
- node  = BLAKE3(0x01 || left || right)
- empty = BLAKE3(0x02)   (the root of a file with no chunks)

Levels are built left to right by pairing neighbours; a level with an odd count promotes
its last hash unchanged to the next level. Nothing is ever duplicated, so ``[a, b, c]`` and
``[a, b, c, c]`` have different roots (the Bitcoin CVE-2012-2459 ambiguity cannot occur), and
the distinct prefixes stop a leaf from ever standing in for a node or the reverse.

A proof for chunk ``index`` of ``count`` is the list of sibling hashes from the leaf level
up, skipping levels where the path is promoted; which side each sibling sits on and which
levels are skipped follow from ``index`` and ``count``, so the proof carries hashes only.
"""

from __future__ import annotations

from collections.abc import Sequence

import blake3

from appliance.errors import FormatError

DIGEST_BYTES = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_PREFIX = b"\x02"
EMPTY_ROOT = blake3.blake3(EMPTY_PREFIX).digest()


def _check_digest(value: bytes, what: str) -> None:
    if not isinstance(value, bytes | bytearray | memoryview) or len(value) != DIGEST_BYTES:
        raise FormatError(f"{what} must be {DIGEST_BYTES} bytes")


def leaf_hash(chunk_digest: bytes) -> bytes:
    """The leaf for one chunk: BLAKE3(0x00 || chunk_digest)."""
    _check_digest(chunk_digest, "a chunk digest")
    return blake3.blake3(LEAF_PREFIX + bytes(chunk_digest)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """An inner node: BLAKE3(0x01 || left || right)."""
    _check_digest(left, "a left child")
    _check_digest(right, "a right child")
    return blake3.blake3(NODE_PREFIX + bytes(left) + bytes(right)).digest()


def _next_level(level: list[bytes]) -> list[bytes]:
    paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        paired.append(level[-1])
    return paired


def merkle_root(chunk_digests: Sequence[bytes]) -> bytes:
    """Root over the chunk digests in file order; ``EMPTY_ROOT`` for no chunks."""
    if not chunk_digests:
        return EMPTY_ROOT
    level = [leaf_hash(d) for d in chunk_digests]
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


def merkle_proof(chunk_digests: Sequence[bytes], index: int) -> list[bytes]:
    """Sibling hashes proving chunk ``index`` belongs to ``merkle_root(chunk_digests)``."""
    if not 0 <= index < len(chunk_digests):
        raise FormatError(f"chunk index {index} is outside 0..{len(chunk_digests) - 1}")
    level = [leaf_hash(d) for d in chunk_digests]
    proof: list[bytes] = []
    position = index
    while len(level) > 1:
        sibling = position ^ 1
        if sibling < len(level):
            proof.append(level[sibling])
        level = _next_level(level)
        position //= 2
    return proof


def verify_proof(
    chunk_digest: bytes, index: int, count: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """True when ``proof`` links chunk ``index`` of ``count`` with ``chunk_digest`` to ``root``.

    Malformed input (a digest of the wrong size, an index outside the count) is False,
    never an exception: a peer's proof is untrusted data.
    """
    if not 0 <= index < count or len(root) != DIGEST_BYTES or len(chunk_digest) != DIGEST_BYTES:
        return False
    if any(len(step) != DIGEST_BYTES for step in proof):
        return False
    current = leaf_hash(chunk_digest)
    position, width, used = index, count, 0
    while width > 1:
        sibling = position ^ 1
        if sibling < width:
            if used == len(proof):
                return False
            step = proof[used]
            used += 1
            current = node_hash(step, current) if position & 1 else node_hash(current, step)
        position //= 2
        width = (width + 1) // 2
    return used == len(proof) and current == root
