"""``TorrentSource``: libtorrent pieces cut into the signed manifest's chunks for the ingest sink.

The ingest session (``appliance.store.ingest``) hands over the digests it still needs. Each
maps to a byte range of one torrent file, hence to the pieces that cover it (in a v2 torrent
every file starts on a piece boundary). Pieces that cover no needed chunk get priority 0, so a
resumed fetch asks the swarm only for what the store lacks.

libtorrent's files are the store's own (``storage.link_tree``: links to the staged files the
session preallocated), so pieces land straight in the staging layout, and libtorrent is told
which pieces the store already holds verified (``storage.held_pieces``), which it offers to
the other fetchers at once without re-hashing anything. Once every piece of a chunk has passed
libtorrent's own SHA-256 Merkle check (``piece_finished``, or a have-scan), those pieces are
read back (``read_piece``), the chunk is cut out and given to ``sink.deliver``, which checks
it against the signed BLAKE3 digest and length before it counts (and writes the same bytes
at the same place). A piece is held only while a whole chunk waits for it (``_Pieces``), so
memory stays at the chunks being cut, whatever order pieces arrive in. Done chunks sharing a
piece with a needed one are kept aside first (``storage.Guard``) and marked not done while
libtorrent may write them, then written back and marked done again when it stops, so a peer's
bad blocks never outlive the run in a chunk the index calls verified, even if the run is
killed and another entry point finishes the model.

The source stops when every needed chunk was delivered, or raises ``PeerError`` when no piece
arrived for ``wait_for_pieces`` seconds (what was delivered is durable; run again to resume).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import libtorrent as lt

from appliance.errors import PeerError, StoreError
from appliance.format.manifest import ModelEntry
from appliance.store.ingest import ChunkSink
from appliance.store.store import Store
from appliance.torrent import storage
from appliance.torrent.certs import TorrentIdentity
from appliance.torrent.session import add_flags, connect_peers, present_certificate

Notify = Callable[[str], None]
_POLL_MS = 100
_RECONNECT_S = 10.0
_SCAN_S = 1.0
_STOP_S = 10.0
FILES_DIR = "files"  # under the scratch directory: libtorrent's save path, links into the store


class _Span:
    """Where one needed chunk lies in the torrent's piece space."""

    __slots__ = ("digest", "length", "pieces", "start")

    def __init__(self, digest: str, length: int, start: int, piece_length: int) -> None:
        self.digest = digest
        self.length = length
        self.start = start  # byte offset in the torrent's piece space
        first = start // piece_length
        last = (start + max(length, 1) - 1) // piece_length
        self.pieces = range(first, last + 1)


class TorrentSource:
    """``ChunkSource`` over one libtorrent torrent (added here, or a magnet's handle)."""

    def __init__(self, session: lt.session, ti: lt.torrent_info,
                 handle: lt.torrent_handle | None, model: ModelEntry, scratch: Path,
                 store: Store, *, peers: Sequence[str] = (),
                 identity: TorrentIdentity | None = None, wait_for_pieces: float = 60.0,
                 notify: Notify | None = None) -> None:
        self.session = session
        self.ti = ti
        self.handle = handle
        self.model = model
        self.scratch = scratch
        self.store = store
        self.guard = storage.Guard(scratch / storage.GUARD_DIR)
        self._guard_on_delivery: set[str] = set()
        self._unmarked: set[tuple[int, int]] = set()  # (file id, idx) while libtorrent runs
        self.peers = tuple(peers)
        self.identity = identity
        self.wait_for_pieces = wait_for_pieces
        self.say = notify or (lambda _message: None)
        self.hash_failures = 0
        self.banned: set[str] = set()

    # -- planning -----------------------------------------------------------------------------

    def _spans(self, needed: Mapping[str, int],
               where: Mapping[str, list[storage.Place]]) -> dict[str, _Span]:
        """Each needed chunk at its first place in a staged file (published files are never
        written)."""
        piece_length = self.ti.piece_length()
        return {digest: _Span(digest, where[digest][0].length, where[digest][0].start,
                              piece_length)
                for digest in needed if where.get(digest)}

    def _keep_exposed(self, needed: Mapping[str, int],
                      where: Mapping[str, list[storage.Place]], wanted: list[int]) -> None:
        """Done chunks that share a piece with a needed one, copied aside and marked not done
        before libtorrent may write that piece; needed chunks with a second place in such a
        piece are treated so as they are delivered (``_exposed_on_delivery``)."""
        piece_length = self.ti.piece_length()
        exposed: list[tuple[int, int]] = []
        for digest, found in where.items():
            if digest in needed:
                if any(storage.overlaps(p, wanted, piece_length) for p in found[1:]):
                    self._guard_on_delivery.add(digest)
                continue
            hit = [p.key for p in found if storage.overlaps(p, wanted, piece_length)]
            if not hit:
                continue
            data = self.store.read_local_chunk(digest)
            if data is None:
                raise StoreError(f"chunk {digest} of {self.model.name}:{self.model.version} "
                                 "is marked done but no copy of it verifies: run 'appliance "
                                 "store verify'")
            self.guard.save(digest, data)
            exposed += hit
        self._unmark(exposed)

    def _unmark(self, chunks: list[tuple[int, int]]) -> None:
        if chunks:
            self.store.mark_staged_chunks(chunks, done=False)
            self._unmarked.update(chunks)

    def _exposed_on_delivery(self, span: _Span, data: bytes, sink: ChunkSink,
                             where: Mapping[str, list[storage.Place]], wanted: list[int]
                             ) -> None:
        """A delivered chunk whose other places lie in pieces libtorrent may still write:
        kept aside, made durable as done, then those places marked not done until the end."""
        self.guard.save(span.digest, data)  # the sink has just checked it (restore does again)
        sink.settle()  # its places are committed done now, not in a later batch
        piece_length = self.ti.piece_length()
        self._unmark([p.key for p in where[span.digest][1:]
                      if storage.overlaps(p, wanted, piece_length)])

    def _start(self, wanted: set[int], files: dict[str, storage.StoredFile]
               ) -> lt.torrent_handle:
        save_path = self.scratch / FILES_DIR
        storage.link_tree(save_path, self.model, files)
        if self.handle is not None:
            # A magnet's handle (held in upload mode until the manifest was trusted) saves
            # elsewhere and knows nothing of what the store holds: added again, the same way.
            self.session.remove_torrent(self.handle)
            self.handle = None
        params = lt.add_torrent_params()
        params.ti = self.ti
        params.save_path = str(save_path)
        params.piece_priorities = [4 if p in wanted else 0 for p in range(self.ti.num_pieces())]
        params.have_pieces = storage.held_pieces(self.ti, self.model, files)
        params.flags |= add_flags("no_verify_files")
        self.handle = self.session.add_torrent(params)
        if self.identity is not None:
            present_certificate(self.handle, self.identity)
        return self.handle

    def _stop(self, handle: lt.torrent_handle) -> None:
        """Pause the torrent and wait until libtorrent has stopped writing its files."""
        handle.pause()
        deadline = time.monotonic() + _STOP_S
        while time.monotonic() < deadline:
            if any(isinstance(a, lt.torrent_paused_alert) for a in self.session.pop_alerts()):
                return
            self.session.wait_for_alert(_POLL_MS)

    # -- the transfer -------------------------------------------------------------------------

    def run(self, needed: Mapping[str, int], sink: ChunkSink) -> None:
        model = self.model
        files = storage.stored_files(self.store, model.name, model.version)
        where = storage.places(self.ti, model, files)
        spans = self._spans(needed, where)
        if not spans:
            return
        pieces = _Pieces(spans.values())
        wanted = sorted(pieces.users)
        self._keep_exposed(needed, where, wanted)
        try:
            handle = self._start(set(wanted), files)
            try:
                self._transfer(spans, pieces, handle, sink,
                               lambda span, data: self._exposed_on_delivery(
                                   span, data, sink, where, wanted))
            finally:
                self._stop(handle)
        finally:
            self.guard.restore(where, self.store, unmarked=self._unmarked)
            self._unmarked.clear()

    def _transfer(self, spans: dict[str, _Span], pieces: _Pieces, handle: lt.torrent_handle,
                  sink: ChunkSink, expose: Callable[[_Span, bytes], None]) -> None:
        last_piece = time.monotonic()
        last_connect = scan_due = 0.0
        while spans:
            now = time.monotonic()
            if now - last_connect > _RECONNECT_S:
                connect_peers(handle, self.peers)
                last_connect = now
            if now >= scan_due:
                # Pieces libtorrent holds without a piece_finished alert (one dropped from a
                # full alert queue).
                have = handle.status(lt.status_flags_t.query_pieces).pieces
                for piece in [p for p in pieces.users if p < len(have) and have[p]]:
                    self._read(pieces.had(piece), handle)
                scan_due = now + _SCAN_S
            self.session.wait_for_alert(_POLL_MS)
            if self._alerts(pieces, handle):
                last_piece = time.monotonic()
            for span in pieces.complete():
                data = self._cut(span, pieces.held)
                sink.deliver(span.digest, data)
                if span.digest in self._guard_on_delivery:
                    expose(span, data)
                del spans[span.digest]
                pieces.delivered(span)
            if spans and time.monotonic() - last_piece > self.wait_for_pieces:
                raise PeerError(
                    f"no torrent peer delivered a piece for {self.wait_for_pieces:g} s; "
                    f"{len(spans)} chunks of {self.model.name}:{self.model.version} still "
                    f"needed ({handle.status().num_peers} peers connected); what arrived is "
                    "kept: run the same fetch again to resume"
                )

    @staticmethod
    def _read(pieces: list[int], handle: lt.torrent_handle) -> None:
        for piece in pieces:
            handle.read_piece(piece)

    def _alerts(self, pieces: _Pieces, handle: lt.torrent_handle) -> bool:
        """Take libtorrent's news; True when a piece arrived."""
        arrived = False
        for alert in self.session.pop_alerts():
            if isinstance(alert, lt.piece_finished_alert):
                self._read(pieces.had(alert.piece_index), handle)
                arrived = True
            elif isinstance(alert, lt.read_piece_alert):
                if alert.error.value():
                    pieces.read_failed(alert.piece)  # read again on the next scan
                else:
                    pieces.read(alert.piece, bytes(alert.buffer))
            elif isinstance(alert, lt.hash_failed_alert):
                self.hash_failures += 1
                self.say(f"piece {alert.piece_index} failed libtorrent's hash check; the peer "
                         "that sent it is banned")
            elif isinstance(alert, lt.peer_ban_alert):
                peer = f"{alert.endpoint[0]}:{alert.endpoint[1]}"
                if peer not in self.banned:
                    self.banned.add(peer)
                    self.say(f"banned torrent peer {peer} (sent data that failed the hash)")
            elif isinstance(alert, lt.file_error_alert | lt.torrent_error_alert):
                raise StoreError(f"torrent scratch {self.scratch}: {alert.message()}")
        return arrived

    def _cut(self, span: _Span, held: dict[int, bytes]) -> bytes:
        piece_length = self.ti.piece_length()
        parts = []
        for piece in span.pieces:
            base = piece * piece_length
            lo = max(span.start, base) - base
            hi = min(span.start + span.length, base + piece_length) - base
            parts.append(held[piece][lo:hi])
        return b"".join(parts)


class _Pieces:
    """Which pieces the pending chunks need, which libtorrent has, and which are read.

    A piece is read back only once every piece of some chunk it belongs to is there, and
    dropped once no pending chunk needs it: memory holds the chunks being cut, not the pieces
    that arrived in rarest-first order ahead of their neighbours.
    """

    def __init__(self, spans: Iterable[_Span]) -> None:
        self.users: dict[int, list[_Span]] = {}
        self.missing: dict[str, set[int]] = {}
        for span in spans:
            self.missing[span.digest] = set(span.pieces)
            for piece in span.pieces:
                self.users.setdefault(piece, []).append(span)
        self.held: dict[int, bytes] = {}
        self.asked: set[int] = set()
        self.ready: list[_Span] = []

    def had(self, piece: int) -> list[int]:
        """libtorrent has ``piece``: the pieces to read now (of chunks that became whole)."""
        wanted = []
        for span in self.users.get(piece, ()):
            missing = self.missing.get(span.digest)
            if missing is None or piece not in missing:
                continue
            missing.discard(piece)
            if not missing:
                self.ready.append(span)
                for p in span.pieces:
                    if p not in self.held and p not in self.asked:
                        self.asked.add(p)
                        wanted.append(p)
        return wanted

    def read(self, piece: int, data: bytes) -> None:
        self.asked.discard(piece)
        if piece in self.users:
            self.held[piece] = data

    def read_failed(self, piece: int) -> None:
        self.asked.discard(piece)
        for span in self.users.get(piece, ()):  # had again at the next scan
            if span.digest in self.missing:
                self.missing[span.digest].add(piece)
                if span in self.ready:
                    self.ready.remove(span)

    def complete(self) -> list[_Span]:
        done = [s for s in self.ready if all(p in self.held for p in s.pieces)]
        for span in done:
            self.ready.remove(span)
        return done

    def delivered(self, span: _Span) -> None:
        del self.missing[span.digest]
        for piece in span.pieces:
            users = self.users[piece]
            users.remove(span)
            if not users:
                del self.users[piece]
                self.held.pop(piece, None)
