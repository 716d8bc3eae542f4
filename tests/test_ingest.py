"""The ingest session with in-memory sources: what any source (OCI, torrent, ...) gets from it.

Real store, real SQLite, real signed manifest; only the source is a few lines of test code.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from store_helpers import model_entry
from trust_helpers import DAY, NOW, make_root, sign_manifest, trusted_store

from appliance.authenticate import AuthenticatedBundle, authenticate_manifest
from appliance.errors import IntegrityError
from appliance.format.manifest import (
    FORMAT_VERSION,
    Manifest,
    Provenance,
    SourceRecord,
    manifest_bytes,
)
from appliance.format.trust import verify_self_signed
from appliance.store import audit, layout
from appliance.store.ingest import ChunkSink, IngestOutcome, IngestSession, ReadAhead
from appliance.store.records import list_models
from appliance.store.scrub import verify_store
from appliance.store.store import Store

CHUNK = 4096
DATA = random.Random(5).randbytes(40 * CHUNK + 17)


def signed_bundle() -> AuthenticatedBundle:
    entry = model_entry("tiny", "1", {"model.gguf": DATA}, chunk_size=CHUNK)
    source = SourceRecord("model.gguf", "test:tiny", hashlib.sha256(DATA).hexdigest())
    entry = replace(entry, provenance=Provenance(builder="tests", sources=(source,)))
    manifest = Manifest(FORMAT_VERSION, "main", 1, NOW - DAY, NOW + 30 * DAY, (entry,))
    body = manifest_bytes(manifest)
    root = verify_self_signed(make_root(), NOW)
    return authenticate_manifest(body, sign_manifest(body, "p1"), (), root, NOW)


def pieces() -> dict[str, bytes]:
    chunks = signed_bundle().manifest.models[0].files[0].chunks
    return {c.digest: DATA[c.offset:c.offset + c.length] for c in chunks}


class Reader:
    """A ``ChunkReader`` that holds some chunks and may lie about one."""

    runs_check_chunk = False  # the session checks what it gives

    def __init__(self, chunks: dict[str, bytes], *, lie_about: str | None = None) -> None:
        self.chunks = chunks
        self.lie_about = lie_about
        self.reads = 0

    def plan(self, needed: Mapping[str, int]) -> list[str]:
        return [d for d in needed if d in self.chunks]

    def read(self, digest: str, length: int) -> bytes | None:
        self.reads += 1
        data = self.chunks[digest]
        if digest == self.lie_about:
            return data[:-1] + bytes([data[-1] ^ 1])
        return data


class Pusher:
    """A ``ChunkSource`` that pushes chunks itself on the session's thread (``deliver``), as
    a BitTorrent alert loop does."""

    def __init__(self, chunks: dict[str, bytes]) -> None:
        self.chunks = chunks

    def run(self, needed: Mapping[str, int], sink: ChunkSink) -> None:
        for digest in needed:
            if digest in self.chunks:
                sink.deliver(digest, self.chunks[digest])


def ingest(store_dir: Path, source: Any) -> IngestOutcome:
    with layout.writer_lock(store_dir, "test"), Store(store_dir) as store:
        session = IngestSession(store, action="import", now=NOW, context={"media": ["test"]})
        return session.run(signed_bundle(), lambda _b: source, purpose=lambda _b: "testing",
                           summary=lambda o: {"published": o.published})


def test_a_source_s_wrong_bytes_are_refused_by_the_session_and_audited_once(
        tmp_path: Path) -> None:
    store = trusted_store(tmp_path / "store")
    chunks = pieces()
    bad = list(chunks)[7]
    with pytest.raises(IntegrityError) as info:
        ingest(store, ReadAhead(Reader(chunks, lie_about=bad)))
    assert info.value.chunk == bad and info.value.file == "tiny:1/model.gguf"
    assert list_models(store, include_importing=True)[0].verified is False
    refusals = [r for r in audit.records(store) if r.kind == "refusal"]
    assert len(refusals) == 1 and refusals[0].details["media"] == ["test"]
    assert verify_store(store).ok
    # What was good is kept: the honest run fetches only the rest.
    outcome = ingest(store, ReadAhead(Reader(chunks)))
    assert outcome.complete and 0 < outcome.source_bytes < len(DATA)


def test_a_partial_source_leaves_the_rest_pending_and_a_pushing_source_finishes(
        tmp_path: Path) -> None:
    store = trusted_store(tmp_path / "store")
    chunks = pieces()
    half = dict(list(chunks.items())[:20])
    first = ingest(store, ReadAhead(Reader(half)))
    assert not first.complete and first.pending == ["tiny:1"]
    assert first.missing == set(chunks) - set(half)
    assert list_models(store) == []
    second = ingest(store, Pusher(chunks))
    assert second.complete and second.published == ["tiny:1"]
    assert second.already_done_bytes == first.source_bytes
    assert second.source_bytes == len(DATA) - first.source_bytes
    assert [r.kind for r in audit.records(store)][-2:] == ["import", "import"]
    assert verify_store(store).ok
