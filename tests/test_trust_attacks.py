"""The TUF attack list, offline: each attack against a real store must fail with its own error.

Every row sets up a site host (a store in tmp_path trusting root v1: root keys r1 r2 r3 with
threshold 2, publishers p1 and p2 with threshold 1, channel 'site' at sequence 5), then plays
the attacker's move through the same library calls an import makes: walk the chain carried
on the media, check the manifest signatures, the publisher scopes, the channel sequence and
the expiry. The legitimate move beside each attack passes (``test_legitimate_moves``), so a
row cannot pass by refusing everything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import blake3
import pytest
from trust_helpers import DAY, NOW, make_root, private, sign_manifest

from appliance.errors import (
    ExpiredError,
    FingerprintMismatchError,
    LimitExceededError,
    RefusalError,
    RollbackError,
    RotationError,
    ScopeError,
    ThresholdError,
)
from appliance.format.freshness import check_expiry
from appliance.format.publisher import check_publisher_scope, verify_manifest_signatures
from appliance.format.signing import DOMAIN_ROOT, Signature, sign
from appliance.format.trust import SignedRoot
from appliance.limits import Limits
from appliance.store import audit, trust_state

V1 = make_root(publishers={"p1": ("*",), "p2": ("*",), "acme": ("acme/*",)})


def _manifest(sequence: int, model: str = "site/gemma", channel: str = "site") -> bytes:
    return (
        f"format: appliance-manifest/1\nchannel: {channel}\nsequence: {sequence}\n"
        f"models:\n- name: {model}\n"
    ).encode()


@dataclass
class Site:
    store: Path

    def import_bundle(
        self,
        manifest: bytes,
        signatures: Sequence[Signature],
        chain: Sequence[SignedRoot] = (),
        *,
        model: str = "site/gemma",
        sequence: int = 6,
        expires: datetime = NOW + 30 * DAY,
        now: datetime = NOW,
        limits: Limits | None = None,
    ) -> None:
        """What an import does with the trust parts of a bundle, in order."""
        root = trust_state.require_root(self.store)
        if chain:
            root = trust_state.update_root(self.store, chain, now)
        signers = verify_manifest_signatures(
            root, manifest, signatures, now, limits=limits or Limits()
        )
        check_publisher_scope(root, signers, [model])
        check_expiry("bundle 'site'", expires, now, False)
        trust_state.record_channel(
            self.store, "site", sequence, blake3.blake3(manifest).hexdigest(), now=now
        )


@pytest.fixture
def site(tmp_path: Path) -> Site:
    trust_state.install_first_root(tmp_path, V1.to_bytes(), V1.root.fingerprint, NOW)
    trust_state.record_channel(tmp_path, "site", 5, blake3.blake3(_manifest(5)).hexdigest())
    return Site(tmp_path)


def _v2(**kwargs: object) -> SignedRoot:
    """Root v2 dropping publisher p2 (a revocation), signed by r1 r2 unless told otherwise."""
    args: dict[str, object] = {"version": 2, "publishers": {"p1": ("*",), "acme": ("acme/*",)}}
    args.update(kwargs)
    return make_root(**args)  # type: ignore[arg-type]


# --- the attacks ----------------------------------------------------------------------------


def arbitrary_install_forged_root(site: Site) -> None:
    fresh = site.store / "fresh"
    forged = make_root(root_keys=("x1", "x2"), sign_with=("x1", "x2"))
    trust_state.install_first_root(fresh, forged.to_bytes(), V1.root.fingerprint, NOW)


def arbitrary_install_unsigned_real_body(site: Site) -> None:
    fresh = site.store / "fresh"
    unsigned = make_root(publishers={"p1": ("*",), "p2": ("*",), "acme": ("acme/*",)},
                         sign_with=())
    assert unsigned.root.fingerprint == V1.root.fingerprint
    trust_state.install_first_root(fresh, unsigned.to_bytes(), V1.root.fingerprint, NOW)


def arbitrary_manifest_by_unknown_key(site: Site) -> None:
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "x1", "x2"))


def rollback_older_sequence(site: Site) -> None:
    site.import_bundle(_manifest(4), sign_manifest(_manifest(4), "p1"), sequence=4)


def rollback_same_sequence_other_bytes(site: Site) -> None:
    other = _manifest(5, model="site/other")
    site.import_bundle(other, sign_manifest(other, "p1"), sequence=5)


def rollback_root_version_down(site: Site) -> None:
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "p1"), [V1, _v2(), V1])


def freeze_expired_bundle(site: Site) -> None:
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "p1"), expires=NOW - DAY)


def freeze_expired_root(site: Site) -> None:
    late = V1.root.expires + DAY
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "p1"), now=late,
                       expires=late + DAY)


def fast_forward_root_version(site: Site) -> None:
    v9 = make_root(version=9, sign_with=("r1", "r2"))
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "p1"), [V1, v9])


def fast_forward_root_by_compromised_key(site: Site) -> None:
    v2 = make_root(version=2, root_keys=("r1", "x1", "x2"), sign_with=("r1", "x1", "x2"))
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "p1"), [V1, v2])


def fast_forward_sequence_below_threshold(site: Site) -> None:
    huge = _manifest(1 << 62)
    site.import_bundle(huge, sign_manifest(huge, "x1"), sequence=1 << 62)


def mix_and_match_signature_from_other_manifest(site: Site) -> None:
    site.import_bundle(_manifest(6, model="site/evil"), sign_manifest(_manifest(6), "p1"),
                       model="site/evil")


def mix_and_match_forked_root(site: Site) -> None:
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "p1"), [V1, _v2()])
    fork = _v2(publishers={"p1": ("*",), "x1": ("*",)})
    v3 = make_root(version=3, publishers={"p1": ("*",), "x1": ("*",)})
    site.import_bundle(_manifest(7), sign_manifest(_manifest(7), "x1"), [V1, fork, v3],
                       sequence=7)


def cross_domain_root_signature_as_manifest(site: Site) -> None:
    both = make_root(publishers={"r1": ("*",)})
    fresh = site.store / "fresh"
    trust_state.install_first_root(fresh, both.to_bytes(), both.root.fingerprint, NOW)
    replayed = [sign(private("r1"), DOMAIN_ROOT, _manifest(6))]
    Site(fresh).import_bundle(_manifest(6), replayed)


def key_compromise_below_threshold_manifest(site: Site) -> None:
    two = _v2(publisher_threshold=2)
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "p1"), [V1, two])


def key_compromise_one_key_signing_twice(site: Site) -> None:
    two = _v2(publisher_threshold=2)
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "p1", "p1"), [V1, two])


def revoked_key(site: Site) -> None:
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "p2"), [V1, _v2()])


def wrong_role_root_key_signs_manifest(site: Site) -> None:
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "r1", "r2"))


def wrong_role_publishers_sign_root(site: Site) -> None:
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "p1"),
                       [V1, _v2(sign_with=("p1", "acme"))])


def rotation_signed_by_new_keys_only(site: Site) -> None:
    v2 = _v2(root_keys=("n1", "n2", "n3"), sign_with=("n1", "n2"))
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "p1"), [V1, v2])


def rotation_signed_by_old_keys_only(site: Site) -> None:
    v2 = _v2(root_keys=("n1", "n2", "n3"), sign_with=("r1", "r2", "r3"))
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "p1"), [V1, v2])


def chain_with_gap(site: Site) -> None:
    v3 = make_root(version=3)
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "p1"), [V1, v3])


def scoped_publisher_signs_other_model(site: Site) -> None:
    site.import_bundle(_manifest(6, model="other/model"), sign_manifest(
        _manifest(6, model="other/model"), "acme"), model="other/model")


def endless_data_signatures(site: Site) -> None:
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "p1") * 9,
                       limits=Limits(max_signatures=8))


# (attack, error, root version after, channel sequence after). A legitimate rotation on the
# same media may be accepted before the manifest is refused; nothing else may change.
ATTACKS: list[tuple[Callable[[Site], None], type[RefusalError], int, int]] = [
    (arbitrary_install_forged_root, FingerprintMismatchError, 1, 5),
    (arbitrary_install_unsigned_real_body, ThresholdError, 1, 5),
    (arbitrary_manifest_by_unknown_key, ThresholdError, 1, 5),
    (rollback_older_sequence, RollbackError, 1, 5),
    (rollback_same_sequence_other_bytes, RollbackError, 1, 5),
    (rollback_root_version_down, RotationError, 1, 5),
    (freeze_expired_bundle, ExpiredError, 1, 5),
    (freeze_expired_root, ExpiredError, 1, 5),
    (fast_forward_root_version, RotationError, 1, 5),
    (fast_forward_root_by_compromised_key, RotationError, 1, 5),
    (fast_forward_sequence_below_threshold, ThresholdError, 1, 5),
    (mix_and_match_signature_from_other_manifest, ThresholdError, 1, 5),
    (mix_and_match_forked_root, RotationError, 2, 6),
    (cross_domain_root_signature_as_manifest, ThresholdError, 1, 5),
    (key_compromise_below_threshold_manifest, ThresholdError, 2, 5),
    (key_compromise_one_key_signing_twice, ThresholdError, 2, 5),
    (revoked_key, ThresholdError, 2, 5),
    (wrong_role_root_key_signs_manifest, ThresholdError, 1, 5),
    (wrong_role_publishers_sign_root, RotationError, 1, 5),
    (rotation_signed_by_new_keys_only, RotationError, 1, 5),
    (rotation_signed_by_old_keys_only, RotationError, 1, 5),
    (chain_with_gap, RotationError, 1, 5),
    (scoped_publisher_signs_other_model, ScopeError, 1, 5),
    (endless_data_signatures, LimitExceededError, 1, 5),
]


@pytest.mark.parametrize(
    ("attack", "error", "root_version", "sequence"), ATTACKS, ids=[a[0].__name__ for a in ATTACKS]
)
def test_attack_is_refused(
    site: Site,
    attack: Callable[[Site], None],
    error: type[RefusalError],
    root_version: int,
    sequence: int,
) -> None:
    with pytest.raises(error):
        attack(site)
    assert trust_state.require_root(site.store).version == root_version
    assert trust_state.channel_state(site.store, "site") == (
        sequence, blake3.blake3(_manifest(sequence)).hexdigest()
    )
    audit.verify(site.store)


def test_legitimate_moves(site: Site) -> None:
    """The honest counterpart of each row goes through, so the table cannot pass vacuously."""
    site.import_bundle(_manifest(5), sign_manifest(_manifest(5), "p1"), sequence=5)  # re-import
    v2 = _v2(root_keys=("r1", "r2", "n1"), sign_with=("r1", "r2", "n1"))
    site.import_bundle(_manifest(6), sign_manifest(_manifest(6), "p1"), [V1, v2])
    assert trust_state.installed_root(site.store) == v2.root
    scoped = _manifest(7, model="acme/gemma")
    site.import_bundle(scoped, sign_manifest(scoped, "acme"), model="acme/gemma", sequence=7)
    late = V1.root.expires + DAY  # v1 and v2 expired long ago; v3 is current
    v3 = make_root(version=3, root_keys=("r2", "n1", "n2"), publishers={"p1": ("*",)},
                   sign_with=("r2", "n1", "n2"), created=late - DAY, expires=late + 90 * DAY)
    site.import_bundle(_manifest(8), sign_manifest(_manifest(8), "p1"), [V1, v2, v3],
                       sequence=8, now=late, expires=late + DAY)
    assert trust_state.installed_root(site.store) == v3.root
    assert trust_state.channel_state(site.store, "site") == (
        8, blake3.blake3(_manifest(8)).hexdigest()
    )
    assert [r.kind for r in audit.records(site.store)].count("trust-update") == 2
