"""The swarm scheduler of a pull: which chunk to ask which peer for, and what to do when a
peer lies, stalls or dies.

``swarm`` runs on the pull's thread and keeps every SQLite write there; fetch threads
(``PullOptions.workers``) only talk HTTP, check each chunk on arrival and pwrite it into the
staged files (``StagedFile.pwrite_chunk``), and the pull's thread then records it. Pending
chunks go out rarest first (by have-maps), at most ``per_peer`` per peer; a peer sending wrong
bytes or breaking the protocol is dropped at once (wrong bytes are also audited), one that
fails ``max_failures`` times in a row is dropped too, and its chunk goes back to the queue.
While chunks are missing, have-maps are refreshed so what other pullers verified meanwhile is
used; while waiting, written chunks are flushed so this host's own peers can see them.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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

    @property
    def url(self) -> str:
        return self.client.url


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
    random.shuffle(pending)
    inflight: dict[Future[bytes | None], tuple[str, _Peer]] = {}
    gate = _WriteGate()
    executor = ThreadPoolExecutor(max_workers=max(1, opts.workers),
                                  thread_name_prefix="peer-pull")

    def drop(peer: _Peer, why: str) -> None:
        if peer.dropped is None:
            peer.dropped = why
            result.dropped[peer.url] = why
            say(f"dropped peer {peer.url} for this pull: {why}")

    def refresh() -> None:
        live = [p for p in peers if p.dropped is None]
        futures = {executor.submit(p.client.have, manifest_hash, len(unique)): p for p in live}
        for fut, peer in futures.items():
            try:
                flags = fut.result()
            except (PeerProtocolError, IntegrityError) as e:
                drop(peer, f"bad have-map: {e}")
                continue
            except PeerError as e:
                peer.failures += 1
                if peer.failures >= opts.max_failures:
                    drop(peer, str(e))
                continue
            peer.have = set() if flags is None else {
                c.digest for c, held in zip(unique, flags, strict=True) if held
            }
        # Rarest first: chunks few peers hold go out before they become a bottleneck.
        holders = {d: sum(d in p.have for p in peers if p.dropped is None) for d in pending}
        pending.sort(key=lambda d: holders[d])

    def dispatch() -> None:
        busy = {d for d, _ in inflight.values()}
        for peer in sorted((p for p in peers if p.dropped is None), key=lambda p: p.inflight):
            i = 0
            while peer.inflight < opts.per_peer and i < len(pending):
                digest = pending[i]
                if digest in peer.have and digest not in busy:
                    pending.pop(i)
                    busy.add(digest)
                    peer.inflight += 1
                    fut = executor.submit(_fetch, peer.client, digest, lengths[digest],
                                          list(need[digest]), gate)
                    inflight[fut] = (digest, peer)
                else:
                    i += 1

    try:
        refresh()
        last_refresh = time.monotonic()
        starved_since: float | None = None
        while pending or inflight:
            dispatch()
            if not inflight:
                live = [p for p in peers if p.dropped is None]
                if not live:
                    raise PeerError(_stopped("every peer was dropped", result, need))
                moment = time.monotonic()
                starved_since = starved_since or moment
                if moment - starved_since > opts.wait_for_chunks:
                    raise PeerError(_stopped(
                        f"no live peer has held the {len(pending)} remaining chunk(s) for "
                        f"{opts.wait_for_chunks:.0f} s", result, need))
                settle()
                time.sleep(opts.refresh)
                refresh()
                last_refresh = time.monotonic()
                continue
            starved_since = None
            finished, _ = wait(list(inflight), timeout=opts.refresh, return_when=FIRST_COMPLETED)
            if not finished:
                settle()
            for fut in finished:
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
                    continue
                except PeerError as e:
                    peer.failures += 1
                    if peer.failures >= opts.max_failures:
                        drop(peer, f"{opts.max_failures} failures, the last: {e}")
                    else:
                        peer.have.discard(digest)  # try it elsewhere first
                    pending.insert(0, digest)
                    continue
                if data is None:
                    peer.have.discard(digest)
                    pending.insert(0, digest)
                    continue
                peer.failures = 0
                peer.bytes += len(data)
                result.by_peer[peer.url] = peer.bytes
                result.bytes_fetched += len(data)
                land(digest, data)
            stale = time.monotonic() - last_refresh > opts.refresh
            if stale and any(
                not any(d in p.have for p in peers if p.dropped is None) for d in pending
            ):
                refresh()
                last_refresh = time.monotonic()
    finally:
        gate.close()
        executor.shutdown(wait=False, cancel_futures=True)


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
