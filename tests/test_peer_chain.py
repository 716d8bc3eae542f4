"""A peer's trust roots are fetched one at a time and parsed only once the root before signed
them: a lying peer's roots cost a signature check each, never a parse, and nothing after
the first bad one is asked for. The client is a seam (what ``PeerClient`` answers)."""

from __future__ import annotations

from typing import cast

import pytest
from trust_helpers import make_root, private, raw_envelope

from appliance.errors import PeerProtocolError, RotationError
from appliance.format.signing import DOMAIN_ROOT, sign
from appliance.limits import DEFAULT_LIMITS
from appliance.peer.client import PeerClient
from appliance.peer.offers import fetch_chain


class RootsPeer:
    """Answers ``trust_versions`` and ``trust_root`` from a dict, recording what was asked."""

    url = "https://peer.test:8765"
    limits = DEFAULT_LIMITS

    def __init__(self, roots: dict[int, bytes | None]) -> None:
        self.roots = roots
        self.asked: list[int] = []

    def trust_versions(self) -> list[int]:
        return sorted(self.roots)

    def trust_root(self, version: int) -> bytes | None:
        self.asked.append(version)
        return self.roots[version]


def as_client(peer: RootsPeer) -> PeerClient:
    return cast(PeerClient, peer)


V1 = make_root()
V2 = make_root(version=2, root_keys=("r1", "r2", "r4"), sign_with=("r1", "r2", "r4"))
V3 = make_root(version=3, root_keys=("r1", "r2", "r4"), sign_with=("r2", "r4"))


def test_an_honest_peer_chain_is_fetched_in_order() -> None:
    peer = RootsPeer({1: V1.to_bytes(), 2: V2.to_bytes(), 3: V3.to_bytes()})
    assert fetch_chain(as_client(peer), V1.root) == (V2, V3)
    assert peer.asked == [2, 3]  # v1 is the trusted one: not fetched


def test_a_forged_root_is_refused_for_its_signatures_and_nothing_after_is_asked() -> None:
    junk = b"keys: [this is not a trust root\n"
    forged = raw_envelope(junk, [sign(private("x9"), DOMAIN_ROOT, junk).to_bytes().decode()])
    peer = RootsPeer({2: forged, 3: V3.to_bytes()})
    with pytest.raises(RotationError, match="v2 has 0 valid signature") as info:
        fetch_chain(as_client(peer), V1.root)
    assert type(info.value) is RotationError
    assert peer.asked == [2]


def test_a_gap_and_a_missing_root() -> None:
    with pytest.raises(RotationError, match="v2 is missing"):
        fetch_chain(as_client(RootsPeer({3: V3.to_bytes()})), V1.root)
    with pytest.raises(PeerProtocolError, match="lists trust root v2 but has none"):
        fetch_chain(as_client(RootsPeer({2: None})), V1.root)
