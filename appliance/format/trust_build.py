"""Building trust roots for a signing ceremony: new bodies, rotated bodies, root signatures.

Pure, like ``appliance.format.trust`` (which parses and verifies): values in, canonical body
bytes out. Every body is validated by parsing it back with ``parse_root_body``, so the builder
can never write a root the verifier would reject for its shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.errors import FormatError, UsageError
from appliance.format import yamlsafe
from appliance.format.fields import format_timestamp
from appliance.format.signing import DOMAIN_ROOT, Signature, sign
from appliance.format.trust import (
    ANY_MODEL,
    ROLE_PUBLISHER,
    ROLE_ROOT,
    ROLES,
    ROOT_FORMAT,
    TrustKey,
    TrustRoot,
    parse_root_body,
)
from appliance.limits import DEFAULT_LIMITS, Limits


def new_root_body(
    *,
    version: int,
    created: datetime,
    expires: datetime,
    keys: Iterable[TrustKey],
    root_keys: Iterable[str],
    root_threshold: int,
    publisher_models: Mapping[str, Sequence[str]],
    publisher_threshold: int,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """Canonical body bytes for a new root; validated by parsing them back (FormatError)."""
    root_ids = sorted(set(root_keys))
    by_id = {k.key_id: k for k in keys}
    used = set(root_ids) | set(publisher_models)
    missing = sorted(used - set(by_id))
    if missing:
        raise FormatError(f"no public key given for key ids {missing}")
    value = {
        "format": ROOT_FORMAT,
        "version": version,
        "created": format_timestamp(created),
        "expires": format_timestamp(expires),
        "keys": {
            kid: {"name": by_id[kid].name, "public": by_id[kid].public.hex()}
            for kid in sorted(used)
        },
        "roles": {
            ROLE_ROOT: {"threshold": root_threshold, "keys": root_ids},
            ROLE_PUBLISHER: {
                "threshold": publisher_threshold,
                "keys": sorted(publisher_models),
                "models": {kid: list(p) for kid, p in sorted(publisher_models.items())},
            },
        },
    }
    body = yamlsafe.dump(value)
    parse_root_body(body, limits)
    return body


def rotated_body(
    old: TrustRoot,
    *,
    created: datetime,
    expires: datetime,
    add: Sequence[tuple[str, TrustKey, tuple[str, ...]]] = (),
    remove: Sequence[tuple[str, str]] = (),
    thresholds: Mapping[str, int] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """Body of version N+1: ``add`` (role, key, patterns), ``remove`` (role, key id)."""
    keys = dict(old.keys)
    root_ids = set(old.root_role.key_ids)
    publishers = dict(old.publisher_role.models)
    for role, kid in remove:
        members = root_ids if role == ROLE_ROOT else publishers
        if role not in ROLES or kid not in members:
            raise UsageError(f"key {kid} is not in the {role!r} role of trust root v{old.version}")
        if role == ROLE_ROOT:
            root_ids.discard(kid)
        else:
            del publishers[kid]
    for role, key, patterns in add:
        if role not in ROLES:
            raise UsageError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        keys[key.key_id] = key
        if role == ROLE_ROOT:
            root_ids.add(key.key_id)
        else:
            publishers[key.key_id] = patterns or (ANY_MODEL,)
    wanted = dict(thresholds or {})
    return new_root_body(
        version=old.version + 1,
        created=created,
        expires=expires,
        keys=keys.values(),
        root_keys=root_ids,
        root_threshold=wanted.get(ROLE_ROOT, old.root_role.threshold),
        publisher_models=publishers,
        publisher_threshold=wanted.get(ROLE_PUBLISHER, old.publisher_role.threshold),
        limits=limits,
    )


def sign_root_body(body: bytes, private_keys: Iterable[Ed25519PrivateKey]) -> tuple[Signature, ...]:
    return tuple(sign(k, DOMAIN_ROOT, body) for k in private_keys)
