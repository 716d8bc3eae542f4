"""Swarm pull: fetch models from LAN peers into the store, each chunk checked on arrival.

``pull`` asks every peer what it holds, picks the newest manifest offering the models asked
for, and authenticates it against THIS host's trust root before fetching a single chunk: the
peer's trust chain is walked from the installed root, the publisher signatures over the exact
manifest bytes must meet the threshold, then scope, expiry and the channel's rollback
high-water mark are checked. A peer whose offer fails any of these is refused (and audited);
the next offer is tried.

The models are then written by the one ingest session (``appliance.store.ingest``: manifest
and channel recorded, files staged and preallocated, chunks the store already holds copied
locally, every other chunk checked on arrival and pwritten at its offset, marked done after
fsync, trust re-checked and files published by rename only when complete), with the swarm
(``appliance.peer.swarm.Swarm``) as its chunk source: every peer whose have-map lists a chunk
may be asked for it, in parallel, rarest first. A chunk whose bytes do not hash to the
manifest's digest, or an answer that breaks the protocol, drops that peer for the rest of the
pull and the chunk is fetched elsewhere; a peer that times out, dies or refuses a chunk it
advertised backs off and is dropped after ``max_failures``. Have-maps are refreshed every
``refresh`` seconds and chunks are marked done every ``flush_bytes``, so pullers of the same
models fetch from each other what they verified meanwhile rather than all from one seed; the
chunks this pull is fetching are announced through this host's peer server
(``appliance.peer.announce``), so the others leave them to come from here. When
no live peer delivers what is left for ``wait_for_chunks`` seconds the pull stops with a
``PeerError`` naming the undelivered chunks; everything written is durable, the writer lock is
released, and the next pull resumes from there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.errors import (
    ExpiredError,
    PeerError,
    RefusalError,
    RollbackError,
    UsageError,
)
from appliance.limits import MiB
from appliance.peer.announce import Announcer
from appliance.peer.client import PeerClient
from appliance.peer.offers import (
    Authenticated,
    Choice,
    authenticate_offer,
    choose_offers,
    describe,
    gather_offers,
)
from appliance.peer.swarm import Swarm
from appliance.store import layout, trust_state
from appliance.store.ingest import IngestOutcome, IngestSession
from appliance.store.store import Store

Progress = Callable[[int, int], None]
Notify = Callable[[str], None]


@dataclass(frozen=True)
class PullOptions:
    per_peer: int = 4  # chunk requests in flight per peer
    workers: int = 16  # threads fetching chunks, across all peers
    max_failures: int = 3  # timeouts or broken connections before a peer is dropped
    refresh: float = 0.5  # seconds between have-map refreshes during the pull
    wait_for_chunks: float = 30.0  # give up when no live peer holds what is left this long
    # Longest a chunk waits to come from a puller that announced it, rather than a seed.
    announce_grace: float = 5.0
    # fsync + mark done at least this often: peers see a chunk only then, so in a swarm this
    # is what lets the others fetch it from here instead of from the seed.
    flush_bytes: int = 1 * MiB
    allow_expired: bool = False
    reason: str | None = None


@dataclass
class PullResult:
    manifest_hash: str
    channel: str
    sequence: int
    models: list[str]  # name:version of the models now in the store
    present: list[str]  # of those, the ones that were already there
    bytes_total: int = 0
    bytes_fetched: int = 0
    bytes_local: int = 0
    by_peer: dict[str, int] = field(default_factory=dict)  # url -> verified bytes received
    dropped: dict[str, str] = field(default_factory=dict)  # url -> why it was dropped


def pull(
    store_dir: Path,
    clients: Sequence[PeerClient],
    refs: Sequence[str] = (),
    *,
    all_models: bool = False,
    options: PullOptions | None = None,
    progress: Progress | None = None,
    notify: Notify | None = None,
    now: datetime | None = None,
) -> list[PullResult]:
    """Pull the models named by ``refs`` (NAME or NAME:VERSION), or every offered one."""
    opts = options or PullOptions()
    if not clients:
        raise UsageError("no peers to pull from: give --from URL, list peers in the site "
                         "config, or run peers that advertise themselves")
    if not refs and not all_models:
        raise UsageError("name the models to pull, or pass --all")
    moment = now or datetime.now(UTC)
    say = notify or (lambda _message: None)
    offers, unreachable = gather_offers(clients)
    if not offers:  # the error names every peer: no notice before it says the same
        raise PeerError(
            "no peer answered: " + "; ".join(f"{u}: {w}" for u, w in unreachable.items())
        )
    for url, why in unreachable.items():
        say(f"peer {url} did not answer: {why}")
    results = []
    refused: dict[str, str] = {}
    for choice in choose_offers(offers, refs, all_models):
        auth = _first_authentic(store_dir, choice, moment, opts, refused, say)
        usable = [c for c in clients if c.url not in refused]
        results.append(_pull_manifest(store_dir, auth, usable, opts, progress, say, moment))
    for result in results:
        for url, why in refused.items():
            result.dropped.setdefault(url, why)
    return results


def _first_authentic(
    store_dir: Path,
    choice: Choice,
    now: datetime,
    opts: PullOptions,
    refused: dict[str, str],
    say: Notify,
) -> Authenticated:
    """The best offer that passes this host's checks; else the refusal of the best one.

    A peer whose manifest fails a signature, trust or format check is lying or foreign and is
    not used at all; one whose manifest is merely stale (rollback, expired) still serves chunks.
    """
    first_error: RefusalError | PeerError | None = None
    for offer in choice.candidates:
        url = offer.client.url
        if url in refused:
            continue
        try:
            return authenticate_offer(store_dir, offer, choice.refs, now,
                                      allow_expired=opts.allow_expired)
        except RefusalError as e:
            say(f"refused manifest {offer.summary.hash[:16]} (#{offer.summary.sequence}) "
                f"from {url}: {describe(e)}")
            trust_state.audit_refusal(store_dir, "pull", e, peer=url,
                                      manifest=offer.summary.hash)
            if not isinstance(e, RollbackError | ExpiredError):
                refused[url] = f"offered a manifest that was refused: {describe(e)}"
            first_error = first_error or e
        except PeerError as e:
            say(f"peer {url} failed while sending manifest {offer.summary.hash[:16]}: {e}")
            first_error = first_error or e
    if first_error is None:
        raise PeerError("every peer offering these models was refused earlier in this pull")
    raise first_error


def _pull_manifest(
    store_dir: Path,
    auth: Authenticated,
    clients: Sequence[PeerClient],
    opts: PullOptions,
    progress: Progress | None,
    say: Notify,
    now: datetime,
) -> PullResult:
    """One ingest session with the swarm as its source (``appliance.store.ingest``)."""
    bundle = auth.bundle
    manifest = bundle.manifest
    models = list(auth.models)
    result = PullResult(bundle.manifest_hash, manifest.channel, manifest.sequence,
                        [f"{m.name}:{m.version}" for m in models], [])
    unique = [c.digest for c in manifest.unique_chunks()]
    # This host's peer server tells other pullers what is on its way here (in-flight).
    announcer = Announcer(store_dir, bundle.manifest_hash, unique)
    swarm = Swarm(clients, bundle.manifest_hash, unique,
                  per_peer=opts.per_peer, workers=opts.workers, max_failures=opts.max_failures,
                  refresh=opts.refresh, wait_for_chunks=opts.wait_for_chunks,
                  announce_grace=opts.announce_grace, label=", ".join(result.models),
                  notify=say, announce=announcer.update)

    def summary(outcome: IngestOutcome) -> dict[str, Any]:
        result.present = outcome.present
        result.bytes_total = outcome.total_bytes
        result.bytes_fetched = outcome.source_bytes
        result.bytes_local = outcome.local_bytes
        result.by_peer = dict(swarm.stats.by_peer)
        result.dropped = dict(swarm.stats.dropped)
        return {
            "manifest": bundle.manifest_hash,
            "channel": manifest.channel,
            "sequence": manifest.sequence,
            "models": result.models,
            "bytes_fetched": result.bytes_fetched,
            "bytes_local": result.bytes_local,
            "peers": result.by_peer,
            "dropped": result.dropped,
            "user": trust_state.who(),
        }

    with layout.writer_lock(store_dir, "peer pull"), announcer, Store(
        store_dir, flush_bytes=opts.flush_bytes
    ) as store:
        session = IngestSession(store, action="pull", now=now, allow_expired=opts.allow_expired,
                                reason=opts.reason, progress=progress,
                                limits=auth.offer.client.limits,
                                context={"peer": auth.offer.client.url})
        session.run(bundle, lambda _bundle: swarm, models=models,
                    purpose=lambda _bundle: f"pulling {', '.join(result.models)}",
                    summary=summary)
    return result
