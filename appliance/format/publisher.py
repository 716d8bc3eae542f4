"""The publisher role applied to a manifest: who signed it, and which models they may sign.

A trusted root (``appliance.format.trust``, which owns the document, the root role and
rotation) names publisher keys, a threshold, and per key the model-name patterns it may sign.
Here that is applied to one bundle: ``verify_manifest_signatures`` counts distinct publisher
keys with a valid ``signing.DOMAIN_MANIFEST`` signature over the manifest's exact bytes, before
the manifest is parsed (``ThresholdError``); ``check_publisher_scope`` then requires, for each
model, a threshold of those signers whose patterns allow its name (``ScopeError``). Pure: no
file, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from appliance.errors import LimitExceededError, ScopeError, ThresholdError
from appliance.format.freshness import check_expiry
from appliance.format.signing import DOMAIN_MANIFEST, Signature
from appliance.format.trust import ROLE_PUBLISHER, TrustRoot, threshold_shortfall, valid_signers
from appliance.limits import DEFAULT_LIMITS, Limits


def verify_manifest_signatures(
    root: TrustRoot,
    manifest_bytes: bytes,
    signatures: Sequence[Signature],
    now: datetime,
    *,
    allow_expired: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> frozenset[str]:
    """Publisher key ids with a valid signature over the exact manifest bytes.

    Call before parsing the manifest. Raises ExpiredError for an expired root (unless
    allowed) and ThresholdError when fewer distinct publisher keys signed than required.
    """
    if len(manifest_bytes) > limits.max_manifest_bytes:
        raise LimitExceededError(f"manifest is {len(manifest_bytes)} bytes, over the cap")
    if len(signatures) > limits.max_signatures:
        raise LimitExceededError(f"{len(signatures)} manifest signatures, over the cap")
    check_expiry(f"trust root v{root.version}", root.expires, now, allow_expired,
                 created=root.created)
    valid = valid_signers(root, ROLE_PUBLISHER, DOMAIN_MANIFEST, manifest_bytes, signatures)
    problem = threshold_shortfall(root, ROLE_PUBLISHER, "the manifest", valid, signatures)
    if problem:
        raise ThresholdError(problem)
    return valid


def check_publisher_scope(
    root: TrustRoot, signer_ids: Iterable[str], model_names: Sequence[str]
) -> None:
    """Each model needs a threshold of signers whose patterns allow its name (ScopeError)."""
    role = root.publisher_role
    signers = sorted(set(signer_ids) & set(role.key_ids))
    for name in model_names:
        allowed = [kid for kid in signers if role.allows(kid, name)]
        if len(allowed) < role.threshold:
            limited = "; ".join(
                f"{root.key_label(kid)} may sign only {', '.join(role.models[kid])}"
                for kid in signers
                if kid not in allowed
            )
            raise ScopeError(
                f"model {name!r} is signed by {len(allowed)} publisher key(s) allowed to sign "
                f"it, trust root v{root.version} needs {role.threshold}"
                + (f" ({limited})" if limited else "")
            )
