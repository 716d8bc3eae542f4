"""Merkle tree: domain separation, no duplication ambiguity, proofs."""

from __future__ import annotations

import blake3
import pytest

from appliance.errors import FormatError
from appliance.format.merkle import (
    EMPTY_ROOT,
    leaf_hash,
    merkle_proof,
    merkle_root,
    node_hash,
    verify_proof,
)


def digest(i: int) -> bytes:
    return blake3.blake3(f"chunk {i}".encode()).digest()


def h(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def test_hashes_follow_the_spec_bytes() -> None:
    a, b, c = digest(1), digest(2), digest(3)
    assert leaf_hash(a) == h(b"\x00" + a)
    assert node_hash(a, b) == h(b"\x01" + a + b)
    assert h(b"\x02") == EMPTY_ROOT
    expected = h(b"\x01" + h(b"\x01" + h(b"\x00" + a) + h(b"\x00" + b)) + h(b"\x00" + c))
    assert merkle_root([a, b, c]) == expected


def test_empty_and_single() -> None:
    assert merkle_root([]) == EMPTY_ROOT
    a = digest(1)
    assert merkle_root([a]) == leaf_hash(a) != a


def test_duplicating_the_last_chunk_changes_the_root() -> None:
    a, b, c = digest(1), digest(2), digest(3)
    assert merkle_root([a, b, c]) != merkle_root([a, b, c, c])
    for n in range(2, 40):
        chunks = [digest(i) for i in range(n)]
        roots = {merkle_root(chunks), merkle_root([*chunks, chunks[-1]])}
        roots.add(merkle_root([*chunks, *chunks[-2:]]))
        assert len(roots) == 3, n


def test_inner_nodes_cannot_pose_as_chunk_digests() -> None:
    a, b, c, d = (digest(i) for i in range(4))
    left, right = node_hash(leaf_hash(a), leaf_hash(b)), node_hash(leaf_hash(c), leaf_hash(d))
    assert merkle_root([a, b, c, d]) == node_hash(left, right)
    # Presenting a level of inner nodes (or leaves) as if they were chunk digests fails.
    assert merkle_root([left, right]) != merkle_root([a, b, c, d])
    leaves = [leaf_hash(x) for x in (a, b, c, d)]
    assert merkle_root(leaves) != merkle_root([a, b, c, d])
    assert leaf_hash(a) != node_hash(a, a)


def test_order_matters() -> None:
    a, b = digest(1), digest(2)
    assert merkle_root([a, b]) != merkle_root([b, a])


def test_bad_digest_sizes_are_format_errors() -> None:
    with pytest.raises(FormatError):
        leaf_hash(b"short")
    with pytest.raises(FormatError):
        node_hash(digest(1), b"x" * 33)
    with pytest.raises(FormatError):
        merkle_root([digest(1), b"\x00" * 31])


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33])
def test_every_proof_verifies(count: int) -> None:
    chunks = [digest(i) for i in range(count)]
    root = merkle_root(chunks)
    for index in range(count):
        proof = merkle_proof(chunks, index)
        assert verify_proof(chunks[index], index, count, proof, root)


def test_wrong_proofs_fail() -> None:
    count = 11
    chunks = [digest(i) for i in range(count)]
    root = merkle_root(chunks)
    index = 6
    proof = merkle_proof(chunks, index)
    assert verify_proof(chunks[index], index, count, proof, root)
    assert not verify_proof(digest(99), index, count, proof, root)
    assert not verify_proof(chunks[index], index + 1, count, proof, root)
    # The count shapes the path: the last chunk of 11 is promoted where one of 12 is paired.
    last = merkle_proof(chunks, count - 1)
    assert verify_proof(chunks[-1], count - 1, count, last, root)
    assert not verify_proof(chunks[-1], count - 1, count + 1, last, root)
    assert not verify_proof(chunks[index], index, count, proof[:-1], root)
    assert not verify_proof(chunks[index], index, count, [*proof, digest(5)], root)
    assert not verify_proof(chunks[index], index, count, proof, merkle_root(chunks[:-1]))
    tampered = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
    assert not verify_proof(chunks[index], index, count, tampered, root)
    assert not verify_proof(chunks[index], index, count, [b"short", *proof[1:]], root)
    assert not verify_proof(chunks[index], count, count, proof, root)
    assert not verify_proof(chunks[index], -1, count, proof, root)


def test_proof_index_out_of_range_is_a_format_error() -> None:
    with pytest.raises(FormatError):
        merkle_proof([digest(1)], 1)
    with pytest.raises(FormatError):
        merkle_proof([], 0)
