"""In-flight announcements (issue 22): a puller tells which chunks are on their way to it, the
others leave those to come from it rather than from the seed, and an announcement that never
turns into a copy costs bounded time. In-memory peers behind the swarm's seams first (as in
tests/test_swarm.py), then the file between a pull and its host's server, the protocol, and
a real pull over sockets next to a lying announcer."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from bundle_helpers import CHUNK, make_bundle, model_bytes
from peer_helpers import FAST, client, published_bytes, seed, start_server
from test_swarm import MANIFEST, FakeSink, make_chunks
from trust_helpers import NOW, trusted_store

from appliance.errors import PeerProtocolError, UsageError
from appliance.peer import announce, protocol
from appliance.peer.announce import Announcer, read_fetching
from appliance.peer.pull import pull
from appliance.peer.swarm import Swarm

CHUNKS = make_chunks(40, seed=7)
ORDER = list(CHUNKS)
X = ORDER[5]


class Seed:
    """Holds every chunk, serves each after ``delay`` seconds, logs when each was asked."""

    def __init__(self, delay: float) -> None:
        self.url = "http://seed"
        self.delay = delay
        self.asked: dict[str, float] = {}
        self.lock = threading.Lock()

    def have(self, manifest_hash: str, count: int) -> list[bool] | None:
        return [True] * count

    def chunk(self, digest: str, length: int, *, patient: bool = False) -> bytes | None:
        with self.lock:
            assert digest not in self.asked, "the seed was asked for a chunk twice"
            self.asked[digest] = time.monotonic()
        time.sleep(self.delay)
        return CHUNKS[digest]


class Puller:
    """Another host's pull as its server shows it: announces ``coming`` as fetching, and
    holds them ``after`` seconds from its first have-map request (never, if None)."""

    def __init__(self, coming: set[str], after: float | None) -> None:
        self.url = "http://puller"
        self.coming = coming
        self.after = after
        self.first: float | None = None
        self.requests: list[str] = []

    def _held(self) -> set[str]:
        self.first = self.first or time.monotonic()
        arrived = self.after is not None and time.monotonic() - self.first >= self.after
        return self.coming if arrived else set()

    def have(self, manifest_hash: str, count: int) -> list[bool] | None:
        raise AssertionError("an announcing peer is asked for its availability")

    def availability(self, manifest_hash: str, count: int) -> protocol.Availability | None:
        held = self._held()
        return protocol.Availability([d in held for d in ORDER[:count]],
                                     [d in self.coming and d not in held for d in ORDER[:count]])

    def chunk(self, digest: str, length: int, *, patient: bool = False) -> bytes | None:
        self.requests.append(digest)
        return CHUNKS[digest] if digest in self._held() else None


def swarm(peers: list[Any], **kwargs: Any) -> Swarm:
    options: dict[str, Any] = {"per_peer": 1, "workers": 4, "refresh": 0.02,
                               "wait_for_chunks": 10.0}
    options.update(kwargs)
    return Swarm(peers, MANIFEST, ORDER, **options)


def run(s: Swarm) -> FakeSink:
    sink = FakeSink(CHUNKS)
    s.run({d: len(v) for d, v in CHUNKS.items()}, sink)
    assert sink.recorded == CHUNKS  # every chunk, each checked against its digest
    return sink


def test_a_chunk_another_puller_announces_comes_from_it_not_the_seed() -> None:
    # 39 chunks one at a time from the seed take >= 0.39 s; the other puller holds X at 0.8 s.
    # Rarest first puts X last; the seed is free for it from 0.39 s on, yet X waits.
    source, other = Seed(delay=0.01), Puller({X}, after=0.8)
    s = swarm([source, other])
    run(s)
    assert X not in source.asked and set(source.asked) == set(CHUNKS) - {X}
    assert other.requests == [X]
    assert s.stats.deferred == 1 and s.stats.duplicates == 0


def test_a_lying_announcement_costs_one_grace_and_the_chunk_still_arrives() -> None:
    grace = 0.3
    source, liar = Seed(delay=0.02), Puller({X}, after=None)  # announces X, never holds it
    notices: list[str] = []
    s = swarm([source, liar], announce_grace=grace, notify=notices.append)
    start = time.monotonic()
    run(s)
    took = time.monotonic() - start
    others = max(t for d, t in source.asked.items() if d != X)
    assert source.asked[X] > others  # left to the liar while the seed had other work
    assert source.asked[X] - others >= grace * 0.9 - source.delay  # then waited the grace
    assert took <= len(CHUNKS) * source.delay + grace + 2.0
    assert liar.requests == []  # it never held X, so it was never asked for it
    assert any("announced chunk" in n and "ignored" in n for n in notices)


def test_a_liar_announcing_every_chunk_costs_one_grace_not_one_per_chunk() -> None:
    grace = 0.3
    source, liar = Seed(delay=0.005), Puller(set(CHUNKS), after=None)
    s = swarm([source, liar], announce_grace=grace)
    start = time.monotonic()
    run(s)
    took = time.monotonic() - start
    assert grace * 0.9 <= took <= grace + len(CHUNKS) * source.delay + 2.0
    assert s.stats.deferred == len(CHUNKS) and set(source.asked) == set(CHUNKS)


def test_chunks_another_puller_holds_never_come_from_the_seed_even_when_it_is_busy() -> None:
    # The other puller holds every other chunk and serves 2 at a time: the rest of those wait
    # for it rather than go to the idle seed.
    source, other = Seed(delay=0.0), Puller(set(ORDER[::2]), after=0.0)
    run(swarm([source, other], per_peer=2))
    assert set(source.asked) == set(ORDER[1::2]) and set(other.requests) == set(ORDER[::2])


def test_the_swarm_announces_what_it_fetches_until_it_is_durable() -> None:
    calls: list[set[str]] = []
    source = Seed(delay=0.005)
    s = swarm([source], per_peer=3, announce=lambda digests: calls.append(set(digests)))
    sink = run(s)
    assert set().union(*calls) == set(CHUNKS)  # each chunk was announced while on its way
    assert max(len(c) for c in calls) >= 2  # several in flight at once were announced
    # A chunk leaves the announcement once it is durable (in the have-map instead).
    assert sink.settles > 0 and len(calls[-1]) < len(CHUNKS)


# --- the file between a pull and its host's server ------------------------------------------


def test_the_announcement_file_round_trip_and_what_counts_as_none(tmp_path: Path) -> None:
    unique = ORDER[:10]
    with Announcer(tmp_path, MANIFEST, unique) as a:
        a.update({unique[1], unique[8], "f" * 64})  # a digest not in the manifest is left out
        got = read_fetching(tmp_path, MANIFEST, 10)
        assert [i for i, on in enumerate(got) if on] == [1, 8]
        old = time.time() - announce.MAX_AGE - 1
        os.utime(a.path, (old, old))  # a pull that died without removing it
        assert read_fetching(tmp_path, MANIFEST, 10) == [False] * 10
        a.path.write_bytes(b"\xff" * 5)  # not the bitmap's size for 10 chunks
        assert read_fetching(tmp_path, MANIFEST, 10) == [False] * 10
    assert not a.path.exists()
    assert read_fetching(tmp_path, MANIFEST, 10) == [False] * 10
    os.mkfifo(a.path)  # nobody writes it: read without blocking, counted as none
    assert read_fetching(tmp_path, MANIFEST, 10) == [False] * 10
    with pytest.raises(UsageError):
        announce.fetching_path(tmp_path, "../x")


def test_hostile_announcements_are_refused() -> None:
    held, coming = [True, False, False], [False, True, False]
    body = protocol.have_response(MANIFEST, held, coming)
    assert protocol.parse_availability(body, MANIFEST, 3) == protocol.Availability(held, coming)
    # A server from before announcements: the have-map alone, nothing announced.
    old = protocol.have_response(MANIFEST, held)
    assert protocol.parse_availability(old, MANIFEST, 3).fetching == [False] * 3
    # Held wins when a chunk became durable after the pull last announced it.
    both = protocol.have_response(MANIFEST, held, [True, True, False])
    assert protocol.parse_availability(both, MANIFEST, 3).fetching == coming
    with pytest.raises(PeerProtocolError, match="unknown"):
        protocol.parse_have(body, MANIFEST, 3)  # not asked for, so not accepted
    value = protocol.parse_json(body, "test")
    for bad in ({"fetching": value["bitmap"]},  # fetching what it holds
                {"fetching": "AAAA"},  # the wrong length
                {"fetching": 7}):
        lying = protocol.encode_json({**value, **bad, "protocol": 1})
        with pytest.raises(PeerProtocolError):
            protocol.parse_availability(lying, MANIFEST, 3)


# --- over sockets -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle() -> Any:
    return make_bundle({"tiny": {"model.gguf": model_bytes(3, 16 * CHUNK + 77)}})


def test_the_server_answers_with_the_pull_s_announcement(tmp_path: Path, bundle: Any) -> None:
    store = trusted_store(tmp_path / "p")
    seed(store, bundle, partial_chunks=5)
    unique = [c.digest for c in bundle.manifest.unique_chunks()]
    server = start_server(store)
    try:
        with client(server.url) as c, Announcer(store, bundle.hash, unique) as a:
            a.update({unique[0], unique[6], unique[7]})  # unique[0] is already held
            got = c.availability(bundle.hash, len(unique))
            assert got is not None and sum(got.held) == 5
            assert [i for i, on in enumerate(got.fetching) if on] == [6, 7]
            assert c.have(bundle.hash, len(unique)) == got.held  # the plain have-map stays
            assert c.availability("0" * 64, 3) is None
    finally:
        server.stop()


def test_a_pull_next_to_a_lying_announcer_finishes_verified(tmp_path: Path, bundle: Any
                                                            ) -> None:
    """A site member whose server announces half the chunks and never gets them: the pull
    waits at most ``announce_grace`` for them, takes them from the seed, publishes the model."""
    seed_store = trusted_store(tmp_path / "seed")
    seed(seed_store, bundle)
    liar_store = trusted_store(tmp_path / "liar")
    seed(liar_store, bundle, partial_chunks=0)  # the manifest, no chunk
    unique = [c.digest for c in bundle.manifest.unique_chunks()]
    size = bundle.manifest.models[0].size
    # A slow seed: the half nobody announces keeps it busy past the grace.
    servers = [start_server(seed_store, rate_limit=size), start_server(liar_store)]
    stop = threading.Event()
    liar = Announcer(liar_store, bundle.hash, unique, keepalive=0.05)

    def keep_lying() -> None:
        while not stop.is_set():
            liar.update(unique[::2])
            time.sleep(0.02)

    liar_thread = threading.Thread(target=keep_lying)
    liar_thread.start()
    here = trusted_store(tmp_path / "here")
    notices: list[str] = []
    try:
        with client(servers[0].url) as a, client(servers[1].url) as b:
            start = time.monotonic()
            [result] = pull(here, [a, b], ["tiny"], now=NOW, notify=notices.append,
                            options=replace(FAST, announce_grace=0.5, wait_for_chunks=10))
            took = time.monotonic() - start
    finally:
        stop.set()
        liar_thread.join()
        liar.close()
        for server in servers:
            server.stop()
    assert published_bytes(here, "tiny", "model.gguf") == bundle.contents["tiny"]["model.gguf"]
    assert result.by_peer == {servers[0].url: size} and not result.dropped
    assert any(servers[1].url in n and "ignored" in n for n in notices)  # it was heard, once
    assert took < 1.0 + 0.5 + 5.0  # the seed's second, the grace, a loaded machine's slack
