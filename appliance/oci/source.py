"""The ingest session's chunk source over a ModelPack artifact's layer blobs.

Each layer is one model file's plain bytes, so a chunk of the signed manifest is the byte
range ``[offset, offset + length)`` of its file's layer. ``LayerSource.run(needed, sink)``
groups the chunks still needed (first place each digest appears) into contiguous spans of
at most ``span_bytes``, fetches each span with one range read (an HTTP ``Range`` request on
a registry), cuts the stream at the signed chunk boundaries and hands every chunk to the
session's sink: ``write`` on the fetching thread (the sink checks length and BLAKE3 against
the signed manifest, then pwrites), ``record`` on the session's thread. Chunks already durable
(a run cut short by a kill) are not in ``needed``, so they are never fetched again.

Bytes that do not match are the sink's ``IntegrityError`` naming the chunk and file; a short
body is caught the same way (the last chunk is handed over short). Nothing here decides
trust or writes a file.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from appliance.format.manifest import ChunkRef, ModelEntry
from appliance.oci.mapping import Descriptor
from appliance.oci.targets import Target
from appliance.store.ingest import ChunkSink

WORKERS = 4
SPAN_BYTES = 32 << 20
# Chunks cut but not yet recorded by the session's thread (bounds memory).
QUEUE_CHUNKS = 8
_Item = tuple[str | None, bytes | BaseException | None]


@dataclass(frozen=True)
class Span:
    layer: str  # blob digest
    label: str  # model:version/path, for errors
    chunks: tuple[ChunkRef, ...]  # contiguous in the file

    @property
    def start(self) -> int:
        return self.chunks[0].offset

    @property
    def end(self) -> int:
        return self.chunks[-1].offset + self.chunks[-1].length


class LayerSource:
    """``ChunkSource`` over ``layers`` (file path -> layer) of ``target`` for ``model``."""

    def __init__(self, target: Target, model: ModelEntry, layers: Mapping[str, Descriptor],
                 *, workers: int = WORKERS, span_bytes: int = SPAN_BYTES) -> None:
        self.target = target
        self.model = model
        self.layers = layers
        self.workers = max(1, workers)
        self.span_bytes = max(1, span_bytes)

    def plan(self, needed: Mapping[str, int]) -> list[Span]:
        spans: list[Span] = []
        taken: set[str] = set()
        for file in self.model.files:
            label = f"{self.model.name}:{self.model.version}/{file.path}"
            layer = self.layers[file.path].digest
            run: list[ChunkRef] = []
            for chunk in file.chunks:
                wanted = chunk.digest in needed and chunk.digest not in taken
                if wanted:
                    taken.add(chunk.digest)
                    fits = run and run[-1].offset + run[-1].length == chunk.offset and \
                        chunk.offset + chunk.length - run[0].offset <= self.span_bytes
                    if run and not fits:
                        spans.append(Span(layer, label, tuple(run)))
                        run = []
                    run.append(chunk)
                elif run:
                    spans.append(Span(layer, label, tuple(run)))
                    run = []
            if run:
                spans.append(Span(layer, label, tuple(run)))
        return spans

    def run(self, needed: Mapping[str, int], sink: ChunkSink) -> None:
        spans = self.plan(needed)
        if not spans:
            return
        # (digest, bytes) to record; (None, None) when a span is done; (None, error) when
        # a span failed: the session's thread raises it at once.
        cut: queue.Queue[_Item] = queue.Queue(maxsize=QUEUE_CHUNKS)
        stop = threading.Event()

        def hand_over(item: _Item) -> None:
            while not stop.is_set():
                try:
                    cut.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue

        def fetch(span: Span) -> None:
            try:
                self._fetch(span, sink, hand_over, stop)
            except BaseException as e:  # handed to the session's thread, raised there
                hand_over((None, e))
                return
            hand_over((None, None))

        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="oci-fetch") as pool:
            for span in spans:
                pool.submit(fetch, span)
            finished = 0
            try:
                while finished < len(spans):
                    digest, payload = cut.get()
                    if isinstance(payload, BaseException):
                        raise payload
                    if digest is None:
                        finished += 1
                    elif isinstance(payload, bytes):
                        sink.record(digest, payload)
            finally:
                stop.set()  # the other fetchers stop at their next piece

    def _fetch(self, span: Span, sink: ChunkSink, hand_over: Callable[[_Item], None],
               stop: threading.Event) -> None:
        chunks = span.chunks
        position = 0
        buf = bytearray()
        with self.target.read_range(span.layer, span.start, span.end) as pieces:
            for piece in pieces:
                if stop.is_set():
                    return
                buf += piece
                while position < len(chunks) and len(buf) >= chunks[position].length:
                    chunk = chunks[position]
                    data = bytes(buf[:chunk.length])
                    del buf[:chunk.length]
                    position += 1
                    if sink.write(chunk.digest, data):
                        hand_over((chunk.digest, data))
        if position < len(chunks) and not stop.is_set():
            # The far side stopped short: the sink's one check names the chunk.
            sink.write(chunks[position].digest, bytes(buf))
