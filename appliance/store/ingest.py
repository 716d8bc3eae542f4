"""The one ingest session: an authenticated manifest into the store, from any chunk source.

Media import (``appliance.importer``), peer pull (``appliance.peer.pull``) and the OCI and
torrent fetches are this one session with different sources. ``IngestSession.run`` does,
holding the caller's writer lock and open ``Store``:

1. authenticate once: the caller hands over an ``AuthenticatedBundle`` or a callback that
   authenticates against the installed root (``NoTrustRootError`` if there is none);
2. check the channel's rollback mark (``trust_state.check_channel``), then let the caller
   build its source (a source may refuse here too: the media's pack sizes);
3. plan (``Store.plan``: a model stored with other bytes is refused), check the free space
   the new staged files need, and accept in one transaction (``trust_state.record_acceptance``:
   newer roots, high-water mark, manifest, audited ``--allow-expired`` override);
4. begin the models, stage and preallocate their files (a full disk shows before any copy);
5. copy the chunks the store already holds (another version, another quant, a resumed run)
   from their local copies, then hand every chunk still needed to the SOURCE;
6. check every chunk on arrival (``appliance.chunks.check_chunk``: length and BLAKE3 against
   the signed manifest) before it is written; a source that has just run that very check on
   those bytes says so per chunk (``write(..., checked=True)``: the peer client), and then only
   the length is checked again; chunks are
   recorded crash-safely by ``StagedFile`` (every ``flush_bytes`` or ``flush_chunks``);
7. re-check trust before publishing: if the installed root changed since authentication (a
   rotation that revoked the signer while this ran), authenticate the manifest again against
   it and refuse if it no longer passes; then publish every complete file, write the final
   audit record (``action``: "import", "pull") and mark the import complete.

A ``RefusalError`` anywhere is audited once as a "refusal" of ``action`` with the caller's
context (``media=...``, ``peer=...``). Any other error leaves what is durable for the next run.

The source interface is narrow so that media, LAN peers, an OCI registry (blobs by range) and
a BitTorrent client all fit: ``ChunkSource.run(needed, sink)`` gets the digests still needed
(with their lengths) and returns when it has nothing more to give (the rest stays pending) or
raises. Bytes go to the ``ChunkSink``: ``write`` (any thread: check, then pwrite wherever the
chunk goes), then ``record`` (only on the thread that called ``run``: index writes stay on the
session's thread), or ``deliver`` for both; a chunk lying raw in a file the reader opens
(a pack) comes as a ``ChunkExtent`` and goes to ``copy``, which copies it in the kernel and
has it checked where it landed. A source reading one chunk at a time is a ``ChunkReader``
wrapped in ``ReadAhead`` (a few reader threads, a bounded window).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from appliance.authenticate import AuthenticatedBundle, authenticate_manifest
from appliance.chunks import check_chunk
from appliance.errors import ApplianceError, NoTrustRootError, RefusalError, StoreError
from appliance.format.manifest import ModelEntry
from appliance.format.trust import TrustRoot
from appliance.limits import DEFAULT_LIMITS, Limits
from appliance.store import layout, trust_state
from appliance.store.kernelcopy import ChunkExtent
from appliance.store.local_copies import LocalCopies
from appliance.store.specs import ModelPlan
from appliance.store.staging import StagedFile, WriteGate
from appliance.store.store import Store

Progress = Callable[[int, int], None]
Authenticate = Callable[[TrustRoot], AuthenticatedBundle]
# Reader threads of ``ReadAhead``, and chunks read ahead of the recording thread (memory: at
# most this many chunks are held at once).
READERS = 2
READ_AHEAD = 4


class ChunkSink(Protocol):
    """Where a source puts chunk bytes (the session's side; tests may pass their own)."""

    def write(self, digest: str, data: bytes, *, checked: bool = False) -> bool:
        """Any thread: check ``data`` against the signed digest and length (``IntegrityError``)
        and pwrite it wherever it goes; False when the chunk is no longer needed. ``checked``:
        the source ran ``check_chunk`` on exactly these bytes against this digest and signed
        length (only the length is checked again)."""
        ...

    def copy(self, digest: str, extent: ChunkExtent) -> bytes | memoryview | None:
        """Any thread: ``write`` for a ``ChunkExtent`` (checked by it where it landed); the
        bytes for ``record``, None when the chunk is no longer needed."""
        ...

    def record(self, digest: str, data: bytes | memoryview) -> None:
        """The session's thread: count a chunk ``write`` or ``copy`` wrote (made durable in
        batches)."""
        ...

    def deliver(self, digest: str, data: bytes, *, checked: bool = False) -> None:
        """The session's thread: ``write`` then ``record``."""
        ...

    def settle(self) -> None:
        """The session's thread: make what was recorded durable and visible to peers now."""
        ...

    def refused(self, error: ApplianceError, **details: Any) -> None:
        """The session's thread: audit a refusal of bytes a source was handed (a lying peer)."""
        ...


class ChunkSource(Protocol):
    """Gives chunks. ``needed`` maps each digest still needed to its signed length."""

    def run(self, needed: Mapping[str, int], sink: ChunkSink) -> None: ...


class ChunkReader(Protocol):
    """A source that reads one chunk at a time (media, local copies, a registry by range).

    ``runs_check_chunk``: True only for readers that return nothing but bytes that just passed
    ``appliance.chunks.check_chunk`` against the signed digest and length (so the session
    does not hash them twice); every other reader says False and the session checks."""

    runs_check_chunk: bool

    def plan(self, needed: Mapping[str, int]) -> list[str]:
        """The digests of ``needed`` this reader can give now, in the order to read them."""
        ...

    def read(self, digest: str, length: int) -> bytes | ChunkExtent | None:
        """One chunk's bytes (any thread; the sink checks them) or where they lie raw, or None
        when it cannot give this one after all; raise to stop the session."""
        ...


class ReadAhead:
    """``ChunkSource`` over a ``ChunkReader``: ``workers`` threads read, check and pwrite a
    window of ``read_ahead`` chunks ahead while the session's thread records them in order.
    Reading, decompressing and hashing release the GIL, so they overlap the index writes."""

    def __init__(self, reader: ChunkReader, *, workers: int = READERS,
                 read_ahead: int = READ_AHEAD) -> None:
        self.reader = reader
        self.workers = max(1, workers)
        self.read_ahead = max(1, read_ahead)

    def run(self, needed: Mapping[str, int], sink: ChunkSink) -> None:
        order = iter(self.reader.plan(needed))
        window: deque[tuple[str, Future[bytes | memoryview | None]]] = deque()

        def fetch(digest: str) -> bytes | memoryview | None:
            data = self.reader.read(digest, needed[digest])
            if isinstance(data, ChunkExtent):
                return sink.copy(digest, data)
            if data is not None and not sink.write(digest, data):
                return None
            return data

        with ThreadPoolExecutor(max_workers=self.workers,
                                thread_name_prefix="ingest-read") as pool:
            try:
                for digest in itertools.islice(order, self.read_ahead):
                    window.append((digest, pool.submit(fetch, digest)))
                while window:
                    digest, future = window.popleft()
                    data = future.result()
                    for following in itertools.islice(order, 1):
                        window.append((following, pool.submit(fetch, following)))
                    if data is not None:
                        sink.record(digest, data)
            except BaseException:
                for _, future in window:
                    future.cancel()
                raise


@dataclass
class IngestOutcome:
    """What one session did (the entry points turn it into their own result)."""

    bundle: AuthenticatedBundle
    plans: list[ModelPlan]
    published: list[str] = field(default_factory=list)  # name:version published by this run
    pending: list[str] = field(default_factory=list)  # name:version still incomplete
    missing: set[str] = field(default_factory=set)  # digests still needed
    total_bytes: int = 0  # of the models ingested
    already_done_bytes: int = 0  # durable in the store before the copy started
    source_bytes: int = 0  # distinct chunk bytes the source gave
    local_bytes: int = 0  # bytes written from copies the store already held
    duplicate_bytes: int = 0  # source bytes written to a second (third...) place
    seconds: float = 0.0

    @property
    def present(self) -> list[str]:
        return [f"{p.name}:{p.version}" for p in self.plans if p.action == "present"]

    @property
    def complete(self) -> bool:
        return not self.pending


class _Need:
    """One distinct chunk still needed and every place it goes (kept small: a manifest may
    hold hundreds of thousands of chunks, most of them going to one place)."""

    __slots__ = ("file", "idx", "length", "more")

    def __init__(self, length: int, file: StagedFile, idx: int) -> None:
        self.length = length
        self.file = file
        self.idx = idx
        self.more: list[tuple[StagedFile, int]] | None = None

    def add(self, file: StagedFile, idx: int) -> None:
        if self.more is None:
            self.more = []
        self.more.append((file, idx))

    @property
    def targets(self) -> list[tuple[StagedFile, int]]:
        return [(self.file, self.idx), *(self.more or ())]


class IngestSession:
    """One ingest into ``store``, whose writer lock the caller holds."""

    def __init__(
        self,
        store: Store,
        *,
        action: str,
        now: datetime,
        allow_expired: bool = False,
        reason: str | None = None,
        progress: Progress | None = None,
        limits: Limits = DEFAULT_LIMITS,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        trust_state.require_override_reason(allow_expired, reason)
        self.store = store
        self.action = action
        self.now = now
        self.allow_expired = allow_expired
        self.reason = reason
        self.progress = progress
        self.limits = limits
        self.context = dict(context or {})
        self._bundle: AuthenticatedBundle | None = None
        self._staged: list[StagedFile] = []
        self._by_model: dict[str, list[StagedFile]] = {}
        self._need: dict[str, _Need] = {}
        self._chosen: list[ModelEntry] = []
        self._done = 0  # bytes durable or written, for progress
        self._gate = WriteGate()
        self.outcome: IngestOutcome | None = None

    # -- the whole session -----------------------------------------------------------------

    def run(
        self,
        authenticate: AuthenticatedBundle | Authenticate,
        source: Callable[[AuthenticatedBundle], ChunkSource],
        *,
        purpose: Callable[[AuthenticatedBundle], str],
        summary: Callable[[IngestOutcome], dict[str, Any]],
        models: Sequence[ModelEntry] | None = None,
    ) -> IngestOutcome:
        """Steps 1-7 of the module docstring; ``models`` default to all of the manifest's,
        ``purpose`` names the work in a disk-full message, ``summary`` gives the final audit
        record's details."""
        started = time.perf_counter()
        with self._refusals():
            bundle = self._authenticate(authenticate)
            trust_state.check_channel(self.store.store_dir, bundle, self.store.conn)
            chunk_source = source(bundle)
        outcome = self._accept(bundle, models, purpose(bundle))
        try:
            with self._refusals():
                self._stage()
                self._transfer(chunk_source)
                self._recheck_trust()
                self._publish()
        except BaseException:
            self._close(quietly=True)
            raise
        self._close(quietly=False)
        outcome.seconds = time.perf_counter() - started
        manifest = bundle.manifest
        with self.store.transaction():
            self.store.audit(self.action, summary(outcome), self.now)
        if self.store.all_published(manifest.models):
            self.store.finish_import(bundle.manifest_hash, self.now)
        return outcome

    @contextlib.contextmanager
    def _refusals(self) -> Iterator[None]:
        """Audit a refusal once, with the caller's context and the manifest once known."""
        try:
            yield
        except NoTrustRootError:
            raise  # nothing was looked at: there is no root to check against
        except RefusalError as e:
            extra = {"manifest": self._bundle.manifest_hash} if self._bundle else {}
            trust_state.audit_refusal(self.store.store_dir, self.action, e,
                                      **self.context, **extra)
            raise

    def _authenticate(self, authenticate: AuthenticatedBundle | Authenticate
                      ) -> AuthenticatedBundle:
        if isinstance(authenticate, AuthenticatedBundle):
            bundle = authenticate
        else:
            bundle = authenticate(trust_state.require_root(self.store.store_dir,
                                                           self.store.conn))
        self._bundle = bundle
        return bundle

    def _accept(self, bundle: AuthenticatedBundle, models: Sequence[ModelEntry] | None,
                purpose: str) -> IngestOutcome:
        chosen = list(bundle.manifest.models if models is None else models)
        plans = self.store.plan(chosen)
        layout.check_free_space(
            self.store.store_dir,
            sum(p.bytes_to_allocate for p in plans if p.action != "present"),
            purpose,
        )
        # Audits its own refusal (in the same terms as ``_refusals``).
        trust_state.record_acceptance(self.store, bundle, self.now,
                                      allow_expired=self.allow_expired, reason=self.reason,
                                      action=self.action, **self.context)
        self._chosen = chosen
        self.outcome = IngestOutcome(bundle, plans, total_bytes=sum(p.size for p in plans))
        return self.outcome

    # -- staging and moving chunks -----------------------------------------------------------

    def _stage(self) -> None:
        assert self._bundle is not None and self.outcome is not None
        for model, plan in zip(self._chosen, self.outcome.plans, strict=True):
            if plan.action == "present":
                continue
            model_id = self.store.begin_model(model, self._bundle.manifest_hash, self.now)
            if model_id is None:  # published meanwhile by a publish a crash had cut short
                continue
            files = self.store.stage_files(model_id, self.now)
            self._by_model[f"{model.name}:{model.version}"] = files
            self._staged.extend(files)
        for sf in self._staged:
            for idx in sf.pending_indexes():  # one StoredChunk at a time, not a list of all
                chunk = sf.chunk(idx)
                need = self._need.get(chunk.digest)
                if need is None:
                    self._need[chunk.digest] = _Need(chunk.length, sf, idx)
                else:
                    need.add(sf, idx)
        # Files a crash left fully written (or just recovered) count as done.
        self.outcome.already_done_bytes = self._done = sum(
            f.size if f.is_published else f.done_bytes() for f in self._staged
        ) + sum(p.size for p in self.outcome.plans if p.action == "present")
        self._report()
        for sf in self._staged:
            sf.open()  # preallocate every file now: a full disk shows up before copying

    def _transfer(self, source: ChunkSource) -> None:
        try:
            if self._need:
                local = _SessionSink(self, local=True, prechecked=True)
                ReadAhead(LocalCopies(self.store), workers=READERS).run(self._needed(), local)
            if self._need:
                # Readers of this package that run ``check_chunk`` themselves (the media
                # reader, naming volume and offset) are not hashed twice; any other source is.
                prechecked = isinstance(source, ReadAhead) and source.reader.runs_check_chunk
                source.run(self._needed(), _SessionSink(self, prechecked=prechecked))
        finally:
            self._gate.close()  # no fetch thread writes once the files may be closed
        assert self.outcome is not None
        self.outcome.missing = set(self._need)

    def _needed(self) -> dict[str, int]:
        return {digest: need.length for digest, need in self._need.items()}

    def _report(self) -> None:
        if self.progress is not None and self.outcome is not None:
            self.progress(self._done, self.outcome.total_bytes)

    # -- publishing ---------------------------------------------------------------------------

    def _recheck_trust(self) -> None:
        """A root installed while this ran (``trust update``) decides, not the one we began
        with: a key revoked meanwhile must not get a model published."""
        bundle = self._bundle
        assert bundle is not None
        current = trust_state.require_root(self.store.store_dir, self.store.conn)
        if current.fingerprint == bundle.root.fingerprint:
            return
        authenticate_manifest(bundle.manifest_bytes, bundle.signatures, bundle.chain, current,
                              self.now, allow_expired=self.allow_expired, limits=self.limits)

    def _publish(self) -> None:
        assert self.outcome is not None
        for ref, files in self._by_model.items():
            for sf in files:
                sf.flush()
                if not sf.is_published and not sf.pending_indexes():
                    sf.publish(self.now)
            if all(sf.is_published for sf in files):
                self.outcome.published.append(ref)
            else:
                self.outcome.pending.append(ref)

    def _close(self, *, quietly: bool) -> None:
        for sf in self._staged:
            try:  # keep what is durable; a failing flush must not hide the first error
                sf.close()
            except ApplianceError:
                if not quietly:
                    raise
                sf.abort()


class _SessionSink:
    """The session's ``ChunkSink``: the one place chunk bytes are checked and written.

    ``local``: the bytes come from the store's own copies, not from the source. ``prechecked``:
    the reader has just run ``check_chunk`` on them against this chunk (``read_local_copy``,
    the media reader), so only the length is checked again, not the hash."""

    def __init__(self, session: IngestSession, *, local: bool = False,
                 prechecked: bool = False) -> None:
        self.session = session
        self.local = local
        self.prechecked = prechecked

    def write(self, digest: str, data: bytes, *, checked: bool = False) -> bool:
        need = self.session._need.get(digest)
        if need is None:
            return False
        self._check(data, digest, need, checked)
        if not self.session._gate.enter():
            raise StoreError("the ingest session has stopped")
        try:
            for sf, idx in need.targets:
                sf.pwrite_chunk(idx, data)
        finally:
            self.session._gate.leave()
        return True

    def copy(self, digest: str, extent: ChunkExtent) -> bytes | memoryview | None:
        need = self.session._need.get(digest)
        if need is None:
            return None
        if not self.session._gate.enter():
            raise StoreError("the ingest session has stopped")
        try:
            data = need.file.copy_chunk(need.idx, extent)  # checked by the extent
            for sf, idx in need.more or ():
                sf.pwrite_chunk(idx, data)
        finally:
            self.session._gate.leave()
        return data

    def record(self, digest: str, data: bytes | memoryview) -> None:
        session = self.session
        need = session._need.pop(digest, None)
        if need is None:
            return
        outcome = session.outcome
        assert outcome is not None
        for sf, idx in need.targets:
            sf.record_chunk(idx, data)
            session._done += len(data)
        copies = len(data) * len(need.targets)
        if self.local:
            outcome.local_bytes += copies
        else:
            outcome.source_bytes += len(data)
            outcome.duplicate_bytes += copies - len(data)
        session._report()

    def _check(self, data: bytes, digest: str, need: _Need, checked: bool) -> None:
        if not (self.prechecked or checked) or len(data) != need.length:
            check_chunk(data, digest, need.length, file=need.file.label)

    def deliver(self, digest: str, data: bytes, *, checked: bool = False) -> None:
        if self.write(digest, data, checked=checked):
            self.record(digest, data)

    def settle(self) -> None:
        for sf in self.session._staged:
            sf.flush()

    def refused(self, error: ApplianceError, **details: Any) -> None:
        bundle = self.session._bundle
        extra = {"manifest": bundle.manifest_hash} if bundle else {}
        trust_state.audit_refusal(self.session.store.store_dir, self.session.action, error,
                                  **details, **extra)
