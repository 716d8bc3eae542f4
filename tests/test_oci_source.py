"""LayerSource and ranged reads behind seams: which bytes are asked for, and what a lying or
Range-ignoring far side gets. The real registry end to end is in test_oci_registry.py."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator

import httpx
import pytest
from store_helpers import model_entry

from appliance.chunks import check_chunk
from appliance.errors import ApplianceError, IntegrityError
from appliance.format.manifest import ModelEntry
from appliance.oci import mapping
from appliance.oci.mapping import Descriptor
from appliance.oci.registry import Registry, parse_reference
from appliance.oci.source import LayerSource

CHUNK = 16 * 1024
DATA = {"a.bin": random.Random(1).randbytes(8 * CHUNK),
        "b.bin": b"\x07" * (3 * CHUNK) + b"tail!"}


class Blobs:
    """An in-memory Target that serves ``DATA`` as layers and notes every range asked for."""

    name = "memory"

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.ranges: list[tuple[str, int, int]] = []

    @contextlib.contextmanager
    def read_range(self, digest: str, start: int, end: int) -> Iterator[Iterator[bytes]]:
        self.ranges.append((digest, start, end))
        data = self.blobs[digest][start:end]
        yield iter([data[i:i + 5000] for i in range(0, len(data), 5000)])

    def has_blob(self, digest: str) -> bool:
        return digest in self.blobs

    def put_blob(self, digest: str, size: int, body: Callable[[], Iterable[bytes]]) -> None:
        raise AssertionError

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> bool:
        raise AssertionError

    def get_manifest(self, reference: str) -> tuple[bytes, str] | None:
        return None

    def get_blob(self, digest: str, cap: int) -> bytes:
        return self.blobs[digest]

    def referrers(self, digest: str, artifact_type: str) -> list[Descriptor] | None:
        return None

    def close(self) -> None:
        pass


class Sink:
    """The session sink's contract: check on write (any thread), count on record."""

    def __init__(self, model: ModelEntry) -> None:
        self.refs = {c.digest: (c.length, f.path) for f in model.files for c in f.chunks}
        self.recorded: dict[str, bytes] = {}

    def write(self, digest: str, data: bytes) -> bool:
        length, path = self.refs[digest]
        check_chunk(data, digest, length, file=path)
        return True

    def record(self, digest: str, data: bytes) -> None:
        self.recorded[digest] = data

    def deliver(self, digest: str, data: bytes) -> None:
        self.write(digest, data)
        self.record(digest, data)

    def settle(self) -> None:
        pass

    def refused(self, error: ApplianceError, **details: object) -> None:
        pass


def _setup() -> tuple[ModelEntry, Blobs, dict[str, Descriptor]]:
    model = model_entry("acme/m", "1", DATA, CHUNK)
    layers = {p: Descriptor(mapping.WEIGHT_RAW, mapping.sha256_digest(d), len(d))
              for p, d in DATA.items()}
    return model, Blobs({layers[p].digest: d for p, d in DATA.items()}), layers


def test_only_the_chunks_still_needed_are_asked_for_in_contiguous_spans() -> None:
    model, target, layers = _setup()
    a = model.files[0]
    done = {a.chunks[2].digest, a.chunks[3].digest}  # durable from a run cut short
    needed = {c.digest: c.length for f in model.files for c in f.chunks if c.digest not in done}
    sink = Sink(model)
    LayerSource(target, model, layers, workers=2, span_bytes=4 * CHUNK).run(needed, sink)
    assert set(sink.recorded) == set(needed)
    a_layer = layers["a.bin"].digest
    a_ranges = sorted((s, e) for d, s, e in target.ranges if d == a_layer)
    assert a_ranges == [(0, 2 * CHUNK), (4 * CHUNK, 8 * CHUNK)]
    # b.bin repeats one chunk: it is fetched once, at its first place
    b_ranges = [(s, e) for d, s, e in target.ranges if d == layers["b.bin"].digest]
    assert b_ranges == [(0, CHUNK), (3 * CHUNK, 3 * CHUNK + 5)]


def test_a_far_side_serving_other_bytes_is_refused_naming_the_chunk() -> None:
    model, _, layers = _setup()
    lying = {layers[p].digest: d for p, d in DATA.items()}
    bad = bytearray(lying[layers["a.bin"].digest])
    bad[CHUNK * 5 + 7] ^= 1
    lying[layers["a.bin"].digest] = bytes(bad)
    needed = {c.digest: c.length for f in model.files for c in f.chunks}
    with pytest.raises(IntegrityError) as refused:
        LayerSource(Blobs(lying), model, layers).run(needed, Sink(model))
    assert refused.value.chunk == model.files[0].chunks[5].digest
    assert refused.value.file == "a.bin"


def test_a_short_body_is_refused_naming_the_chunk() -> None:
    model, _, layers = _setup()
    short = {layers[p].digest: d for p, d in DATA.items()}
    short[layers["b.bin"].digest] = DATA["b.bin"][:CHUNK + 100]
    needed = {c.digest: c.length for c in model.files[1].chunks}
    with pytest.raises(IntegrityError) as refused:
        LayerSource(Blobs(short), model, layers).run(needed, Sink(model))
    assert refused.value.file == "b.bin"


def test_a_registry_that_ignores_range_is_read_forward() -> None:
    blob = bytes(range(256)) * 64
    digest = mapping.sha256_digest(blob)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["range"] == "bytes=1000-2999"
        return httpx.Response(200, stream=httpx.ByteStream(blob))  # a cache that drops Range

    with Registry(parse_reference("registry.site/a/b:c"),
                  transport=httpx.MockTransport(handler)) as registry, \
            registry.read_range(digest, 1000, 3000) as pieces:
        assert b"".join(pieces) == blob[1000:3000]
