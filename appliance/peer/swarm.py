"""The swarm scheduler of a pull: which chunk to ask which peer for, and what to do when a
peer lies, stalls, refuses or dies.

``Swarm`` is a ``ChunkSource`` of the ingest session (``appliance.store.ingest``): its ``run``
loop runs on the session's thread and keeps every index write there (``sink.record``); fetch
threads (``workers``) only ask a peer for a chunk and hand it to ``sink.write``, which checks
it against the signed manifest (only its length when the peer's client already hashed it:
``checks_chunks``) and pwrites it. The swarm talks to peers through ``PeerLike``
(``url``, ``have``, ``chunk``: what ``PeerClient`` offers), so it is tested with in-memory
peers and no sockets (tests/test_swarm.py).

Have-maps are re-read every ``refresh`` seconds on their own threads (a seed's, once complete,
is not), so what other pullers verified meanwhile is used. A peer that is pulling too also
announces the chunks on their way to it (``PeerClient.availability``; this host announces its
own through ``announce``, chunks asked for or received but not yet durable). Pending chunks go
out rarest first, counting copies held and copies announced, ties in this host's own random
order, so hosts pulling from one seed at once ask it for different chunks; each goes to the
least loaded peer holding it, a partial holder before a complete one, at most ``per_peer`` per
peer. The seed's upload is the site's scarce one, so a seed is not asked for a chunk another
puller holds or announces: that chunk waits to come from the puller, and the seed sends each
chunk about once (super-seeding, decided by the pullers). The wait is bounded: a chunk is left
to pullers for at most ``announce_grace`` seconds, and a puller whose announcement did not turn
into a copy within that time is not believed again in this pull, so a lying or dying
announcer costs one grace period, and the chunk still comes, checked, from the seed.

A peer sending wrong bytes or breaking the protocol is dropped at once (wrong bytes are
also audited). The only live holder of a chunk is asked for it ``patient``: it is not given up
on for slowness while bytes flow (a slow link shared by every request), only for stalling.
A peer that times out, dies, or answers 404 for a chunk its have-map lists has
failed: it backs off (``refresh * 2**failures``, at most ``wait_for_chunks / 4``), is not asked
for a chunk it refused again (whatever its have-map says), and after ``max_failures`` in a row
it is dropped. When no live peer holds what is left for ``wait_for_chunks`` seconds, the
pull ends with a ``PeerError`` naming the undelivered chunks (a stalled request is bounded
first by the client's own timeouts). While waiting, written chunks are made durable and
visible so this host's own peers can fetch them.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from appliance.errors import IntegrityError, PeerError, PeerProtocolError
from appliance.peer.protocol import Availability
from appliance.store.ingest import ChunkSink

Notify = Callable[[str], None]
Announce = Callable[[Collection[str]], None]
# Undelivered chunks named in a starvation error (the count is always given).
NAMED_CHUNKS = 3


class PeerLike(Protocol):
    """What the swarm needs of a peer (``appliance.peer.client.PeerClient`` is one).

    ``chunk(..., patient=True)`` is asked when no other live peer holds the chunk: the peer
    is then not given up on for being slow while its bytes still flow (only for stalling).
    A peer may also say ``checks_chunks = True`` when ``chunk`` returns nothing but bytes that
    just passed ``appliance.chunks.check_chunk`` against that digest and length (the real
    client does); the sink then does not hash them again. Without it, the sink checks."""

    @property
    def url(self) -> str: ...

    def have(self, manifest_hash: str, count: int) -> list[bool] | None: ...

    def chunk(self, digest: str, length: int, *, patient: bool = False) -> bytes | None: ...


@runtime_checkable
class Announcing(Protocol):
    """A peer that also tells which chunks its own pull is fetching (``PeerClient``)."""

    def availability(self, manifest_hash: str, count: int) -> Availability | None: ...


@dataclass
class SwarmStats:
    """What a swarm run did, per peer and in all."""

    by_peer: dict[str, int] = field(default_factory=dict)  # url -> verified bytes received
    dropped: dict[str, str] = field(default_factory=dict)  # url -> why it was dropped
    requests: int = 0  # chunk requests sent
    have_requests: int = 0
    failures: int = 0  # timeouts, broken answers, 404s for advertised chunks
    refusals: int = 0  # of those, 404s for a chunk the peer's have-map listed
    duplicates: int = 0  # chunks that arrived when no longer needed
    deferred: int = 0  # chunks left to come from a puller that announced them, not a seed
    bytes: int = 0  # verified bytes received


@dataclass
class _Peer:
    client: PeerLike
    have: set[str] = field(default_factory=set)
    fetching: set[str] = field(default_factory=set)  # announced: on their way to it
    believed: bool = True  # False once an announcement of it did not turn into a copy
    inflight: int = 0
    failures: int = 0  # in a row
    dropped: str | None = None
    bytes: int = 0
    asking: bool = False  # a have-map request is out
    asked_at: float = -math.inf
    retry_at: float = -math.inf  # backing off until then
    failed: set[str] = field(default_factory=set)  # chunks it did not deliver: not asked again

    @property
    def url(self) -> str:
        return self.client.url


class Swarm:
    """Fetch the chunks a session needs from ``peers``; one ``run`` per instance."""

    def __init__(
        self,
        peers: Sequence[PeerLike],
        manifest_hash: str,
        unique: Sequence[str],
        *,
        per_peer: int = 4,
        workers: int = 16,
        max_failures: int = 3,
        refresh: float = 0.5,
        wait_for_chunks: float = 30.0,
        announce_grace: float = 5.0,
        label: str = "",
        notify: Notify | None = None,
        announce: Announce | None = None,
    ) -> None:
        """``unique``: the manifest's distinct chunk digests in have-map order; ``announce``
        is given the chunks on their way here whenever they change."""
        self.peers = [_Peer(p) for p in peers]
        self.manifest_hash = manifest_hash
        self.unique = list(unique)
        self.per_peer = max(1, per_peer)
        self.workers = max(1, workers)
        self.max_failures = max(1, max_failures)
        self.refresh = refresh
        self.wait_for_chunks = wait_for_chunks
        # Below the starvation bound: a chunk left to come from an announcer is not starved.
        self.announce_grace = max(0.0, min(announce_grace, wait_for_chunks / 2))
        self.announce = announce
        self.label = label or manifest_hash[:16]
        self.say = notify or (lambda _message: None)
        self.stats = SwarmStats()
        self._pending: list[str] = []
        self._needed: dict[str, int] = {}
        self._inflight: dict[Future[tuple[bytes, bool] | None], tuple[str, _Peer]] = {}
        self._asking: dict[Future[Availability | list[bool] | None], _Peer] = {}
        self._stale = True  # a have-map changed since the pending chunks were last ranked
        self._copies: dict[str, int] = {}  # pending digest -> pullers holding or announcing it
        self._deferred_at: dict[str, float] = {}  # when a chunk was first left to an announcer
        self._unsettled: set[str] = set()  # recorded here, not yet durable (not in our have-map)

    # -- the loop ------------------------------------------------------------------------------

    def run(self, needed: Mapping[str, int], sink: ChunkSink) -> None:
        self._needed = dict(needed)
        self._pending = list(needed)
        # Each host walks the chunks in its own order, so hosts pulling from one seed at once
        # fetch different chunks from it and then have something to give each other.
        random.shuffle(self._pending)
        fetchers = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="peer-pull")
        # Have-maps on their own threads: a refresh never waits behind chunk transfers.
        askers = ThreadPoolExecutor(max_workers=max(1, min(8, len(self.peers))),
                                    thread_name_prefix="peer-have")
        try:
            self._ask(askers)
            wait(list(self._asking))  # the first have-maps, before any chunk is asked for
            for first in list(self._asking):
                self._absorb(first)
            self._loop(fetchers, askers, sink)
        finally:
            fetchers.shutdown(wait=False, cancel_futures=True)
            askers.shutdown(wait=False, cancel_futures=True)

    def _loop(self, fetchers: ThreadPoolExecutor, askers: ThreadPoolExecutor,
              sink: ChunkSink) -> None:
        starved_since: float | None = None
        settled_at, unsettled = time.monotonic(), False
        while self._pending or self._inflight:
            self._dispatch(fetchers, sink)
            self._announce()
            if not self._inflight:
                if not self._live():
                    raise PeerError(self._stopped("every peer was dropped"))
                moment = time.monotonic()
                starved_since = starved_since or moment
                if moment - starved_since > self.wait_for_chunks:
                    raise PeerError(self._stopped(
                        f"no live peer has delivered the {len(self._pending)} remaining "
                        f"chunk(s) for {self.wait_for_chunks:.0f} s"))
                self._settle(sink)
                self._ask(askers)
                if self._asking:
                    answered, _ = wait(list(self._asking), timeout=self.refresh,
                                       return_when=FIRST_COMPLETED)
                    for answer in answered:
                        self._absorb(answer)
                else:
                    time.sleep(self.refresh / 4)
                continue
            starved_since = None
            self._ask(askers)
            watched: list[Future[Any]] = [*self._inflight, *self._asking]
            finished, _ = wait(watched, timeout=self.refresh, return_when=FIRST_COMPLETED)
            for fut in finished:
                if fut in self._inflight:
                    unsettled |= self._received(fut, sink)
                else:
                    self._absorb(fut)
            # Chunks are marked done every ``flush_bytes`` anyway; this bounds how long a
            # landed chunk stays invisible to the other pullers when chunks arrive slowly.
            moment = time.monotonic()
            if not finished or (unsettled and moment - settled_at >= self.refresh / 2):
                self._settle(sink)
                settled_at, unsettled = moment, False

    def _settle(self, sink: ChunkSink) -> None:
        sink.settle()
        self._unsettled.clear()  # durable: our have-map lists them now

    def _announce(self) -> None:
        if self.announce is not None:
            self.announce({d for d, _ in self._inflight.values()} | self._unsettled)

    # -- peers ---------------------------------------------------------------------------------

    def _live(self) -> list[_Peer]:
        return [p for p in self.peers if p.dropped is None]

    def _complete(self, peer: _Peer) -> bool:
        return len(peer.have) == len(self.unique)

    def _drop(self, peer: _Peer, why: str) -> None:
        if peer.dropped is None:
            peer.dropped = why
            self.stats.dropped[peer.url] = why
            self.say(f"dropped peer {peer.url} for this pull: {why}")

    def _fail(self, peer: _Peer, digest: str, why: str, *, refused: bool = False) -> None:
        """A request the peer did not answer with the chunk: back off, then drop.

        A chunk it ``refused`` (404 although its have-map lists it) is not asked of it again
        in this pull; after a timeout it is tried elsewhere first (the next have-map may
        list it again: the failure may have been the network's)."""
        self.stats.failures += 1
        peer.failures += 1
        if refused:
            peer.failed.add(digest)
        peer.have.discard(digest)
        if peer.failures >= self.max_failures:
            strikes = f"{self.max_failures} failure" + ("s" if self.max_failures != 1 else "")
            self._drop(peer, f"{strikes}, the last: {why}")
            return
        backoff = min(self.refresh * 2 ** peer.failures, max(self.wait_for_chunks / 4,
                                                             self.refresh))
        peer.retry_at = time.monotonic() + backoff
        self._stale = True

    def _ask(self, askers: ThreadPoolExecutor) -> None:
        """Ask every live peer whose have-map is due for a fresh one (a bitmap: cheap).

        A peer already known to hold every chunk (a seed) is not asked again: only what
        other pullers verified meanwhile can change, and that is the point of asking."""
        moment = time.monotonic()
        for peer in self._live():
            due = moment - peer.asked_at >= self.refresh
            if peer.asking or not due or self._complete(peer):
                continue
            peer.asking = True
            peer.asked_at = moment
            self.stats.have_requests += 1
            client = peer.client
            ask: Callable[[str, int], Availability | list[bool] | None] = (
                client.availability if isinstance(client, Announcing) else client.have)
            fut = askers.submit(ask, self.manifest_hash, len(self.unique))
            self._asking[fut] = peer

    def _absorb(self, fut: Future[Availability | list[bool] | None]) -> None:
        peer = self._asking.pop(fut)
        peer.asking = False
        try:
            answer = fut.result()
        except (PeerProtocolError, IntegrityError) as e:
            self._drop(peer, f"bad have-map: {e}")
            return
        except PeerError as e:
            self.stats.failures += 1
            peer.failures += 1
            if peer.failures >= self.max_failures:
                self._drop(peer, str(e))
            return
        if peer.dropped is not None:
            return
        flags, coming = (answer.held, answer.fetching) if isinstance(answer, Availability) \
            else (answer, None)
        have = set() if flags is None else {
            d for d, held in zip(self.unique, flags, strict=True) if held
        }
        have -= peer.failed
        fetching = set() if coming is None else {
            d for d, on in zip(self.unique, coming, strict=True) if on
        }
        if have != peer.have or fetching != peer.fetching:
            peer.have, peer.fetching = have, fetching
            self._stale = True

    # -- chunks --------------------------------------------------------------------------------

    def _rank(self) -> None:
        # Rarest first: chunks few peers hold or are fetching go out before they become a
        # bottleneck, and a seed's upload goes to chunks nobody else has or gets yet. The sort
        # is stable, so ties keep this host's own random order.
        live = self._live()
        seeds = [p for p in live if self._complete(p)]
        pullers = [p for p in live if not self._complete(p)]
        self._copies = {d: sum(d in p.have or (p.believed and d in p.fetching) for p in pullers)
                        for d in self._pending}
        self._pending.sort(key=lambda d: self._copies[d] + sum(d in s.have for s in seeds))
        self._stale = False

    def _left_to_pullers(self, digest: str, moment: float) -> bool:
        """Leave ``digest`` to come from a puller that holds or announces it, not a seed?

        At most ``announce_grace`` seconds per chunk; then the pullers that announced it and
        still do not hold it are not believed again (a liar costs one grace period)."""
        if not self._copies.get(digest):
            return False
        since = self._deferred_at.get(digest)
        if since is None:
            since = self._deferred_at[digest] = moment
            self.stats.deferred += 1
        if moment - since < self.announce_grace:
            return True
        for peer in self._live():
            if peer.believed and digest in peer.fetching and digest not in peer.have:
                peer.believed = False
                self._stale = True
                self.say(f"peer {peer.url} announced chunk {digest[:16]} for "
                         f"{self.announce_grace:g} s without getting it; its announcements "
                         "are ignored for this pull")
        self._copies[digest] = 0
        return False

    def _cap(self, peer: _Peer, seed_share: int) -> int:
        return seed_share if self._complete(peer) else self.per_peer

    def _choose(self, digest: str, open_peers: list[_Peer], seed_share: int, moment: float
                ) -> _Peer | None:
        """The least loaded peer holding the chunk, a partial holder before a complete one
        (another puller rather than the seed, whose upload is the site's scarce one); None
        when only a seed is free and the chunk is left to come from a puller."""
        best: _Peer | None = None
        best_key: tuple[bool, int, int] | None = None
        for peer in open_peers:
            if digest in peer.have and peer.inflight < self._cap(peer, seed_share):
                key = (self._complete(peer), peer.inflight, len(peer.have))
                if best_key is None or key < best_key:
                    best, best_key = peer, key
        if best is not None and self._complete(best) and self._left_to_pullers(digest, moment):
            return None
        return best

    def _dispatch(self, fetchers: ThreadPoolExecutor, sink: ChunkSink) -> None:
        if self._stale:
            self._rank()
        moment = time.monotonic()
        peers_now = [p for p in self._live() if p.retry_at <= moment]
        # Peers still missing chunks are probably pulling too and share the seeds' upload:
        # ask a seed for only a fair share at once. Fewer requests in flight each finish
        # sooner, so other pullers see those chunks sooner and fewer ask the seed for the
        # same ones; alone with a seed, a host keeps ``per_peer`` requests in flight.
        partial = sum(not self._complete(p) for p in self._live())
        seed_share = max(1, -(-self.per_peer // (1 + partial)))
        waiting = set(self._pending)
        open_peers = [p for p in peers_now
                      if p.inflight < self._cap(p, seed_share) and not p.have.isdisjoint(waiting)]
        i = 0
        while open_peers and i < len(self._pending):
            digest = self._pending[i]
            peer = self._choose(digest, open_peers, seed_share, moment)
            if peer is None:
                i += 1
                continue
            self._pending.pop(i)
            peer.inflight += 1
            if peer.inflight >= self._cap(peer, seed_share):
                open_peers.remove(peer)
            self.stats.requests += 1
            fut = fetchers.submit(_fetch, peer.client, digest, self._needed[digest], sink,
                                  self._only_holder(peer, digest))
            self._inflight[fut] = (digest, peer)

    def _only_holder(self, peer: _Peer, digest: str) -> bool:
        """No other live peer holds ``digest``: dropping ``peer`` for slowness would leave
        the chunk to nobody, so it is asked to be patient (a stalled peer still times out)."""
        return not any(digest in p.have for p in self._live() if p is not peer)

    def _received(self, fut: Future[tuple[bytes, bool] | None], sink: ChunkSink) -> bool:
        """Handle a finished fetch; True when its chunk landed."""
        digest, peer = self._inflight.pop(fut)
        peer.inflight -= 1
        try:
            got = fut.result()
        except (IntegrityError, PeerProtocolError) as e:
            if peer.dropped is None and isinstance(e, IntegrityError):
                # A site member sent bytes the manifest does not sign: on the record.
                sink.refused(e, peer=peer.url)
            self._drop(peer, f"{type(e).__name__}: {e}")
            self._pending.insert(0, digest)
            return False
        except PeerError as e:
            self._fail(peer, digest, str(e))
            self._pending.insert(0, digest)
            return False
        if got is None:
            self.stats.refusals += 1
            self._fail(peer, digest, f"answered 404 for chunk {digest[:16]}, which its "
                       "have-map lists", refused=True)
            self._pending.insert(0, digest)
            return False
        data, fresh = got
        peer.failures = 0
        peer.bytes += len(data)
        self.stats.by_peer[peer.url] = peer.bytes
        self.stats.bytes += len(data)
        if not fresh:
            self.stats.duplicates += 1
            return False
        self._needed.pop(digest, None)
        sink.record(digest, data)
        self._unsettled.add(digest)
        return True

    def _stopped(self, why: str) -> str:
        left = sorted(set(self._pending) | {d for d, _ in self._inflight.values()})
        missing = sum(self._needed[d] for d in left)
        named = ", ".join(d[:16] for d in left[:NAMED_CHUNKS])
        more = f" and {len(left) - NAMED_CHUNKS} more" if len(left) > NAMED_CHUNKS else ""
        dropped = "; ".join(f"{u}: {w}" for u, w in self.stats.dropped.items())
        return (
            f"pull of {self.label} stopped: {why}. {len(left)} chunk(s), {missing} bytes, are "
            f"still missing ({named}{more}); what arrived is verified and kept, so running "
            "the same pull again resumes"
            + (f" (dropped peers: {dropped})" if dropped else "")
        )


def _fetch(client: PeerLike, digest: str, length: int, sink: ChunkSink, patient: bool
           ) -> tuple[bytes, bool] | None:
    """On a fetch thread: the chunk from the peer, then checked and pwritten by the sink;
    None when the peer does not have it, (data, False) when it was no longer needed."""
    data = client.chunk(digest, length, patient=patient)
    if data is None:
        return None
    if getattr(client, "checks_chunks", False) is True:
        # The client ran check_chunk on exactly these bytes against this digest and length:
        # the sink checks the length again, not the hash.
        return data, sink.write(digest, data, checked=True)
    return data, sink.write(digest, data)
