"""Trust root: the document (keys, roles, thresholds, publisher patterns), its fingerprint,
and its chain of rotations.

Pure: bytes and datetimes in, objects out or a ``RefusalError``. No file, no clock (``now`` is
always passed in, timezone-aware). The byte format is specified in docs/FORMAT.md, "Trust
root": a YAML envelope whose ``signed`` literal block holds the exact body bytes that
signatures (``signing.DOMAIN_ROOT``) and the fingerprint cover; the body is never
re-serialised before checking. Version N+1 is valid only with a threshold of version N's root
keys and a threshold of its own. Publisher keys sign manifests, optionally limited to
model-name patterns: that check is ``appliance.format.publisher``; rollback and expiry rules
are ``appliance.format.freshness``.

Parsing implies no trust: ``parse_signed_root`` only checks shape. Trust comes from
``verify_self_signed`` plus the operator's fingerprint (first root) or ``walk_chain`` (later).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

import blake3

from appliance.errors import (
    FingerprintMismatchError,
    FormatError,
    LimitExceededError,
    RotationError,
    ThresholdError,
    UsageError,
)
from appliance.format import fields, yamlsafe
from appliance.format.freshness import check_expiry
from appliance.format.signing import DOMAIN_ROOT, Signature, is_key_id, key_id, verify
from appliance.limits import DEFAULT_LIMITS, Limits

ROOT_FORMAT = "appliance-root/1"
ENVELOPE_FORMAT = "appliance-signed-root/1"
ROLE_ROOT = "root"
ROLE_PUBLISHER = "publisher"
ROLES = (ROLE_ROOT, ROLE_PUBLISHER)
ANY_MODEL = "*"
FINGERPRINT_HEX_CHARS = 32
MAX_PATTERNS_PER_KEY = 64

_ENVELOPE_COMMENT = (
    "# appliance trust root. Signatures cover the exact text under 'signed:'; do not edit it.\n"
)
_KEY_NAME_RE = re.compile(r"\A[A-Za-z0-9._@+-]{1,64}\Z")
_PATTERN_RE = re.compile(r"\A[A-Za-z0-9._/@+*?-]+\Z")
_PUBLIC_HEX_RE = re.compile(r"\A[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class TrustKey:
    key_id: str
    public: bytes
    name: str


@dataclass(frozen=True)
class Role:
    threshold: int
    key_ids: tuple[str, ...]
    # Publisher role only: key id -> model-name patterns the key may sign.
    models: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def allows(self, signer: str, model_name: str) -> bool:
        return any(pattern_matches(p, model_name) for p in self.models.get(signer, ()))


@dataclass(frozen=True)
class TrustRoot:
    version: int
    created: datetime
    expires: datetime
    keys: Mapping[str, TrustKey]
    roles: Mapping[str, Role]
    fingerprint: str

    @property
    def root_role(self) -> Role:
        return self.roles[ROLE_ROOT]

    @property
    def publisher_role(self) -> Role:
        return self.roles[ROLE_PUBLISHER]

    def key_label(self, kid: str) -> str:
        key = self.keys.get(kid)
        return f"{key.name} ({kid})" if key else kid


@dataclass(frozen=True)
class SignedRoot:
    """A parsed trust root file: the root, the exact signed body, and its signatures."""

    root: TrustRoot
    body: bytes
    signatures: tuple[Signature, ...]

    def to_bytes(self) -> bytes:
        return encode_envelope(self.body, self.signatures)

    def with_signatures(self, extra: Iterable[Signature]) -> SignedRoot:
        merged = list(self.signatures)
        for signature in extra:
            if signature not in merged:
                merged.append(signature)
        return SignedRoot(self.root, self.body, tuple(merged))


# --- names, patterns ------------------------------------------------------------------


def valid_key_name(name: str) -> bool:
    return bool(_KEY_NAME_RE.match(name))


def valid_pattern(pattern: str, limits: Limits = DEFAULT_LIMITS) -> bool:
    return len(pattern) <= limits.max_name_bytes and bool(_PATTERN_RE.match(pattern))


def pattern_matches(pattern: str, name: str) -> bool:
    """``*`` matches any run of characters (``/`` included), ``?`` one; the rest literally."""
    regex = "".join(
        ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern
    )
    return re.fullmatch(regex, name, flags=re.DOTALL) is not None


# --- fingerprints ------------------------------------------------------------------------


def fingerprint_of_body(body: bytes) -> str:
    """First 128 bits of BLAKE3(body) in hex, in groups of four for reading off paper."""
    digest = blake3.blake3(body).hexdigest()[:FINGERPRINT_HEX_CHARS]
    return "-".join(digest[i : i + 4] for i in range(0, FINGERPRINT_HEX_CHARS, 4))


def root_fingerprint(signed: SignedRoot) -> str:
    return signed.root.fingerprint


def normalize_fingerprint(text: str) -> str:
    """Accept any case and any grouping by spaces, dashes or colons; return the canonical form."""
    compact = re.sub(r"[\s:-]", "", text).lower()
    if len(compact) != FINGERPRINT_HEX_CHARS or not all(c in "0123456789abcdef" for c in compact):
        raise UsageError(
            f"a trust root fingerprint is {FINGERPRINT_HEX_CHARS} hex digits "
            f"(e.g. 3f2a-9b1c-...), got {text!r}"
        )
    return "-".join(compact[i : i + 4] for i in range(0, FINGERPRINT_HEX_CHARS, 4))


def check_fingerprint(signed: SignedRoot, expected: str) -> None:
    wanted = normalize_fingerprint(expected)
    if signed.root.fingerprint != wanted:
        # Not naming the actual fingerprint: an operator must not copy it from an error.
        raise FingerprintMismatchError(
            f"trust root v{signed.root.version} does not have the fingerprint {wanted}: do not "
            "install it; get the root file and the paper from the signing ceremony again"
        )


# --- parsing -----------------------------------------------------------------------------


def _parse_keys(value: Any, limits: Limits) -> dict[str, TrustKey]:
    if not isinstance(value, dict) or not value:
        raise FormatError("trust root: 'keys' must be a non-empty mapping of key id -> key")
    if len(value) > limits.max_keys:
        raise LimitExceededError(f"trust root lists {len(value)} keys, over the cap")
    keys: dict[str, TrustKey] = {}
    for kid, entry in value.items():
        if not isinstance(kid, str) or not is_key_id(kid):
            raise FormatError(f"trust root: {kid!r} is not a key id (32 lower-case hex digits)")
        entry = fields.record(entry, {"name", "public"}, f"trust root key {kid}")
        public_hex, name = entry["public"], entry["name"]
        if not isinstance(public_hex, str) or not _PUBLIC_HEX_RE.match(public_hex):
            raise FormatError(f"trust root key {kid}: 'public' must be 64 lower-case hex digits")
        public = bytes.fromhex(public_hex)
        if key_id(public) != kid:
            raise FormatError(f"trust root key {kid}: the key id does not match the public key")
        if not isinstance(name, str) or not valid_key_name(name):
            raise FormatError(f"trust root key {kid}: bad name {name!r}")
        keys[kid] = TrustKey(kid, public, name)
    return keys


def _parse_role(name: str, value: Any, keys: Mapping[str, TrustKey], limits: Limits) -> Role:
    wanted = {"threshold", "keys", "models"} if name == ROLE_PUBLISHER else {"threshold", "keys"}
    value = fields.record(value, wanted, f"trust root role {name!r}")
    key_list = value["keys"]
    if not isinstance(key_list, list) or not key_list:
        raise FormatError(f"trust root role {name!r}: 'keys' must be a non-empty list")
    for kid in key_list:
        if kid not in keys:
            raise FormatError(f"trust root role {name!r}: key {kid!r} is not in 'keys'")
    if len(set(key_list)) != len(key_list):
        raise FormatError(f"trust root role {name!r} lists a key twice")
    threshold = fields.integer(
        value["threshold"], f"trust root role {name!r} threshold", minimum=1,
        maximum=len(key_list),
    )
    models: dict[str, tuple[str, ...]] = {}
    if name == ROLE_PUBLISHER:
        raw = value["models"]
        if not isinstance(raw, dict) or set(raw) != set(key_list):
            raise FormatError(
                "trust root role 'publisher': 'models' must map every publisher key id "
                "(and only those) to a list of model-name patterns"
            )
        for kid, patterns in raw.items():
            if (
                not isinstance(patterns, list)
                or not 1 <= len(patterns) <= MAX_PATTERNS_PER_KEY
                or len(set(patterns)) != len(patterns)
                or not all(isinstance(p, str) and valid_pattern(p, limits) for p in patterns)
            ):
                raise FormatError(
                    f"trust root: model patterns of publisher key {kid} must be a list of 1 to "
                    f"{MAX_PATTERNS_PER_KEY} distinct patterns of [A-Za-z0-9._/@+*?-]"
                )
            models[kid] = tuple(patterns)
    return Role(threshold, tuple(sorted(key_list)), MappingProxyType(models))


def parse_root_body(body: bytes, limits: Limits = DEFAULT_LIMITS) -> TrustRoot:
    """The signed body -> TrustRoot. Shape only; no signature is looked at."""
    value = yamlsafe.load(
        body, max_bytes=limits.max_trust_root_bytes, max_depth=limits.max_yaml_depth,
        what="trust root body",
    )
    value = fields.record(
        value, {"format", "version", "created", "expires", "keys", "roles"}, "trust root body"
    )
    if value["format"] != ROOT_FORMAT:
        raise FormatError(f"unsupported trust root format {value['format']!r} (want {ROOT_FORMAT})")
    version = fields.sequence_number(value["version"], "trust root version")
    created = fields.parse_timestamp(value["created"], "trust root 'created'")
    expires = fields.parse_timestamp(value["expires"], "trust root 'expires'")
    if expires <= created:
        raise FormatError("trust root expires before it was created")
    keys = _parse_keys(value["keys"], limits)
    roles_value = fields.record(value["roles"], set(ROLES), "trust root 'roles'")
    roles = {name: _parse_role(name, roles_value[name], keys, limits) for name in ROLES}
    used = {kid for role in roles.values() for kid in role.key_ids}
    for kid in keys:
        if kid not in used:
            raise FormatError(f"trust root key {kid} has no role")
    return TrustRoot(
        version, created, expires, MappingProxyType(keys), MappingProxyType(roles),
        fingerprint_of_body(body),
    )


def parse_envelope(data: bytes, limits: Limits = DEFAULT_LIMITS
                   ) -> tuple[bytes, tuple[Signature, ...]]:
    """A trust root file's exact signed body and its signatures; the body is not parsed.

    The envelope is a few YAML events (one literal block, a list of signature lines), so
    this is cheap whatever the body holds: a chain walk checks the signatures over the body
    with it before paying for the body's parse (``next_root``).
    """
    value = yamlsafe.load(
        data, max_bytes=limits.max_trust_root_bytes, max_depth=limits.max_yaml_depth,
        what="trust root file",
    )
    value = fields.record(value, {"format", "signed", "signatures"}, "trust root file")
    if value["format"] != ENVELOPE_FORMAT:
        raise FormatError(
            f"unsupported trust root file format {value['format']!r} (want {ENVELOPE_FORMAT})"
        )
    if not isinstance(value["signed"], str):
        raise FormatError("trust root file: 'signed' must be a literal block of text")
    raw_sigs = value["signatures"]
    if not isinstance(raw_sigs, list):
        raise FormatError("trust root file: 'signatures' must be a list")
    if len(raw_sigs) > limits.max_signatures:
        raise LimitExceededError(f"trust root file has {len(raw_sigs)} signatures, over the cap")
    if not all(isinstance(s, str) for s in raw_sigs):
        raise FormatError("trust root file: each signature must be one line of text")
    signatures = tuple(Signature.from_bytes(s.encode("utf-8"), limits) for s in raw_sigs)
    return value["signed"].encode("utf-8"), signatures


def parse_signed_root(data: bytes, limits: Limits = DEFAULT_LIMITS) -> SignedRoot:
    """A trust root file -> SignedRoot (FormatError, SignatureError). No trust implied."""
    body, signatures = parse_envelope(data, limits)
    return SignedRoot(parse_root_body(body, limits), body, signatures)


def encode_envelope(body: bytes, signatures: Sequence[Signature]) -> bytes:
    """The trust root file for ``body``; refuses a body a literal block cannot carry exactly."""
    text = body.decode("utf-8")
    if (
        not text.endswith("\n")
        or text.endswith("\n\n")
        or text.startswith((" ", "\n"))
        or "\r" in text
        or "\t" in text
    ):
        raise FormatError("trust root body cannot be carried exactly in a YAML literal block")
    lines = [f"format: {ENVELOPE_FORMAT}", "signed: |"]
    lines += [f"  {line}" if line else "" for line in text[:-1].split("\n")]
    lines.append("signatures:" if signatures else "signatures: []")
    lines += [f"- {s.to_bytes().decode('ascii').strip()}" for s in signatures]
    data = (_ENVELOPE_COMMENT + "\n".join(lines) + "\n").encode("utf-8")
    again = parse_signed_root(data)
    if again.body != body or again.signatures != tuple(signatures):
        raise FormatError("trust root body does not survive a YAML round trip byte for byte")
    return data


# --- verification ------------------------------------------------------------------------


def valid_signers(
    root: TrustRoot, role_name: str, domain: bytes, message: bytes,
    signatures: Iterable[Signature],
) -> frozenset[str]:
    """Distinct key ids of ``role_name`` with a valid signature; others are ignored."""
    role = root.roles[role_name]
    valid: set[str] = set()
    for sig in signatures:
        if (
            sig.key_id in role.key_ids
            and sig.key_id not in valid
            and verify(root.keys[sig.key_id].public, domain, message, sig)
        ):
            valid.add(sig.key_id)
    return frozenset(valid)


def _ignored(
    root: TrustRoot, role_name: str, counted: frozenset[str], signatures: Iterable[Signature]
) -> str:
    notes = []
    for kid in sorted({s.key_id for s in signatures} - counted):
        if kid in root.roles[role_name].key_ids:
            notes.append(f"{root.key_label(kid)}: signature does not verify")
        else:
            notes.append(f"{root.key_label(kid)}: not a {role_name} key of root v{root.version}")
    return f"; ignored {'; '.join(notes)}" if notes else ""


def threshold_shortfall(root: TrustRoot, role_name: str, what: str, valid: frozenset[str],
                        signatures: Sequence[Signature]) -> str | None:
    """Why ``valid`` falls short of ``role_name``'s threshold (naming ignored signers), or None."""
    threshold = root.roles[role_name].threshold
    if len(valid) >= threshold:
        return None
    return (
        f"{what} has {len(valid)} valid signature(s) from the {role_name} keys of trust root "
        f"v{root.version}, needs {threshold}{_ignored(root, role_name, valid, signatures)}"
    )


def verify_self_signed(
    signed: SignedRoot, now: datetime, *, allow_expired: bool = False
) -> TrustRoot:
    """A first root: a threshold of its own root keys (ThresholdError), not expired."""
    root = signed.root
    valid = valid_signers(root, ROLE_ROOT, DOMAIN_ROOT, signed.body, signed.signatures)
    problem = threshold_shortfall(root, ROLE_ROOT, f"trust root v{root.version}", valid,
                                  signed.signatures)
    if problem:
        raise ThresholdError(problem)
    check_expiry(f"trust root v{root.version}", root.expires, now, allow_expired,
                 created=root.created)
    return root


def check_next_version(current: int, version: int) -> None:
    """A rotation goes from version N to N+1 exactly (RotationError naming the gap)."""
    if version != current + 1:
        raise RotationError(
            f"trust chain jumps from v{current} to v{version}; v{current + 1} is missing"
            if version > current
            else f"trust chain goes down from v{current} to v{version}"
        )


def check_same_root(trusted: TrustRoot, version: int, body: bytes) -> None:
    """The chain's copy of the trusted version must be the trusted root itself (else a fork)."""
    fingerprint = fingerprint_of_body(body)
    if fingerprint != trusted.fingerprint:
        raise RotationError(
            f"trust chain's v{version} (fingerprint {fingerprint}) differs "
            f"from the trusted v{version} ({trusted.fingerprint})"
        )


def next_root(current: TrustRoot, data: bytes, version: int, limits: Limits = DEFAULT_LIMITS
              ) -> SignedRoot:
    """Root ``version`` (= N+1) from its file bytes, checked as ``rotate_to`` checks it, but
    with ``current``'s threshold over the body verified BEFORE the body is parsed: a root no
    trusted key signed costs an envelope parse and a few signature checks, never the parse
    of up to ``max_trust_root_bytes`` of keys and patterns (hostile media, issue 14)."""
    check_next_version(current.version, version)
    body, signatures = parse_envelope(data, limits)
    valid = valid_signers(current, ROLE_ROOT, DOMAIN_ROOT, body, signatures)
    problem = threshold_shortfall(current, ROLE_ROOT, f"trust root v{version}", valid, signatures)
    if problem:
        raise RotationError(problem)
    signed = SignedRoot(parse_root_body(body, limits), body, signatures)
    rotate_to(current, signed)
    return signed


def rotate_to(current: TrustRoot, signed: SignedRoot) -> TrustRoot:
    """One rotation step N -> N+1 (RotationError); expiry is left to the caller."""
    new = signed.root
    check_next_version(current.version, new.version)
    what = f"trust root v{new.version}"
    for authority in (current, new):
        valid = valid_signers(authority, ROLE_ROOT, DOMAIN_ROOT, signed.body, signed.signatures)
        problem = threshold_shortfall(authority, ROLE_ROOT, what, valid, signed.signatures)
        if problem:
            raise RotationError(problem)
    return new


def walk_chain(
    trusted: TrustRoot,
    chain: Sequence[SignedRoot],
    now: datetime,
    *,
    allow_expired: bool = False,
    limits: Limits = DEFAULT_LIMITS,
) -> TrustRoot:
    """The newest root reachable from ``trusted`` through ``chain`` (ascending versions).

    Versions below ``trusted`` are skipped; the one equal to it must be byte-identical (same
    fingerprint), else it is a fork; later ones must follow without gaps, each signed by a
    threshold of the previous root keys and of its own. Only the result's expiry is checked:
    intermediate roots may have expired long ago on a site that was offline.
    """
    if len(chain) > limits.max_trust_chain_length:
        raise LimitExceededError(f"trust chain has {len(chain)} roots, over the cap")
    current = trusted
    previous_version = 0
    for signed in chain:
        version = signed.root.version
        if version <= previous_version:
            raise RotationError(
                f"trust chain is not in ascending order: v{version} after v{previous_version}"
            )
        previous_version = version
        if version < current.version:
            continue
        if version == current.version:
            check_same_root(current, version, signed.body)
            continue
        current = rotate_to(current, signed)
    check_expiry(f"trust root v{current.version}", current.expires, now, allow_expired,
                 created=current.created)
    return current
