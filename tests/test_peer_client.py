"""The peer client's per-chunk costs, against real sockets on 127.0.0.1.

Each chunk is hashed once on its way into the store (by the client; the sink is told and checks
only the length), while a peer that does not say it checks is still hashed by the sink.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from bundle_helpers import CHUNK, Bundle, make_bundle, model_bytes
from peer_helpers import FAST, INSECURE, QUICK, client, seed, start_server
from trust_helpers import NOW, trusted_store

from appliance import chunks
from appliance.errors import PeerError
from appliance.peer import client as client_module
from appliance.peer.client import PeerClient
from appliance.peer.pull import pull
from appliance.peer.server import PeerServer
from appliance.store import audit, ingest
from appliance.store.db import connect
from appliance.store.records import list_models


@pytest.fixture(scope="module")
def model() -> Bundle:
    return make_bundle({"tiny": {"model.gguf": model_bytes(3, 6 * CHUNK + 77)}})


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[..., PeerServer]]:
    with ExitStack() as stack:
        def start(store: Path, **kwargs: Any) -> PeerServer:
            started = start_server(store, **kwargs)
            stack.callback(started.stop)
            return started
        yield start


def seeded(tmp_path: Path, bundle: Bundle) -> Path:
    store = trusted_store(tmp_path / "seed")
    seed(store, bundle)
    return store


def test_the_real_clients_bytes_are_hashed_once(tmp_path: Path, model: Bundle, server,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"client": 0, "sink": 0}

    def counting(where: str) -> Callable[..., None]:
        def check(*args: Any, **kwargs: Any) -> None:
            calls[where] += 1
            chunks.check_chunk(*args, **kwargs)
        return check

    monkeypatch.setattr(client_module, "check_chunk", counting("client"))
    monkeypatch.setattr(ingest, "check_chunk", counting("sink"))
    seed_server = server(seeded(tmp_path, model))
    b = trusted_store(tmp_path / "b")
    with client(seed_server.url) as c:
        [result] = pull(b, [c], ["tiny"], options=FAST, now=NOW)
    unique = len({ch.digest for ch in model.manifest.models[0].files[0].chunks})
    assert result.bytes_fetched == model.size
    assert calls == {"client": unique, "sink": 0}


class UncheckedForger(PeerClient):
    """A peer client that flips a byte of what it got and does not say it checks (as any
    PeerLike other than the real client): the sink must hash and refuse it."""

    checks_chunks = False

    def chunk(self, digest: str, length: int) -> bytes | None:
        data = super().chunk(digest, length)
        if data is None:
            return None
        forged = bytearray(data)
        forged[len(forged) // 2] ^= 0xFF
        return bytes(forged)


def test_a_peer_not_claiming_to_check_is_checked_by_the_sink(tmp_path: Path, model: Bundle,
                                                             server) -> None:
    seed_server = server(seeded(tmp_path, model))
    b = trusted_store(tmp_path / "b")
    with UncheckedForger(seed_server.url, INSECURE, timeouts=QUICK) as forger, \
            pytest.raises(PeerError, match="every peer was dropped") as raised:
        pull(b, [forger], ["tiny"], options=FAST, now=NOW)
    assert "IntegrityError" in str(raised.value)
    assert list_models(b) == []
    [refusal] = [r for r in audit.records(b) if r.kind == "refusal"]
    assert refusal.details["peer"] == seed_server.url
    db = connect(b)
    try:  # every chunk it sent was forged: none is marked done
        assert db.execute("SELECT count(*) FROM chunks WHERE done = 1").fetchone()[0] == 0
    finally:
        db.close()
