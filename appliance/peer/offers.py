"""What peers offer, which offer to take, and authenticating it against this host's trust.

``gather_offers`` asks every peer for its manifest list in parallel; ``choose_offers`` groups
the models asked for by the newest manifest offering them, keeping older offers and other
peers as fallbacks; ``authenticate_offer`` fetches the chosen manifest's exact bytes, its
detached signatures and the peer's trust chain, and runs the same checks as an import from
media (``appliance.authenticate.authenticate_manifest``: walk the chain from the installed
root, verify the publisher threshold over the exact bytes BEFORE parsing, then parse, scope,
expiry), then the channel's rollback high-water mark. Nothing a peer says about a manifest
(its channel, sequence or models in the list) is trusted; the authenticated manifest decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from appliance.authenticate import AuthenticatedBundle, authenticate_manifest
from appliance.errors import ApplianceError, PeerError, PeerProtocolError, UsageError
from appliance.format.manifest import Manifest, ModelEntry
from appliance.format.trust import SignedRoot, TrustRoot, next_root
from appliance.peer.client import PeerClient
from appliance.peer.protocol import ManifestSummary
from appliance.store import trust_state
from appliance.store.records import parse_ref


@dataclass(frozen=True)
class Offer:
    """One peer's listing of one manifest."""

    client: PeerClient
    summary: ManifestSummary


@dataclass(frozen=True)
class Choice:
    """Offers to try, best first, and the model references they should satisfy."""

    candidates: tuple[Offer, ...]
    refs: tuple[str, ...]  # empty: every model of the manifest


@dataclass(frozen=True)
class Authenticated:
    """An offer whose manifest passed this host's checks, with the models to pull from it.

    ``bundle.chain`` holds only the peer's roots beyond the installed one.
    """

    offer: Offer
    bundle: AuthenticatedBundle
    models: tuple[ModelEntry, ...]


def gather_offers(clients: Sequence[PeerClient]) -> tuple[list[Offer], dict[str, str]]:
    """Every peer's manifest list, asked in parallel; peers that fail are reported apart."""
    offers: list[Offer] = []
    failed: dict[str, str] = {}
    if not clients:
        return offers, failed
    with ThreadPoolExecutor(max_workers=min(16, len(clients))) as pool:
        futures = [(c, pool.submit(c.manifests)) for c in clients]
        for client, fut in futures:
            try:
                offers += [Offer(client, s) for s in fut.result()]
            except PeerError as e:
                failed[client.url] = str(e)
    return offers, failed


def _matches(summary: ManifestSummary, ref: str) -> bool:
    name, version = parse_ref(ref)
    return any(m.name == name and (version is None or m.version == version)
               for m in summary.models)


def _order(offers: Sequence[Offer]) -> tuple[Offer, ...]:
    return tuple(sorted(offers, key=lambda o: (-o.summary.sequence, not o.summary.complete)))


def choose_offers(offers: Sequence[Offer], refs: Sequence[str], all_models: bool
                  ) -> list[Choice]:
    """Group the wanted models by the newest manifest that offers them."""
    if all_models:
        channels: dict[str, list[Offer]] = {}
        for offer in offers:
            channels.setdefault(offer.summary.channel, []).append(offer)
        return [Choice(_order(group), ()) for _, group in sorted(channels.items())]
    by_best: dict[str, list[str]] = {}
    for ref in refs:
        parse_ref(ref)
        matching = [o for o in offers if _matches(o.summary, ref)]
        if not matching:
            offered = sorted({m.ref for o in offers for m in o.summary.models})
            raise PeerError(
                f"no peer offers model {ref!r}"
                + (f" (peers offer: {', '.join(offered)})" if offered else " (peers hold nothing)")
            )
        best = _order(matching)[0].summary.hash
        by_best.setdefault(best, []).append(ref)
    choices = []
    for group_refs in by_best.values():
        matching = [o for o in offers if all(_matches(o.summary, r) for r in group_refs)]
        choices.append(Choice(_order(matching), tuple(group_refs)))
    return choices


def select_models(manifest: Manifest, refs: Sequence[str]) -> tuple[ModelEntry, ...]:
    if not refs:
        return manifest.models
    chosen: list[ModelEntry] = []
    for ref in refs:
        name, version = parse_ref(ref)
        found = [m for m in manifest.models
                 if m.name == name and (version is None or m.version == version)]
        if not found:
            raise PeerProtocolError(
                f"the peer listed {ref!r} in manifest {manifest.channel} #{manifest.sequence}, "
                "but the signed manifest does not hold it"
            )
        if len(found) > 1:
            raise UsageError(f"manifest holds several versions of {name!r}; name one")
        if found[0] not in chosen:
            chosen.append(found[0])
    return tuple(chosen)


def fetch_chain(client: PeerClient, trusted: TrustRoot) -> tuple[SignedRoot, ...]:
    """The peer's roots newer than ``trusted``, fetched one at a time and each parsed only
    after the one before it signed it (``next_root``: signatures before parsing, so a lying
    peer's roots cost a signature check each, not a parse); walk_chain checks them again."""
    chain = []
    current = trusted
    for version in client.trust_versions():
        if version <= trusted.version:
            continue
        data = client.trust_root(version)
        if data is None:
            raise PeerProtocolError(f"{client.url} lists trust root v{version} but has none")
        signed = next_root(current, data, version, client.limits)
        chain.append(signed)
        current = signed.root
    return tuple(chain)


def authenticate_offer(
    store_dir: Path,
    offer: Offer,
    refs: Sequence[str],
    now: datetime,
    *,
    allow_expired: bool = False,
) -> Authenticated:
    """Fetch and check one offer; RefusalError subclasses say why it must not be used."""
    client, digest = offer.client, offer.summary.hash
    trusted = trust_state.require_root(store_dir)
    body = client.manifest_bytes(digest)
    if body is None:
        raise PeerProtocolError(f"{client.url} lists manifest {digest} but does not serve it")
    signatures = client.signatures(digest)
    chain = fetch_chain(client, trusted)
    bundle = authenticate_manifest(body, signatures, chain, trusted, now,
                                   allow_expired=allow_expired, limits=client.limits)
    trust_state.check_channel(store_dir, bundle)
    return Authenticated(offer=offer, bundle=bundle, models=select_models(bundle.manifest, refs))


def describe(e: ApplianceError) -> str:
    return f"{type(e).__name__}: {e}"
