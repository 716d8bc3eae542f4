"""The one trust decision over a signed manifest, wherever its bytes came from.

Media (``appliance.bundle.reader``) and LAN peers (``appliance.peer.offers``) both hand over
the same things: the manifest's exact bytes, detached signatures and a carried trust chain.
``authenticate_manifest`` checks them in the order DESIGN.md fixes: walk the chain from the
host's trusted root, count valid publisher signatures over the exact bytes BEFORE parsing,
then parse, check publisher scopes and expiry. Pure: no file, no socket, ``now`` passed in.
The channel's rollback mark needs the store and stays with the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from appliance.format.freshness import check_expiry
from appliance.format.manifest import Manifest, manifest_hash, parse_manifest
from appliance.format.publisher import check_publisher_scope, verify_manifest_signatures
from appliance.format.signing import Signature
from appliance.format.trust import SignedRoot, TrustRoot, walk_chain
from appliance.limits import DEFAULT_LIMITS, Limits


@dataclass(frozen=True)
class AuthenticatedBundle:
    """A manifest whose signatures met the threshold of ``root`` (the newest root reached)."""

    manifest: Manifest
    manifest_bytes: bytes
    manifest_hash: str
    signatures: tuple[Signature, ...]  # every one given, valid or not: the store keeps them
    root: TrustRoot
    signers: frozenset[str]
    chain: tuple[SignedRoot, ...]
    expired_override: bool  # expired, accepted because allow_expired: the caller audits it


def authenticate_manifest(
    manifest_bytes: bytes,
    signatures: Sequence[Signature],
    chain: Sequence[SignedRoot],
    trusted_root: TrustRoot,
    now: datetime,
    *,
    allow_expired: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> AuthenticatedBundle:
    """Chain, signatures over the exact bytes, then parse, scope and expiry.

    Raises RotationError, ExpiredError, ThresholdError, ScopeError, FormatError,
    LimitExceededError.
    """
    root = walk_chain(trusted_root, chain, now, allow_expired=allow_expired, limits=limits)
    signers = verify_manifest_signatures(root, manifest_bytes, signatures, now,
                                         allow_expired=allow_expired, limits=limits)
    manifest = parse_manifest(manifest_bytes, limits)
    check_publisher_scope(root, signers, [m.name for m in manifest.models])
    expired = check_expiry(
        f"bundle {manifest.channel} #{manifest.sequence}", manifest.expires, now,
        allow_expired, created=manifest.created,
    )
    return AuthenticatedBundle(
        manifest=manifest, manifest_bytes=manifest_bytes,
        manifest_hash=manifest_hash(manifest_bytes), root=root, signers=signers,
        chain=tuple(chain), expired_override=expired, signatures=tuple(signatures),
    )
