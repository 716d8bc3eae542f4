"""Test helpers for trust roots: deterministic keys by name, roots, chains, manifest signatures.

Keys are derived from their names (BLAKE3 of the name as the Ed25519 seed) so a test can say
``root(sign_with=("r1", "r2"))`` and get the same key ids every run. The library builds and
parses every root; ``raw_envelope`` exists only to write deliberately malformed files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.format.signing import DOMAIN_MANIFEST, Signature, key_id, public_bytes, sign
from appliance.format.trust import SignedRoot, TrustKey, encode_envelope, parse_signed_root
from appliance.format.trust_build import new_root_body, sign_root_body
from appliance.store import trust_state

NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def private(name: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(blake3.blake3(name.encode()).digest()[:32])


def kid(name: str) -> str:
    return key_id(public_bytes(private(name)))


def tkey(name: str) -> TrustKey:
    return TrustKey(kid(name), public_bytes(private(name)), name)


def make_root(
    *,
    version: int = 1,
    root_keys: Sequence[str] = ("r1", "r2", "r3"),
    root_threshold: int = 2,
    publishers: Mapping[str, Sequence[str]] | None = None,
    publisher_threshold: int = 1,
    sign_with: Sequence[str] = ("r1", "r2"),
    created: datetime = NOW - 10 * DAY,
    expires: datetime = NOW + 365 * DAY,
) -> SignedRoot:
    """A root; ``sign_with`` may name any keys (inside or outside its roles)."""
    pubs = {"p1": ("*",), "p2": ("*",)} if publishers is None else publishers
    body = new_root_body(
        version=version,
        created=created,
        expires=expires,
        keys=[tkey(n) for n in (*root_keys, *pubs)],
        root_keys=[kid(n) for n in root_keys],
        root_threshold=root_threshold,
        publisher_models={kid(n): tuple(p) for n, p in pubs.items()},
        publisher_threshold=publisher_threshold,
    )
    signatures = sign_root_body(body, [private(n) for n in sign_with])
    return parse_signed_root(encode_envelope(body, signatures))


def trusted_store(store_dir: Path, signed: SignedRoot | None = None) -> Path:
    """``store_dir`` as a host's store that trusts ``signed`` (default ``make_root()``), installed
    by its fingerprint at ``NOW``: the one way the tests make a store that imports or pulls."""
    signed = signed or make_root()
    trust_state.install_first_root(store_dir, signed.to_bytes(), signed.root.fingerprint, NOW)
    return store_dir


def resign(signed: SignedRoot, sign_with: Sequence[str]) -> SignedRoot:
    """Same body, only the signatures of ``sign_with``."""
    signatures = sign_root_body(signed.body, [private(n) for n in sign_with])
    return parse_signed_root(encode_envelope(signed.body, signatures))


def sign_manifest(manifest: bytes, *names: str) -> list[Signature]:
    return [sign(private(n), DOMAIN_MANIFEST, manifest) for n in names]


def raw_envelope(body: bytes, signature_lines: Sequence[str] = ()) -> bytes:
    """An envelope written by hand, without the library's checks (for hostile inputs)."""
    lines = ["format: appliance-signed-root/1", "signed: |"]
    lines += [f"  {line}" if line else "" for line in body.decode().rstrip("\n").split("\n")]
    lines.append("signatures:" if signature_lines else "signatures: []")
    lines += [f"- {s}" for s in signature_lines]
    return ("\n".join(lines) + "\n").encode()
