"""The swarm scheduler alone: in-memory peers (honest, lying, refusing, stalling, growing)
behind the ``PeerLike`` seam and an in-memory sink; no sockets, no store. The real-HTTP layer
is tests/test_peer_pull.py."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import blake3
import pytest

from appliance.chunks import check_chunk
from appliance.errors import ApplianceError, PeerError
from appliance.peer.swarm import Swarm

MANIFEST = "ab" * 32
REFRESH = 0.02
WAIT = 0.5


def make_chunks(n: int, seed: int = 1) -> dict[str, bytes]:
    rng = random.Random(seed)
    chunks = {}
    for _ in range(n):
        data = rng.randbytes(rng.randint(100, 3000))
        chunks[blake3.blake3(data).hexdigest()] = data
    return chunks


class FakePeer:
    """A peer in memory. ``advertise``: digests its have-map lists (default: all it holds);
    ``refuse``: digests it answers 404 for; ``mode``: honest, liar (flips a byte), stall
    (each chunk request ends as a client timeout would)."""

    def __init__(self, url: str, chunks: dict[str, bytes], *, mode: str = "honest",
                 advertise: set[str] | None = None, refuse: set[str] = frozenset()) -> None:
        self.url = url
        self.chunks = chunks
        self.mode = mode
        self.advertised = set(chunks) if advertise is None else set(advertise)
        self.refuse = set(refuse)
        self.requests: list[str] = []
        self.patient: list[str] = []  # asked for with patient=True
        self.have_requests = 0
        self.lock = threading.Lock()

    def have(self, manifest_hash: str, count: int) -> list[bool] | None:
        assert manifest_hash == MANIFEST
        with self.lock:
            self.have_requests += 1
            return [d in self.advertised for d in ORDER[:count]]

    def chunk(self, digest: str, length: int, *, patient: bool = False) -> bytes | None:
        with self.lock:
            self.requests.append(digest)
            if patient:
                self.patient.append(digest)
        if self.mode == "stall":
            time.sleep(0.01)
            raise PeerError(f"{self.url} timed out (chunk {digest[:16]}): ReadTimeout")
        if digest in self.refuse or digest not in self.chunks:
            return None
        data = self.chunks[digest]
        if self.mode == "liar":
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            return bytes(flipped)
        return data


class FakeSink:
    """The session's side, in memory: checks as the real one does, remembers threads."""

    def __init__(self, needed: dict[str, bytes],
                 on_record: Callable[[str], None] | None = None) -> None:
        self.needed = dict(needed)
        self.written: dict[str, bytes] = {}
        self.recorded: dict[str, bytes] = {}
        self.write_threads: set[int] = set()
        self.record_threads: set[int] = set()
        self.refusals: list[tuple[ApplianceError, dict[str, Any]]] = []
        self.settles = 0
        self.trusted: set[str] = set()  # written with checked=True: the sink did not hash them
        self.on_record = on_record
        self.lock = threading.Lock()

    def write(self, digest: str, data: bytes, *, checked: bool = False) -> bool:
        with self.lock:
            self.write_threads.add(threading.get_ident())
            if digest in self.recorded:
                return False
            if checked:
                self.trusted.add(digest)
        if not checked or len(data) != len(self.needed[digest]):
            check_chunk(data, digest, len(self.needed[digest]))
        with self.lock:
            self.written[digest] = data
        return True

    def record(self, digest: str, data: bytes) -> None:
        self.record_threads.add(threading.get_ident())
        assert self.written[digest] == data
        self.recorded[digest] = data
        if self.on_record is not None:
            self.on_record(digest)

    def deliver(self, digest: str, data: bytes) -> None:
        if self.write(digest, data):
            self.record(digest, data)

    def settle(self) -> None:
        self.settles += 1

    def refused(self, error: ApplianceError, **details: Any) -> None:
        self.refusals.append((error, details))


CHUNKS = make_chunks(40)
ORDER = list(CHUNKS)


def swarm(peers: list[FakePeer], **kwargs: Any) -> Swarm:
    options: dict[str, Any] = {"per_peer": 2, "workers": 4, "max_failures": 2,
                               "refresh": REFRESH, "wait_for_chunks": WAIT, "label": "tiny:1"}
    options.update(kwargs)
    return Swarm(peers, MANIFEST, ORDER, **options)


def run(s: Swarm, sink: FakeSink) -> None:
    s.run({d: len(v) for d, v in sink.needed.items()}, sink)


def test_honest_peers_share_the_work_and_every_chunk_lands_once() -> None:
    a, b = FakePeer("http://a", CHUNKS), FakePeer("http://b", CHUNKS)
    sink = FakeSink(CHUNKS)
    s = swarm([a, b])
    run(s, sink)
    assert sink.recorded == CHUNKS
    assert s.stats.bytes == sum(map(len, CHUNKS.values())) == sum(s.stats.by_peer.values())
    assert s.stats.requests == len(CHUNKS) == len(a.requests) + len(b.requests)
    assert a.requests and b.requests  # both were used
    assert not s.stats.dropped and s.stats.failures == 0 and s.stats.duplicates == 0
    # Index work on the thread that called run; the bytes were checked on fetch threads.
    assert sink.record_threads == {threading.get_ident()}
    assert threading.get_ident() not in sink.write_threads


def test_a_liar_is_dropped_audited_and_its_chunks_come_from_another() -> None:
    liar, honest = FakePeer("http://liar", CHUNKS, mode="liar"), FakePeer("http://ok", CHUNKS)
    sink = FakeSink(CHUNKS)
    s = swarm([liar, honest])
    run(s, sink)
    assert sink.recorded == CHUNKS
    assert "IntegrityError" in s.stats.dropped["http://liar"]
    assert "http://liar" not in s.stats.by_peer
    [(error, details)] = sink.refusals
    assert details == {"peer": "http://liar"} and error.chunk in CHUNKS  # type: ignore[attr-defined]


def test_only_liars_end_the_pull_and_nothing_bad_is_recorded() -> None:
    sink = FakeSink(CHUNKS)
    with pytest.raises(PeerError, match="every peer was dropped"):
        run(swarm([FakePeer("http://liar", CHUNKS, mode="liar")]), sink)
    assert sink.recorded == {}


def test_a_peer_refusing_what_it_advertises_ends_the_pull_naming_the_chunks() -> None:
    """Issue 14 item 3: a have-map that lists a chunk the peer then 404s cannot keep the
    pull alive: failures, back-off, then a PeerError within the starvation timeout."""
    refused = ORDER[7]
    liar = FakePeer("http://liar", CHUNKS, refuse={refused})
    sink = FakeSink(CHUNKS)
    s = swarm([liar], max_failures=3)
    start = time.monotonic()
    with pytest.raises(PeerError) as info:
        run(s, sink)
    assert time.monotonic() - start < WAIT + 2
    message = str(info.value)
    assert refused[:16] in message and "1 chunk(s)" in message and "resumes" in message
    assert set(sink.recorded) == set(CHUNKS) - {refused}  # the rest was kept
    assert s.stats.refusals == 1 == liar.requests.count(refused)  # not asked again
    assert "http://liar" not in s.stats.dropped  # it delivered everything else


def test_a_peer_that_only_refuses_is_dropped_after_max_failures() -> None:
    liar = FakePeer("http://liar", CHUNKS, refuse=set(CHUNKS))
    sink = FakeSink(CHUNKS)
    s = swarm([liar], max_failures=2)
    with pytest.raises(PeerError, match="every peer was dropped") as info:
        run(s, sink)
    assert "404" in s.stats.dropped["http://liar"]
    assert f"{len(CHUNKS)} chunk(s)" in str(info.value) and "and 37 more" in str(info.value)
    assert len(liar.requests) <= 2 * 2  # max_failures, per_peer in flight at most


def test_a_staller_is_dropped_and_the_honest_peer_delivers() -> None:
    staller, honest = FakePeer("http://stall", CHUNKS, mode="stall"), FakePeer("http://ok", CHUNKS)
    sink = FakeSink(CHUNKS)
    s = swarm([staller, honest])
    run(s, sink)
    assert sink.recorded == CHUNKS
    assert "timed out" in s.stats.dropped["http://stall"]
    assert s.stats.by_peer == {"http://ok": s.stats.bytes}


def test_nobody_holds_the_rest_the_pull_starves_then_says_what_is_missing() -> None:
    half = set(ORDER[:20])
    partial = FakePeer("http://half", {d: CHUNKS[d] for d in half})
    sink = FakeSink(CHUNKS)
    start = time.monotonic()
    with pytest.raises(PeerError, match=r"no live peer has delivered the 20 remaining"):
        run(swarm([partial]), sink)
    assert WAIT <= time.monotonic() - start < WAIT + 2
    assert set(sink.recorded) == half and sink.settles > 0  # made durable while waiting


def test_a_peer_whose_have_map_grows_mid_pull_gets_used() -> None:
    first = ORDER[0]
    seed = FakePeer("http://seed", CHUNKS, advertise={first})
    late = FakePeer("http://late", CHUNKS, advertise=set())

    def grow(digest: str) -> None:
        late.advertised = set(CHUNKS)  # another host finished meanwhile

    sink = FakeSink(CHUNKS, on_record=grow)
    s = swarm([seed, late])
    run(s, sink)
    assert sink.recorded == CHUNKS
    assert seed.requests == [first]
    assert s.stats.by_peer["http://late"] == sum(map(len, CHUNKS.values())) - len(CHUNKS[first])
    assert late.have_requests >= 2 and s.stats.have_requests >= 3


def test_a_chunk_no_longer_needed_is_counted_as_a_duplicate() -> None:
    peer = FakePeer("http://a", CHUNKS)
    sink = FakeSink(CHUNKS)
    already = ORDER[3]
    sink.written[already] = sink.recorded[already] = CHUNKS[already]  # landed another way
    s = swarm([peer])
    run(s, sink)
    assert s.stats.duplicates == 1
    assert sink.recorded == CHUNKS


class CheckingPeer(FakePeer):
    """Says it runs check_chunk on what it returns, as the real client does."""

    checks_chunks = True


def test_only_a_peer_that_says_it_checks_is_trusted_by_the_sink_and_a_liar_still_is_not(
) -> None:
    honest, liar = CheckingPeer("http://checks", CHUNKS), FakePeer("http://liar", CHUNKS,
                                                                   mode="liar")
    sink = FakeSink(CHUNKS)
    s = swarm([honest, liar])
    run(s, sink)
    assert sink.recorded == CHUNKS
    assert "IntegrityError" in s.stats.dropped["http://liar"]  # hashed by the sink: caught
    assert sink.trusted == set(honest.requests)  # the sink skipped the hash for these only


def test_the_only_holder_of_a_chunk_is_asked_patiently() -> None:
    shared, alone = set(ORDER[:20]), set(ORDER[20:])
    both = FakePeer("http://both", CHUNKS)
    half = FakePeer("http://half", {d: CHUNKS[d] for d in shared})
    sink = FakeSink(CHUNKS)
    run(swarm([both, half]), sink)
    assert sink.recorded == CHUNKS
    # Chunks only one peer holds go out patient; those two hold, not.
    assert alone <= set(both.patient)
    assert not (set(both.patient) | set(half.patient)) & shared
