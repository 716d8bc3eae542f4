"""The swarm scheduler of a pull: which chunk to ask which peer for, and what to do when a
peer lies, stalls or dies.

``swarm`` runs on the pull's thread and keeps every SQLite write there; fetch threads
(``PullOptions.workers``) only talk HTTP, check each chunk on arrival and pwrite it into the
staged files (``StagedFile.pwrite_chunk``), and the pull's thread then records it.

Have-maps are re-read every ``PullOptions.refresh`` seconds on their own threads (a seed's,
once complete, is not), so what other pullers verified meanwhile is used. Pending chunks go out
rarest first, ties in this host's own random order, so hosts pulling from one seed at once ask
it for different chunks; each goes to the least loaded peer holding it, a partial holder before
a complete one, at most ``per_peer`` per peer: the seed's upload goes to chunks nobody else has
yet. A peer sending wrong bytes or breaking the protocol is dropped at once (wrong bytes are
also audited), one that fails ``max_failures`` times in a row is dropped too, and its chunk
goes back to the queue. While waiting, written chunks are flushed so this host's own peers can
see them.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import IntegrityError, PeerError, PeerProtocolError
from appliance.format.manifest import ChunkRef, Manifest
from appliance.peer.client import PeerClient
from appliance.store import trust_state
from appliance.store.staging import StagedFile

if TYPE_CHECKING:
    from appliance.peer.pull import PullOptions, PullResult

Notify = Callable[[str], None]


@dataclass
class _Peer:
    client: PeerClient
    have: set[str] = field(default_factory=set)
    inflight: int = 0
    failures: int = 0
    dropped: str | None = None
    bytes: int = 0
    asking: bool = False  # a have-map request is out
    asked_at: float = -math.inf


    @property
    def url(self) -> str:
        return self.client.url


@dataclass
class _Order:
    stale: bool = True  # a have-map changed since the pending chunks were last ranked


def swarm(
    store_dir: Path,
    manifest: Manifest,
    need: dict[str, list[tuple[StagedFile, int]]],
    lengths: dict[str, int],
    clients: Sequence[PeerClient],
    opts: PullOptions,
    result: PullResult,
    land: Callable[[str, bytes], None],
    settle: Callable[[], None],
    say: Notify,
) -> None:
    unique: list[ChunkRef] = manifest.unique_chunks()
    manifest_hash = result.manifest_hash
    peers = [_Peer(c) for c in clients]
    pending = list(need)
    # Each host walks the chunks in its own order, so hosts pulling from one seed at once
    # fetch different chunks from it and then have something to give each other.
    random.shuffle(pending)
    inflight: dict[Future[bytes | None], tuple[str, _Peer]] = {}
    asking: dict[Future[list[bool] | None], _Peer] = {}
    order = _Order()
    gate = _WriteGate()
    executor = ThreadPoolExecutor(max_workers=max(1, opts.workers),
                                  thread_name_prefix="peer-pull")
    # Have-maps on their own threads: a refresh never waits behind chunk transfers.
    have_pool = ThreadPoolExecutor(max_workers=max(1, min(8, len(peers))),
                                   thread_name_prefix="peer-have")

    def live() -> list[_Peer]:
        return [p for p in peers if p.dropped is None]

    def drop(peer: _Peer, why: str) -> None:
        if peer.dropped is None:
            peer.dropped = why
            result.dropped[peer.url] = why
            say(f"dropped peer {peer.url} for this pull: {why}")

    def ask() -> None:
        """Ask every live peer whose have-map is due for a fresh one (a bitmap: cheap).

        A peer already known to hold every chunk (a seed) is not asked again: only what
        other pullers verified meanwhile can change, and that is the point of asking."""
        moment = time.monotonic()
        for peer in live():
            due = moment - peer.asked_at >= opts.refresh
            if peer.asking or not due or len(peer.have) == len(unique):
                continue
            peer.asking = True
            peer.asked_at = moment
            asking[have_pool.submit(peer.client.have, manifest_hash, len(unique))] = peer

    def absorb(fut: Future[list[bool] | None]) -> None:
        peer = asking.pop(fut)
        peer.asking = False
        try:
            flags = fut.result()
        except (PeerProtocolError, IntegrityError) as e:
            drop(peer, f"bad have-map: {e}")
            return
        except PeerError as e:
            peer.failures += 1
            if peer.failures >= opts.max_failures:
                drop(peer, str(e))
            return
        if peer.dropped is not None:
            return
        have = set() if flags is None else {
            c.digest for c, held in zip(unique, flags, strict=True) if held
        }
        if have != peer.have:
            peer.have = have
            order.stale = True

    def rank() -> None:
        # Rarest first: chunks few peers hold go out before they become a bottleneck, and a
        # seed's upload goes to chunks nobody else has yet. The sort is stable, so ties keep
        # this host's own random order.
        holders = live()
        pending.sort(key=lambda d: sum(d in p.have for p in holders))
        order.stale = False

    def cap(peer: _Peer, seed_share: int) -> int:
        return seed_share if len(peer.have) == len(unique) else opts.per_peer

    def choose(digest: str, open_peers: list[_Peer], seed_share: int) -> _Peer | None:
        """The least loaded peer holding the chunk, a partial holder before a complete one
        (another puller rather than the seed, whose upload is the site's scarce one)."""
        best: _Peer | None = None
        best_key: tuple[bool, int, int] | None = None
        for peer in open_peers:
            if digest in peer.have and peer.inflight < cap(peer, seed_share):
                key = (len(peer.have) == len(unique), peer.inflight, len(peer.have))
                if best_key is None or key < best_key:
                    best, best_key = peer, key
        return best

    def dispatch() -> None:
        if order.stale:
            rank()
        peers_now = live()
        # Peers still missing chunks are probably pulling too and share the seeds' upload:
        # ask a seed for only a fair share at once. Fewer requests in flight each finish
        # sooner, so other pullers see those chunks sooner and fewer ask the seed for the
        # same ones; alone with a seed, a host keeps ``per_peer`` requests in flight.
        partial = sum(len(p.have) < len(unique) for p in peers_now)
        seed_share = max(1, -(-opts.per_peer // (1 + partial)))
        waiting = set(pending)
        open_peers = [p for p in peers_now
                      if p.inflight < cap(p, seed_share) and not p.have.isdisjoint(waiting)]
        i = 0
        while open_peers and i < len(pending):
            digest = pending[i]
            peer = choose(digest, open_peers, seed_share)
            if peer is None:
                i += 1
                continue
            pending.pop(i)
            peer.inflight += 1
            if peer.inflight >= cap(peer, seed_share):
                open_peers.remove(peer)
            fut = executor.submit(_fetch, peer.client, digest, lengths[digest],
                                  list(need[digest]), gate)
            inflight[fut] = (digest, peer)

    def received(fut: Future[bytes | None]) -> bool:
        """Handle a finished fetch; True when its chunk landed."""
        digest, peer = inflight.pop(fut)
        peer.inflight -= 1
        try:
            data = fut.result()
        except (IntegrityError, PeerProtocolError) as e:
            if peer.dropped is None and isinstance(e, IntegrityError):
                # A site member sent bytes the manifest does not sign: on the record.
                trust_state.audit_refusal(store_dir, "pull", e, peer=peer.url,
                                          manifest=manifest_hash)
            drop(peer, f"{type(e).__name__}: {e}")
            pending.insert(0, digest)
            return False
        except PeerError as e:
            peer.failures += 1
            if peer.failures >= opts.max_failures:
                drop(peer, f"{opts.max_failures} failures, the last: {e}")
            else:
                peer.have.discard(digest)  # try it elsewhere first
            pending.insert(0, digest)
            return False
        if data is None:
            peer.have.discard(digest)
            pending.insert(0, digest)
            return False
        peer.failures = 0
        peer.bytes += len(data)
        result.by_peer[peer.url] = peer.bytes
        result.bytes_fetched += len(data)
        land(digest, data)
        return True

    try:
        ask()
        wait(list(asking))  # the first have-maps, before any chunk is asked for
        for first in list(asking):
            absorb(first)
        starved_since: float | None = None
        settled_at, unsettled = time.monotonic(), False
        while pending or inflight:
            dispatch()
            if not inflight:
                if not live():
                    raise PeerError(_stopped("every peer was dropped", result, need))
                moment = time.monotonic()
                starved_since = starved_since or moment
                if moment - starved_since > opts.wait_for_chunks:
                    raise PeerError(_stopped(
                        f"no live peer has held the {len(pending)} remaining chunk(s) for "
                        f"{opts.wait_for_chunks:.0f} s", result, need))
                settle()
                ask()
                if asking:
                    answered, _ = wait(list(asking), timeout=opts.refresh,
                                       return_when=FIRST_COMPLETED)
                    for answer in answered:
                        absorb(answer)
                else:
                    time.sleep(opts.refresh / 4)
                continue
            starved_since = None
            ask()
            watched: list[Future[Any]] = [*inflight, *asking]
            finished, _ = wait(watched, timeout=opts.refresh, return_when=FIRST_COMPLETED)
            for fut in finished:
                if fut in inflight:
                    unsettled |= received(fut)
                else:
                    absorb(fut)
            # Chunks are marked done every ``flush_bytes`` anyway; this bounds how long a
            # landed chunk stays invisible to the other pullers when chunks arrive slowly.
            moment = time.monotonic()
            if not finished or (unsettled and moment - settled_at >= opts.refresh / 2):
                settle()
                settled_at, unsettled = moment, False
    finally:
        gate.close()
        executor.shutdown(wait=False, cancel_futures=True)
        have_pool.shutdown(wait=False, cancel_futures=True)


class _WriteGate:
    """Fetch threads pwrite into the staged files; once the pull stops (done, failed or
    interrupted) ``close`` waits for writes in progress and refuses new ones, so nothing is
    written through a descriptor the pull is about to close (and the kernel may reuse)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._active = 0
        self._closed = False

    def enter(self) -> bool:
        with self._cv:
            if self._closed:
                return False
            self._active += 1
            return True

    def leave(self) -> None:
        with self._cv:
            self._active -= 1
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            while self._active:
                self._cv.wait()


def _fetch(client: PeerClient, digest: str, length: int,
           targets: list[tuple[StagedFile, int]], gate: _WriteGate) -> bytes | None:
    """On a fetch thread: the chunk, checked on arrival, then pwritten where it goes."""
    data = client.chunk(digest, length)
    if data is not None:
        if not gate.enter():
            raise PeerError("the pull stopped")
        try:
            for sf, idx in targets:
                sf.pwrite_chunk(idx, data)
        finally:
            gate.leave()
    return data


def _stopped(why: str, result: PullResult, need: dict[str, list[tuple[StagedFile, int]]]
             ) -> str:
    missing = sum(sf.chunk(idx).length for targets in need.values() for sf, idx in targets)
    dropped = "; ".join(f"{u}: {w}" for u, w in result.dropped.items())
    return (
        f"pull of {', '.join(result.models)} stopped: {why}. {missing} of {result.bytes_total} "
        f"bytes are still missing; what arrived is verified and kept, so running the same "
        f"pull again resumes"
        + (f" (dropped peers: {dropped})" if dropped else "")
    )
