"""appliance.format.trust, trust_build, publisher and freshness: the root format, thresholds,
chains, scopes, rollback and expiry rules."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
import yaml
from trust_helpers import (
    DAY,
    NOW,
    kid,
    make_root,
    private,
    raw_envelope,
    resign,
    sign_manifest,
    tkey,
)

from appliance.errors import (
    ExpiredError,
    FingerprintMismatchError,
    FormatError,
    LimitExceededError,
    RollbackError,
    RotationError,
    ScopeError,
    SignatureError,
    ThresholdError,
    UsageError,
)
from appliance.format import yamlsafe
from appliance.format.freshness import check_expiry, check_rollback
from appliance.format.publisher import check_publisher_scope, verify_manifest_signatures
from appliance.format.signing import DOMAIN_ROOT, sign
from appliance.format.trust import (
    check_fingerprint,
    check_same_root,
    encode_envelope,
    next_root,
    normalize_fingerprint,
    parse_envelope,
    parse_root_body,
    parse_signed_root,
    pattern_matches,
    root_fingerprint,
    verify_self_signed,
    walk_chain,
)
from appliance.format.trust_build import rotated_body, sign_root_body
from appliance.limits import Limits

MANIFEST = b"format: appliance-manifest/1\nchannel: site\nsequence: 7\n"


# --- format round trip and fingerprint ------------------------------------------------------


def test_root_file_round_trips_exact_bytes() -> None:
    signed = make_root()
    data = signed.to_bytes()
    again = parse_signed_root(data)
    assert again.body == signed.body
    assert again.signatures == signed.signatures
    assert again.root == signed.root
    assert again.to_bytes() == data
    assert data.startswith(b"# appliance trust root.")


def test_fingerprint_covers_body_not_signatures() -> None:
    one = make_root(sign_with=("r1", "r2"))
    more = resign(one, ("r1", "r2", "r3"))
    assert root_fingerprint(one) == root_fingerprint(more)
    assert re.fullmatch(r"([0-9a-f]{4}-){7}[0-9a-f]{4}", root_fingerprint(one))
    other = make_root(root_threshold=3, sign_with=("r1", "r2", "r3"))
    assert root_fingerprint(other) != root_fingerprint(one)


def test_normalize_fingerprint_accepts_any_grouping() -> None:
    fp = make_root().root.fingerprint
    compact = fp.replace("-", "")
    spaced = " ".join(compact[i : i + 4] for i in range(0, 32, 4)).upper()
    assert normalize_fingerprint(compact) == fp
    assert normalize_fingerprint(spaced) == fp
    assert normalize_fingerprint(fp.replace("-", ":")) == fp


@pytest.mark.parametrize("text", ["", "abcd", "g" * 32, "0" * 31, "0" * 33, "words-like-this"])
def test_malformed_fingerprint_is_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        normalize_fingerprint(text)


def test_wrong_fingerprint_is_refused_without_revealing_the_real_one() -> None:
    signed = make_root()
    with pytest.raises(FingerprintMismatchError) as exc:
        check_fingerprint(signed, "0" * 32)
    assert signed.root.fingerprint not in str(exc.value)
    check_fingerprint(signed, signed.root.fingerprint.upper())


def test_tampered_body_breaks_signatures_and_fingerprint() -> None:
    signed = make_root()
    data = signed.to_bytes().replace(b"name: p2", b"name: p9")
    tampered = parse_signed_root(data)
    assert tampered.root.fingerprint != signed.root.fingerprint
    with pytest.raises(ThresholdError):
        verify_self_signed(tampered, NOW)


def test_encode_refuses_body_a_literal_block_cannot_carry() -> None:
    body = make_root().body
    for bad in (body.rstrip(b"\n"), body + b"\n", b" " + body, body.replace(b"\n", b"\r\n")):
        with pytest.raises(FormatError):
            encode_envelope(bad, [])


# --- hostile root files ---------------------------------------------------------------------


def _body_dict() -> dict[str, Any]:
    value = yaml.safe_load(make_root().body)
    assert isinstance(value, dict)
    return value


def _mutated(mutate: Any) -> bytes:
    value = _body_dict()
    mutate(value)
    return raw_envelope(yamlsafe.dump(value))


def _publisher(v: dict[str, Any]) -> dict[str, Any]:
    publisher: dict[str, Any] = v["roles"]["publisher"]
    return publisher


HOSTILE_BODIES = {
    "unknown-field": lambda v: v.update(extra=1),
    "missing-field": lambda v: v.pop("expires"),
    "wrong-format": lambda v: v.update(format="appliance-root/2"),
    "version-zero": lambda v: v.update(version=0),
    "version-bool": lambda v: v.update(version=True),
    "version-string": lambda v: v.update(version="2"),
    "bad-date": lambda v: v.update(expires="2030-02-30T00:00:00Z"),
    "date-without-zone": lambda v: v.update(expires="2031-01-01T00:00:00"),
    "expires-before-created": lambda v: v.update(expires="2000-01-01T00:00:00Z"),
    "no-keys": lambda v: v.update(keys={}),
    "key-id-not-of-public": lambda v: v["keys"][kid("r1")].update(
        public=tkey("r2").public.hex()
    ),
    "key-id-malformed": lambda v: v["keys"].update(XYZ=v["keys"].pop(kid("r1"))),
    "key-bad-name": lambda v: v["keys"][kid("r1")].update(name="a b/c"),
    "key-without-role": lambda v: v["keys"].update(
        {kid("x9"): {"name": "x9", "public": tkey("x9").public.hex()}}
    ),
    "role-key-unknown": lambda v: v["roles"]["root"]["keys"].append(kid("x9")),
    "role-key-twice": lambda v: v["roles"]["root"]["keys"].append(kid("r1")),
    "threshold-zero": lambda v: v["roles"]["root"].update(threshold=0),
    "threshold-over-keys": lambda v: v["roles"]["root"].update(threshold=4),
    "extra-role": lambda v: v["roles"].update(mirror={"threshold": 1, "keys": [kid("r1")]}),
    "missing-role": lambda v: v["roles"].pop("publisher"),
    "root-role-with-models": lambda v: v["roles"]["root"].update(models={}),
    "publisher-models-missing-key": lambda v: _publisher(v)["models"].pop(kid("p1")),
    "publisher-models-empty": lambda v: _publisher(v)["models"].update({kid("p1"): []}),
    "publisher-pattern-bad-chars": lambda v: _publisher(v)["models"].update(
        {kid("p1"): ["acme/[a-z]*"]}
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_BODIES))
def test_hostile_root_body_is_format_error(case: str) -> None:
    with pytest.raises(FormatError):
        parse_signed_root(_mutated(HOSTILE_BODIES[case]))


def test_unquoted_timestamp_is_refused() -> None:
    body = make_root().body
    created = re.search(rb"created: '([^']+)'", body)
    assert created
    with pytest.raises(FormatError):
        parse_signed_root(raw_envelope(body.replace(created.group(0), b"created: " +
                                                    created.group(1))))


@pytest.mark.parametrize(
    "data",
    [
        b"format: appliance-signed-root/1\nsigned: x\nsignatures: []\nmore: 1\n",
        b"format: appliance-signed-root/9\nsigned: x\nsignatures: []\n",
        b"format: appliance-signed-root/1\nsigned: [1]\nsignatures: []\n",
        b"format: appliance-signed-root/1\nsigned: x\nsignatures: nope\n",
        b"format: appliance-signed-root/1\nsigned: x\nsignatures: [1]\n",
        b"a: &x 1\nb: *x\n",
        b"- just a list\n",
        b"\xff\xfe not utf-8",
    ],
)
def test_hostile_envelope_is_format_error(data: bytes) -> None:
    with pytest.raises(FormatError):
        parse_signed_root(data)


def test_malformed_signature_line_is_signature_error() -> None:
    with pytest.raises(SignatureError):
        parse_signed_root(raw_envelope(make_root().body, ["appliance-sig-v1 nothex AAAA"]))


def test_size_and_signature_count_caps() -> None:
    signed = make_root()
    with pytest.raises(LimitExceededError):
        parse_signed_root(signed.to_bytes(), Limits(max_trust_root_bytes=len(signed.body)))
    lines = [s.to_bytes().decode().strip() for s in signed.signatures] * 3
    with pytest.raises(LimitExceededError):
        parse_signed_root(raw_envelope(signed.body, lines), Limits(max_signatures=5))


# --- first root: self signatures ------------------------------------------------------------


def test_self_signed_threshold_met() -> None:
    root = verify_self_signed(make_root(sign_with=("r2", "r3")), NOW)
    assert root.version == 1 and root.root_role.threshold == 2


def test_one_key_signing_twice_counts_once() -> None:
    signed = make_root(sign_with=("r1",))
    line = signed.signatures[0].to_bytes().decode().strip()
    doubled = parse_signed_root(raw_envelope(signed.body, [line, line]))
    assert len(doubled.signatures) == 2
    with pytest.raises(ThresholdError):
        verify_self_signed(doubled, NOW)


def test_signature_by_key_outside_role_does_not_count() -> None:
    with pytest.raises(ThresholdError) as exc:
        verify_self_signed(make_root(sign_with=("r1", "p1", "x9")), NOW)
    assert "not a root key" in str(exc.value)


def test_expired_first_root() -> None:
    signed = make_root(created=NOW - 400 * DAY, expires=NOW - DAY)
    with pytest.raises(ExpiredError):
        verify_self_signed(signed, NOW)
    assert verify_self_signed(signed, NOW, allow_expired=True).version == 1


# --- chains ---------------------------------------------------------------------------------


def test_walk_reaches_newest_and_skips_older() -> None:
    v1 = make_root()
    v2 = make_root(version=2, root_keys=("r1", "r2", "r4"), sign_with=("r1", "r2"))
    v3 = make_root(version=3, root_keys=("r1", "r2", "r4"), sign_with=("r2", "r4"))
    assert walk_chain(v1.root, [v1, v2, v3], NOW).version == 3
    assert walk_chain(v2.root, [v1, v2, v3], NOW).version == 3
    assert walk_chain(v3.root, [v1, v2], NOW).version == 3
    assert walk_chain(v1.root, [], NOW) == v1.root


def test_walk_refuses_unsorted_chain() -> None:
    v1 = make_root()
    v2 = make_root(version=2)
    with pytest.raises(RotationError):
        walk_chain(v1.root, [v2, v1], NOW)
    with pytest.raises(RotationError):
        walk_chain(v1.root, [v2, v2], NOW)


def test_walk_refuses_fork_at_trusted_version() -> None:
    v1 = make_root()
    other_v1 = make_root(publishers={"p1": ("*",)})
    with pytest.raises(RotationError):
        walk_chain(v1.root, [other_v1], NOW)


def test_next_root_checks_signatures_before_it_parses_the_body() -> None:
    v1 = make_root()
    v2 = make_root(version=2, root_keys=("r1", "r2", "r4"), sign_with=("r1", "r2", "r4"))
    assert next_root(v1.root, v2.to_bytes(), 2) == v2
    # A body that is not even a trust root, signed by no key of v1: refused for the
    # signatures (RotationError), never parsed (which would be a FormatError).
    junk = b"keys: [not a root\n"
    forged = raw_envelope(junk, [sign(private("x9"), DOMAIN_ROOT, junk).to_bytes().decode()])
    with pytest.raises(RotationError, match="v2 has 0 valid signature") as info:
        next_root(v1.root, forged, 2)
    assert type(info.value) is RotationError
    assert parse_envelope(forged)[0] == junk  # the envelope alone is fine
    with pytest.raises(FormatError):
        parse_signed_root(forged)
    # Signed by v1's keys, but not by a threshold of its own: still refused by rotate_to.
    v2_short = make_root(version=2, root_keys=("r4", "r5", "r6"), sign_with=("r1", "r2", "r4"))
    with pytest.raises(RotationError):
        next_root(v1.root, v2_short.to_bytes(), 2)
    with pytest.raises(RotationError, match="v2 is missing"):
        next_root(v1.root, v2.to_bytes(), 3)


def test_check_same_root_catches_a_fork_from_the_body_alone() -> None:
    v1 = make_root()
    check_same_root(v1.root, 1, v1.body)
    with pytest.raises(RotationError, match="differs from the trusted v1"):
        check_same_root(v1.root, 1, make_root(publishers={"p1": ("*",)}).body)


def test_intermediate_expired_roots_are_fine_newest_must_not_be() -> None:
    old = dict(created=NOW - 900 * DAY, expires=NOW - 500 * DAY)
    v1 = make_root(**old)  # type: ignore[arg-type]
    v2 = make_root(version=2, **old)  # type: ignore[arg-type]
    v3 = make_root(version=3)
    assert walk_chain(v1.root, [v2, v3], NOW).version == 3
    with pytest.raises(ExpiredError) as exc:
        walk_chain(v1.root, [v2], NOW)
    assert "2030-06-01T12:00:00Z" in str(exc.value)  # the host's time
    assert walk_chain(v1.root, [v2], NOW, allow_expired=True).version == 2


def test_chain_length_cap() -> None:
    v1 = make_root()
    with pytest.raises(LimitExceededError):
        walk_chain(v1.root, [v1] * 3, NOW, limits=Limits(max_trust_chain_length=2))


# --- manifests ------------------------------------------------------------------------------


def test_manifest_threshold_counts_distinct_publishers() -> None:
    root = make_root(publisher_threshold=2).root
    assert verify_manifest_signatures(
        root, MANIFEST, sign_manifest(MANIFEST, "p1", "p2"), NOW
    ) == frozenset({kid("p1"), kid("p2")})
    with pytest.raises(ThresholdError):
        verify_manifest_signatures(root, MANIFEST, sign_manifest(MANIFEST, "p1", "p1"), NOW)
    with pytest.raises(ThresholdError):
        verify_manifest_signatures(root, MANIFEST, sign_manifest(MANIFEST, "p1", "r1"), NOW)


def test_manifest_signature_with_root_domain_does_not_count() -> None:
    root = make_root().root
    cross = [sign(private("p1"), DOMAIN_ROOT, MANIFEST)]
    with pytest.raises(ThresholdError):
        verify_manifest_signatures(root, MANIFEST, cross, NOW)


def test_manifest_under_expired_root() -> None:
    root = make_root(created=NOW - 400 * DAY, expires=NOW - DAY).root
    sigs = sign_manifest(MANIFEST, "p1")
    with pytest.raises(ExpiredError):
        verify_manifest_signatures(root, MANIFEST, sigs, NOW)
    assert verify_manifest_signatures(root, MANIFEST, sigs, NOW, allow_expired=True)


def test_manifest_caps() -> None:
    root = make_root().root
    sigs = sign_manifest(MANIFEST, "p1")
    with pytest.raises(LimitExceededError):
        verify_manifest_signatures(root, MANIFEST, sigs, NOW, limits=Limits(max_manifest_bytes=8))
    with pytest.raises(LimitExceededError):
        verify_manifest_signatures(root, MANIFEST, sigs * 3, NOW, limits=Limits(max_signatures=2))


# --- publisher scopes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("acme/*", "acme/gemma", True),
        ("acme/*", "acme/team/gemma", True),
        ("acme/*", "acme", False),
        ("acme/*", "other/model", False),
        ("acme/*", "ACME/gemma", False),
        ("*", "anything/at/all", True),
        ("gemma3-?70m", "gemma3-270m", True),
        ("gemma3-?70m", "gemma3-2700m", False),
        ("a.b", "axb", False),
        ("a+b", "a+b", True),
    ],
)
def test_pattern_matching(pattern: str, name: str, matches: bool) -> None:
    assert pattern_matches(pattern, name) is matches


def test_scoped_publisher_cannot_sign_other_models() -> None:
    root = make_root(publishers={"p1": ("acme/*",), "p2": ("*",)}).root
    signers = verify_manifest_signatures(root, MANIFEST, sign_manifest(MANIFEST, "p1"), NOW)
    check_publisher_scope(root, signers, ["acme/gemma", "acme/llama"])
    with pytest.raises(ScopeError) as exc:
        check_publisher_scope(root, signers, ["acme/gemma", "other/model"])
    assert "other/model" in str(exc.value) and "acme/*" in str(exc.value)


def test_scope_threshold_is_per_model() -> None:
    root = make_root(publishers={"p1": ("acme/*",), "p2": ("*",)}, publisher_threshold=2).root
    signers = verify_manifest_signatures(root, MANIFEST, sign_manifest(MANIFEST, "p1", "p2"), NOW)
    check_publisher_scope(root, signers, ["acme/x"])
    with pytest.raises(ScopeError):
        check_publisher_scope(root, signers, ["beta/x"])


def test_scope_ignores_signers_outside_the_role() -> None:
    root = make_root(publishers={"p1": ("acme/*",)}).root
    with pytest.raises(ScopeError):
        check_publisher_scope(root, {kid("r1"), kid("x9")}, ["acme/x"])


# --- rollback and expiry --------------------------------------------------------------------


def test_rollback_rules() -> None:
    check_rollback(None, 1, "h1")
    check_rollback((5, "h5"), 6, "h6")
    check_rollback((5, "h5"), 5, "h5")
    with pytest.raises(RollbackError):
        check_rollback((5, "h5"), 4, "h4")
    with pytest.raises(RollbackError):
        check_rollback((5, "h5"), 5, "other", channel="site")
    for bad in (-1, True, 1 << 63):
        with pytest.raises(RollbackError):
            check_rollback(None, bad, "h")


def test_expiry_message_names_both_clocks() -> None:
    expires = NOW - DAY
    created = NOW - 30 * DAY
    with pytest.raises(ExpiredError) as exc:
        check_expiry("bundle 'site' sequence 3", expires, NOW, False, created=created)
    text = str(exc.value)
    assert "2030-05-31T12:00:00Z" in text and "2030-05-02T12:00:00Z" in text
    assert "2030-06-01T12:00:00Z" in text and "--allow-expired" in text
    assert check_expiry("x", expires, NOW, True) is True
    assert check_expiry("x", NOW + DAY, NOW, False) is False
    with pytest.raises(ExpiredError):
        check_expiry("x", NOW, NOW, False)  # expiry instant itself is expired


def test_naive_datetimes_are_a_bug() -> None:
    with pytest.raises(TypeError):
        check_expiry("x", NOW, datetime(2030, 1, 1), False)


# --- building and rotating ------------------------------------------------------------------


def test_rotated_body_changes_roles() -> None:
    v1 = make_root(publishers={"p1": ("*",), "p2": ("*",)})
    body = rotated_body(
        v1.root,
        created=NOW,
        expires=NOW + 30 * DAY,
        add=[("root", tkey("r4"), ()), ("publisher", tkey("p3"), ("acme/*",))],
        remove=[("publisher", kid("p2")), ("root", kid("r3"))],
        thresholds={"publisher": 2},
    )
    v2 = parse_root_body(body)
    assert v2.version == 2
    assert set(v2.root_role.key_ids) == {kid("r1"), kid("r2"), kid("r4")}
    assert dict(v2.publisher_role.models) == {kid("p1"): ("*",), kid("p3"): ("acme/*",)}
    assert v2.publisher_role.threshold == 2
    assert kid("p2") not in v2.keys and kid("r3") not in v2.keys


def test_rotated_body_refuses_bad_changes() -> None:
    v1 = make_root().root
    with pytest.raises(UsageError):
        rotated_body(v1, created=NOW, expires=NOW + DAY, remove=[("root", kid("x9"))])
    with pytest.raises(FormatError):
        rotated_body(v1, created=NOW, expires=NOW + DAY, thresholds={"root": 4})
    with pytest.raises(FormatError):
        rotated_body(v1, created=NOW, expires=NOW - DAY)


def test_with_signatures_merges_without_duplicates() -> None:
    signed = make_root(sign_with=("r1",))
    merged = signed.with_signatures(sign_root_body(signed.body, [private("r1"), private("r2")]))
    assert len(merged.signatures) == 2
    assert verify_self_signed(parse_signed_root(merged.to_bytes()), NOW).version == 1
    assert replace(merged, signatures=()).signatures == ()
